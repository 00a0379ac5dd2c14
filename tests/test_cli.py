"""The qblock command: create, info, write, read, map, convert, compare and checksum, against qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import libqblock as qb
from libqblock import cli

from conftest import qblock_cmd, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map

MiB = 1 << 20


def run(capsysbinary, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsysbinary.readouterr()
    return rc, out.out, out.err.decode()


@pytest.mark.parametrize("text, n", [("4096", 4096), ("64k", 65536), ("64K", 65536), ("512M", 512 * MiB), ("1G", 1 << 30), ("2T", 2 << 40), ("1GiB", 1 << 30), ("3b", 3)])
def test_parse_size(text, n):
    assert cli.parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "1.5G", "-1", "G", "1X", "1 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(qb.InvalidParamError):
        cli.parse_size(bad)


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_raw(tmp, capsysbinary, prealloc):
    p = tmp / "a.raw"
    rc, out, err = run(capsysbinary, "create", "-f", "raw", "-o", f"preallocation={prealloc}", p, "3M")
    assert (rc, err) == (0, "")
    info = qemu_info(str(p))
    assert info["format"] == "raw" and info["virtual-size"] == 3 * MiB
    assert (os.stat(p).st_blocks == 0) == (prealloc == "off")


def test_create_takes_size_as_an_option_too(tmp, capsysbinary):
    assert run(capsysbinary, "create", "-f", "raw", "-o", "size=64k", tmp / "o.raw")[0] == 0
    assert os.path.getsize(tmp / "o.raw") == 65536


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", "-f", "raw", "{tmp}/x.raw"], "needs a size"),
        (["create", "-f", "nosuch", "{tmp}/x.img", "1M"], "unknown format"),
        (["create", "-f", "dmg", "{tmp}/x.img", "1M"], "no options class"),
        (["create", "-f", "sheepdog", "{tmp}/x.img", "1M"], "not supported yet"),
        (["create", "-f", "raw", "-o", "cluster_size=64k", "{tmp}/x.raw", "1M"], "has no option 'cluster_size'"),
        (["create", "-f", "raw", "-o", "preallocation", "{tmp}/x.raw", "1M"], "needs key=value"),
        (["create", "-f", "raw", "{tmp}/x.raw", "lots"], "not a size"),
        (["create", "-f", "qcow2", "-o", "lazy_refcounts=maybe", "{tmp}/x.qcow2", "1M"], "on or off"),
        (["create", "-f", "qcow2", "-o", "cluster_size=3k", "{tmp}/x.qcow2", "1M"], "cluster_size"),
        (["info", "{tmp}/missing.raw"], "missing.raw"),
    ],
)
def test_errors_exit_1_with_a_message(tmp, capsysbinary, argv, message):
    rc, out, err = run(capsysbinary, *[a.format(tmp=tmp) for a in argv])
    assert rc == 1 and out == b"" and err.startswith("qblock: ") and message in err
    assert not (tmp / "x.raw").exists() and not (tmp / "x.vmdk").exists()


def test_options_help(capsysbinary):
    rc, out, _ = run(capsysbinary, "create", "-f", "vmdk", "-o", "help", "unused")
    text = out.decode()
    assert rc == 0 and "VmdkOptions" in text
    for name in ("size", "backing_file", "compat6", "subformat", "adapter_type"):
        assert name in text


def test_info_raw_human_and_json(tmp, capsysbinary):
    p = tmp / "i.raw"
    qb.create(p, qb.RawOptions(5 * MiB))
    rc, out, _ = run(capsysbinary, "info", "--output", "json", p)
    d = json.loads(out)
    theirs = qemu_info(str(p))
    assert rc == 0 and d["format"] == theirs["format"] == "raw"
    assert d["virtual-size"] == theirs["virtual-size"] == 5 * MiB and d["filename"] == str(p)
    rc, out, _ = run(capsysbinary, "info", "-f", "raw", p)
    assert rc == 0 and out.decode() == qemu_human_info(p, "-f", "raw")


def qemu_human_info(p, *extra):
    """qemu-img info's text up to its child-node section (which qblock does not print)."""
    text = qemu_img("info", *extra, str(p)).stdout
    keep = [ln for ln in text.split("\n\n")]
    return "\n\n".join(b.split("Child node")[0].rstrip("\n") for b in keep) + "\n"


