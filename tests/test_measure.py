"""measure: the same figures as qemu-img measure, for new disks and for copies of images."""

from __future__ import annotations

import json

import pytest

import libqblock as qb
from libqblock import cli
from libqblock.sizing import measure

from conftest import qemu_img, qemu_io

MiB = 1 << 20
GiB = 1 << 30


def theirs(*args: str) -> dict:
    return json.loads(qemu_img("measure", "--output=json", *args).stdout)


SIZES = [
    ("qcow2", [], 1 * GiB),
    ("qcow2", [], 0),
    ("qcow2", [], 12345),
    ("qcow2", ["cluster_size=512"], 10 * GiB),
    ("qcow2", ["cluster_size=2M"], 3 * (1 << 40)),
    ("qcow2", ["refcount_bits=1"], 100 * GiB),
    ("qcow2", ["refcount_bits=64"], 100 * GiB),
    ("qcow2", ["extended_l2=on"], 1 * GiB),
    ("qcow2", ["extended_l2=on,cluster_size=2M"], 1 * GiB),
    ("qcow2", ["preallocation=metadata"], 1 * GiB),
    ("qcow2", ["preallocation=full"], 1 * GiB),
    ("qcow2", ["compat=0.10"], 5 * GiB),
    ("raw", [], 1 * GiB + 1),
]


@pytest.mark.parametrize("fmt, opts, size", SIZES)
def test_new_disks_as_qemu_img(fmt, opts, size):
    o = [a for x in opts for a in ("-o", x)]
    want = theirs("-O", fmt, *o, "--size", str(size))
    cls, kw = cli._option_args(fmt, opts, None, None, None)
    got = measure(fmt if not kw else cls(**kw, virt_size=qb.options_class(qb.Format.from_str(fmt)).size_alignment),
                  size=size).to_qemu_json()
    assert got == want


def source_images(tmp):
    q = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "300M")
    qemu_io(str(q), "write -P 1 0 100k", "write -z 1M 1M", "write -P 2 5M 512", "write -P 3 299M 1M")
    b = tmp / "bitmaps.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(b), "2G")
    qemu_img("bitmap", "--add", "-g", "512", str(b), "fine")
    qemu_img("bitmap", "--add", "-g", "2M", str(b), "a-longer-bitmap-name")
    qemu_io(str(b), "write -P 4 1G 3M")
    r = tmp / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(r), "64M")
    qemu_io(str(r), "write -P 5 1M 64k", "write -P 6 40M 4k", fmt="raw")
    v = tmp / "src.vmdk"
    qemu_img("convert", "-O", "vmdk", str(q), str(v))
    old = tmp / "v2.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "compat=0.10", str(q), str(old))
    return [q, b, r, v, old]


TARGETS = [("qcow2", []), ("qcow2", ["cluster_size=4096"]), ("qcow2", ["cluster_size=2M,extended_l2=on"]),
           ("qcow2", ["compat=0.10"]), ("qcow2", ["backing_file=base.qcow2"]), ("qcow2", ["preallocation=falloc"]),
           ("raw", [])]


def test_copies_of_images_as_qemu_img(tmp, capsys):
    for src in source_images(tmp):
        for fmt, opts in TARGETS:
            o = [a for x in opts for a in ("-o", x)]
            want = theirs("-O", fmt, *o, str(src))
            assert cli.main(["measure", "--output=json", "-O", fmt, *o, str(src)]) == 0
            got = json.loads(capsys.readouterr().out)
            assert got == want, f"{src.name} -> {fmt} {opts}"
            text = qemu_img("measure", "-O", fmt, *o, str(src)).stdout
            assert cli.main(["measure", "-O", fmt, *o, str(src)]) == 0
            assert capsys.readouterr().out == text
    assert measure(qb.Qcow2Options, source=tmp / "src.qcow2").bitmaps == 0


def test_measure_refusals(tmp):
    for fmt in ("vmdk", "vdi", "vpc", "vhdx", "qed", "parallels", "qcow"):
        assert qemu_img("measure", "-O", fmt, "--size", "1G", check=False).returncode == 1
        with pytest.raises(qb.UnsupportedError, match="measurement"):
            measure(fmt, size=GiB)
    with pytest.raises(qb.InvalidParamError, match="too large"):
        measure(qb.Qcow2Options(MiB, cluster_size=512), size=8 << 40)
    with pytest.raises(qb.InvalidParamError):
        measure("qcow2", size=-1)
    with pytest.raises(qb.InvalidParamError):
        measure("nonsense", size=1)
    with pytest.raises(qb.InvalidParamError, match="not both"):
        measure("raw", size=1, source=tmp / "x")
    assert cli.main(["measure", "-O", "qcow2"]) == 1
