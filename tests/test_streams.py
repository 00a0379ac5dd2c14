"""Conversion to and from pipes (no seeks), against qemu-img's view of the same bytes."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

import libqblock as qb

from conftest import qblock_cmd, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

MiB = 1 << 20



def source(tmp, size=20 * MiB):
    p = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), str(size))
    qemu_io(str(p), "write -P 3 1M 3M", "write -z 5M 1M", f"write -P 4 {size - 512} 512", "write -P 5 7M 1000")
    return p, qemu_raw_bytes(str(p), tmp)


def test_to_a_stream_writes_every_byte_in_order(tmp):
    src, want = source(tmp)
    out = io.BytesIO()
    assert qb.convert_to_stream(src, out) == len(want)
    assert out.getvalue() == want
    out = io.BytesIO()
    qb.convert_to_stream([src, src], out, start=MiB, length=21 * MiB)
    assert out.getvalue() == (want + want)[MiB : 22 * MiB]
    with pytest.raises(qb.InvalidParamError):
        qb.convert_to_stream(src, "not a file")


def test_from_a_stream_into_formats_that_grow(tmp):
    _, want = source(tmp)
    data = want[: 13 * MiB + 777]  # not a whole number of sectors
    for fmt, opts in (("qcow2", qb.Qcow2Options), ("raw", qb.RawOptions), ("qed", qb.QedOptions)):
        dst = tmp / f"in.{fmt}"
        assert qb.convert_from_stream(io.BytesIO(data), dst, opts) == len(data)
        got = qemu_raw_bytes(str(dst), tmp)
        assert got[: len(data)] == data and not any(got[len(data):])
        size = os.stat(dst).st_size if fmt == "raw" else qemu_info(str(dst))["virtual-size"]
        assert size == -(-len(data) // opts.size_alignment) * opts.size_alignment
        if fmt != "raw":
            c = qemu_check(str(dst))
            assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0
            # Zero runs were not written: the 1 MiB of zeroes at 5 MiB is a hole.
            assert not any(e["data"] for e in qemu_map(str(dst)) if 5 * MiB <= e["start"] < 6 * MiB)
    empty = tmp / "empty.qcow2"
    assert qb.convert_from_stream(io.BytesIO(b""), empty, qb.Qcow2Options) == 0
    assert qemu_info(str(empty))["virtual-size"] == 512


def test_from_a_stream_refusals(tmp):
    dst = tmp / "x.vdi"
    with pytest.raises(qb.UnsupportedError, match="can grow"):
        qb.convert_from_stream(io.BytesIO(b"abc"), dst, qb.VdiOptions)
    assert not dst.exists()
    with pytest.raises(qb.InvalidParamError):
        qb.convert_from_stream(b"abc", tmp / "y.raw")

    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError(5, "the pipe broke")

    with pytest.raises(OSError):
        qb.convert_from_stream(Broken(), tmp / "z.qcow2", qb.Qcow2Options)
    assert not (tmp / "z.qcow2").exists()  # the half-made target is removed


def test_pipes_on_the_command_line(tmp):
    src, want = source(tmp)
    r = subprocess.run([*qblock_cmd(), "convert", "-O", "raw", str(src), "-"], capture_output=True)
    assert r.returncode == 0 and r.stdout == want, r.stderr
    # stdout through a real pipe into a second qblock reading stdin
    dst = tmp / "piped.qcow2"
    a = subprocess.Popen([*qblock_cmd(), "convert", "-O", "raw", str(src), "-"], stdout=subprocess.PIPE)
    b = subprocess.run([*qblock_cmd(), "convert", "-f", "raw", "-O", "qcow2", "-", str(dst)], stdin=a.stdout,
                       capture_output=True)
    a.stdout.close()
    assert a.wait() == 0 and b.returncode == 0, b.stderr
    assert qemu_img("compare", str(src), str(dst), check=False).returncode == 0
    # -o size= is kept as a minimum; the stream grows the image past it
    dst = tmp / "sized.qcow2"
    r = subprocess.run([*qblock_cmd(), "convert", "-f", "raw", "-O", "qcow2", "-o", "size=1M", "-", str(dst)],
                       input=want[: 3 * MiB], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert qemu_info(str(dst))["virtual-size"] == 3 * MiB and qemu_raw_bytes(str(dst), tmp) == want[: 3 * MiB]
    # a reader that goes away early: quiet exit 141, no traceback
    r = subprocess.run(f"{' '.join(qblock_cmd())} convert -O raw {src} - | head -c 1000 > /dev/null; "
                       "echo ${PIPESTATUS[0]}", shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert r.stdout.strip() == "141" and "Traceback" not in r.stderr
    for argv in (["convert", "-O", "qcow2", str(src), "-"], ["convert", "-f", "qcow2", "-", str(tmp / "o")],
                 ["convert", "-", "-"]):
        r = subprocess.run([*qblock_cmd(), *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and r.stderr.startswith("qblock: ") and "Traceback" not in r.stderr