def test_info_human_and_backing_chain_as_qemu_img(tmp, capsysbinary):
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(base), "3G")
    qemu_io(str(base), "write -P 1 0 300k")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    vmdk = tmp / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "100M")
    for path, extra in ((base, ()), (top, ("--backing-chain",)), (vmdk, ())):
        rc, out, _ = run(capsysbinary, "info", *extra, path)
        assert rc == 0 and out.decode() == qemu_human_info(path, *extra)
    rc, out, _ = run(capsysbinary, "info", "--output=json", "--backing-chain", top)
    ours, theirs = json.loads(out), json.loads(qemu_img("info", "--output=json", "--backing-chain", str(top)).stdout)
    assert len(ours) == len(theirs) == 2
    for o, t in zip(ours, theirs):
        assert {k: v for k, v in t.items() if k in o} == o


def test_map_human_as_qemu_img(tmp, capsysbinary):
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(str(base), "write -P 2 512k 64k", "write -P 3 3M 1M")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io(str(top), "write -P 1 0 128k", "write -z 1M 64k", "write -P 4 3M 64k")
    for p in (base, top):
        rc, out, _ = run(capsysbinary, "map", p)
        assert rc == 0 and out.decode() == qemu_img("map", str(p)).stdout
    z = tmp / "z.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(top), str(z))
    rc, out, err = run(capsysbinary, "map", z)
    assert rc == 1 and "compressed" in err and qemu_img("map", str(z), check=False).returncode == 1


def test_commit_rebase_resize_commands(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(str(base), "write -P 1 0 1M")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(str(top), "write -P 2 64k 64k")
    cmd = qblock_cmd()
    r = subprocess.run([*cmd, "commit", str(top)], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Image committed.\n", "")
    assert qemu_img("map", "--output=json", str(base)).stdout.count('"present": true') >= 1
    r = subprocess.run([*cmd, "commit", str(base)], capture_output=True, text=True)
    assert r.returncode == 1 and "no backing file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "rebase", "-b", "", str(top)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "backing-filename" not in qemu_info(str(top))
    r = subprocess.run([*cmd, "rebase", "-b", "base.qcow2", str(top)], capture_output=True, text=True)
    assert r.returncode == 1 and "format" in r.stderr
    r = subprocess.run([*cmd, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", str(top)], capture_output=True, text=True)
    assert r.returncode == 0 and qemu_info(str(top))["backing-filename"] == "base.qcow2"
    r = subprocess.run([*cmd, "resize", str(top), "+2M"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "Image resized.\n") and qemu_info(str(top))["virtual-size"] == 6 * MiB
    raw = tmp / "r.raw"
    qb.create(raw, qb.RawOptions(4 * MiB))
    r = subprocess.run([*cmd, "resize", str(raw), "--", "-1M"], capture_output=True, text=True)
    assert r.returncode == 1 and "--shrink" in r.stderr and raw.stat().st_size == 4 * MiB
    r = subprocess.run([*cmd, "resize", "--shrink", str(raw), "--", "-1M"], capture_output=True, text=True)
    assert r.returncode == 0 and raw.stat().st_size == 3 * MiB and "warning" in r.stderr


def test_write_read_and_map_raw(tmp, capsysbinary):
    p = tmp / "w.raw"
    assert run(capsysbinary, "create", "-f", "raw", p, "8M")[0] == 0
    assert run(capsysbinary, "write", "-P", "0xab", p, "1M", "64k")[0] == 0
    assert run(capsysbinary, "write", "-P", "7", p, "5000", "3")[0] == 0
    assert run(capsysbinary, "write", "-z", p, str(MiB + 4096), "4k")[0] == 0
    data = p.read_bytes()
    assert data[MiB : MiB + 4096] == b"\xab" * 4096 and data[MiB + 4096 : MiB + 8192] == b"\0" * 4096
    assert data[MiB + 8192 : MiB + 65536] == b"\xab" * (65536 - 8192) and data[5000:5003] == b"\7\7\7"
    rc, out, _ = run(capsysbinary, "read", p, "4999", "5")
    assert rc == 0 and out == b"\0\7\7\7\0"
    rc, out, _ = run(capsysbinary, "read", "-f", "raw", p, "1M", "16")
    assert out == b"\xab" * 16
    rc, out, err = run(capsysbinary, "read", p, "8M", "1")
    assert rc == 1 and "beyond" in err
    rc, out, _ = run(capsysbinary, "map", "--output=json", p)
    ours = json.loads(out)
    keys = ("start", "length", "data", "zero", "present", "depth")
    assert [{k: e[k] for k in keys} for e in ours] == [{k: e[k] for k in keys} for e in qemu_map(str(p), "-f", "raw")]


def test_read_what_qemu_io_wrote(tmp, capsysbinary):
    p = tmp / "q.raw"
    qb.create(p, qb.RawOptions(MiB))
    qemu_io(str(p), "write -P 0x3c 1000 10", fmt="raw")
    rc, out, _ = run(capsysbinary, "read", p, "998", "14")
    assert out == b"\0\0" + b"\x3c" * 10 + b"\0\0"


def test_qcow2_through_the_cli(tmp, capsysbinary):
    # The README's run command: create a qcow2, write into it, print its info.
    p = tmp / "demo.qcow2"
    rc, _, err = run(capsysbinary, "create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", p, "1G")
    assert rc == 0, err
    assert run(capsysbinary, "write", "-P", "0xab", p, "1M", "4M")[0] == 0
    theirs = qemu_info(str(p))
    assert theirs["format"] == "qcow2" and theirs["virtual-size"] == 1 << 30 and theirs["cluster-size"] == 4096
    assert theirs["format-specific"]["data"]["lazy-refcounts"] is True
    qemu_check(str(p))
    rc, out, _ = run(capsysbinary, "info", "--output=json", p)
    d = json.loads(out)
    assert d["format"] == "qcow2" and d["cluster-size"] == 4096 and d["virtual-size"] == 1 << 30
    rc, out, _ = run(capsysbinary, "read", p, str(MiB - 1), "2")
    assert out == b"\0\xab"
    top = tmp / "top.qcow2"
    assert run(capsysbinary, "create", "-f", "qcow2", "-b", p, "-F", "qcow2", top)[0] == 0  # size from the backing file
    t = qemu_info(str(top))
    assert t["virtual-size"] == 1 << 30 and t["backing-filename-format"] == "qcow2"


def test_the_installed_command(tmp):
    exe = shutil.which("qblock")
    cmd = [exe] if exe else [sys.executable, "-m", "libqblock.cli"]
    r = subprocess.run([*cmd, "create", "-f", "raw", str(tmp / "e.raw"), "1M"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd, "info", str(tmp / "e.raw")], capture_output=True, text=True)
    assert r.returncode == 0 and "virtual size: 1 MiB (1048576 bytes)" in r.stdout
    r = subprocess.run([*cmd], capture_output=True, text=True)
    assert r.returncode == 2  # argparse: a subcommand is required



def test_convert_through_the_installed_command(tmp):
    src = str(tmp / "src.qcow2")
    qemu_img_create = ["qemu-img", "create", "-q", "-f", "qcow2", src, "8M"]
    subprocess.run(qemu_img_create, check=True)
    qemu_io(src, "write -P 0x61 1M 64k", "write -P 0x62 7M 4k")
    dst = str(tmp / "dst.vmdk")
    r = subprocess.run([*qblock_cmd(), "convert", "-p", "-O", "vmdk", "-o", "subformat=monolithicSparse", src, dst],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "(100.00/100%)" in r.stderr  # the -p progress line
    assert subprocess.run(["qemu-img", "compare", "-q", src, dst]).returncode == 0
    qemu_check(dst)
    assert qemu_info(dst)["format"] == "vmdk" and qemu_info(dst)["virtual-size"] == 8 * MiB
    # -n into the existing target, -S 0, and the checksum says the content is the same
    full = str(tmp / "full.raw")
    subprocess.run([*qblock_cmd(), "create", "-f", "raw", full, "8M"], check=True)
    r = subprocess.run([*qblock_cmd(), "convert", "-n", "-S", "0", "-m", "2", "-W", src, full],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.stat(full).st_blocks * 512 >= 8 * MiB
    sums = [subprocess.run([*qblock_cmd(), "checksum", p], capture_output=True, text=True).stdout.split()[0]
            for p in (src, dst, full)]
    assert len(set(sums)) == 1 and len(sums[0]) == 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "missing.qcow2", "out.raw"], "missing.qcow2"),
        (["convert", "-O", "nosuch", "SRC", "out.img"], "unknown format"),
        (["convert", "-c", "-O", "vpc", "SRC", "out.img"], "cannot store compressed data"),
        (["convert", "-S", "1000", "SRC", "out.img"], "multiple of 512"),
        (["convert", "-n", "-o", "cluster_size=4k", "SRC", "SRC"], "-n writes into"),
        (["checksum", "missing.qcow2"], "missing.qcow2"),
        (["convert", "-O", "raw", "-B", "SRC", "SRC", "out.img"], "raw images have no backing file"),
        (["create", "-f", "vdi", "-b", "SRC", "out.img"], "vdi images have no backing file"),
    ],
)
def test_tool_errors_are_one_line_without_a_traceback(tmp, argv, message):
    src = tmp / "SRC"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M"], check=True)
    argv = [str(src) if a == "SRC" else a for a in argv]
    r = subprocess.run([*qblock_cmd(), *argv], capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("qblock: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp / "out.img").exists()


def test_python_dash_m_is_the_same_command(tmp):
    r = subprocess.run([sys.executable, "-m", "libqblock", "create", "-f", "qcow2", str(tmp / "m.qcow2"), "1M"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qemu_info(str(tmp / "m.qcow2"))["virtual-size"] == MiB
    assert subprocess.run([sys.executable, "-m", "libqblock", "--help"], capture_output=True, text=True).stdout \
        .startswith("usage: qblock")


def test_a_closed_pipe_stops_quietly(tmp):
    img = tmp / "p.raw"
    subprocess.run([*qblock_cmd(), "create", "-f", "raw", str(img), "64M"], check=True)
    # The reader takes one byte and goes away while 64 MiB are still to come.
    p = subprocess.Popen([*qblock_cmd(), "read", str(img), "0", "64M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.read(1) == b"\0"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err


DD_CASES = [
    ["-f", "qcow2", "-O", "raw", "bs=64k", "count=3", "skip=1"],
    ["-O", "qcow2", "bs=1M"],
    ["bs=3000", "count=2"],
    ["count=0"],
    ["-O", "vmdk", "skip=3", "bs=1M"],
]


@pytest.mark.parametrize("args", DD_CASES, ids=lambda a: " ".join(a))
def test_dd_as_qemu_img(tmp, args):
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "4M")
    qemu_io(str(src), "write -P 1 0 100k", "write -P 2 1M 1M", "write -P 3 3M 4096")
    fmt = args[args.index("-O") + 1] if "-O" in args else "raw"
    ours, theirs = tmp / f"ours.{fmt}", tmp / f"theirs.{fmt}"
    qemu_img("dd", *args, f"if={src}", f"of={theirs}")
    # the operands in another order, and the options after them
    r = subprocess.run([*qblock_cmd(), "dd", f"of={ours}", f"if={src}", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qemu_info(str(ours))["virtual-size"] == qemu_info(str(theirs))["virtual-size"]
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0


def test_dd_errors(tmp, capsysbinary):
    src = tmp / "src.raw"
    qb.create(src, qb.RawOptions(MiB))
    rc, _, err = run(capsysbinary, "dd", f"if={src}", f"of={tmp / 'o.raw'}", "bs=1M", "skip=2")
    assert rc == 1 and "cannot skip" in err and not (tmp / "o.raw").exists()
    rc, _, err = run(capsysbinary, "dd", f"if={src}", "seek=1", f"of={tmp / 'o.raw'}")
    assert rc == 1 and "unrecognized operand" in err
    rc, _, err = run(capsysbinary, "dd", f"if={src}")
    assert rc == 1 and "of=" in err
