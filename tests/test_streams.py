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
    for argv in (["convert", "-O", "vdi", str(src), "-"], ["convert", "-c", "-O", "qcow2", str(src), "-"],
                 ["convert", "-f", "qcow2", "-", str(tmp / "o")], ["convert", "-", "-"]):
        r = subprocess.run([*qblock_cmd(), *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and r.stderr.startswith("qblock: ") and "Traceback" not in r.stderr


class WriteOnly:
    """A pipe's side of a file object: write and flush, no seek, no tell."""

    def __init__(self) -> None:
        self.parts: list = []

    def write(self, b) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def flush(self) -> None:
        pass

    def value(self) -> bytes:
        return b"".join(self.parts)


def image_source(tmp, size=20 * MiB + 3 * 512):
    """A sparse qcow2 whose block status says data over some zeroes (written as data), zeroes (-z)
    and holes, with text-like and random clusters, and whose size is not a whole number of clusters."""
    p = tmp / "img-src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), str(size))
    qemu_io(str(p), "write -P 3 1M 3M", "write -P 0 6M 2M", "write -z 9M 1M", "write -P 7 11M 100k",
            f"write -P 4 {size - 512} 512", "write -P 5 17M 1000")
    text = b"".join(b"line %06d of a text-like cluster\n" % i for i in range(20000))
    with qb.open(p, flags=qb.O_RDWR) as img:
        img.write(text[: 512 * 1024], 13 * MiB)
        img.write(os.urandom(200 * 1024), 15 * MiB + 512)
    return p, qemu_raw_bytes(str(p), tmp)


STREAM_CASES = [
    ("qcow2", lambda n: qb.Qcow2Options(n)),
    ("qcow2", lambda n: qb.Qcow2Options(n, cluster_size=512, compat="0.10")),
    ("qcow2", lambda n: qb.Qcow2Options(n, cluster_size=4096, refcount_bits=1)),
    ("qcow2", lambda n: qb.Qcow2Options(n, cluster_size=2 * MiB, refcount_bits=64, compression_type="zstd")),
    ("vmdk", lambda n: "vmdk"),
    ("vmdk", lambda n: qb.VmdkOptions(n, subformat="streamOptimized", adapter_type="lsilogic", hwversion="11")),
]


@pytest.mark.parametrize("fmt, make", STREAM_CASES)
def test_images_to_a_stream_pass_qemu_img(tmp, fmt, make):
    """qcow2 and streamOptimized vmdk written front to back to a write-only object: qemu-img finds
    them clean and reads the source's bytes."""
    src, want = image_source(tmp)
    out = WriteOnly()
    n = qb.convert_to_stream(src, out, make(len(want)))
    dst = tmp / f"out.{fmt}"
    dst.write_bytes(out.value())
    assert n == dst.stat().st_size
    info = qemu_info(str(dst))
    assert info["format"] == fmt and info["virtual-size"] == len(want)
    c = qemu_check(str(dst))
    assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0 and c.get("check-errors", 0) == 0
    assert qemu_raw_bytes(str(dst), tmp) == want
    if fmt == "vmdk":
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
        # the stream layout: directory at the end, found through the footer
        assert dst.read_bytes()[56:64] == b"\xff" * 8
    else:
        # only clusters with data are mapped: the zeroes written as data at 6M are not
        m = qemu_map(str(dst))
        assert not any(e["data"] for e in m if 6 * MiB <= e["start"] < 8 * MiB)
        assert any(e["data"] for e in m if e["start"] <= MiB < e["start"] + e["length"])
    # and we read it back as written
    with qb.open(dst, flags=0) as img:
        assert img.read(len(want), 0) == want


def test_streams_through_a_pipe_on_the_command_line(tmp):
    src, want = image_source(tmp)
    for fmt, extra in (("qcow2", []), ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"])):
        dst = tmp / f"piped.{fmt}"
        r = subprocess.run(f"{' '.join(qblock_cmd())} convert -O {fmt} {' '.join(extra)} {src} - | cat > {dst}; "
                           "echo ${PIPESTATUS[0]}", shell=True, capture_output=True, text=True,
                           executable="/bin/bash")
        assert r.stdout.strip() == "0", r.stderr
        assert qemu_img("compare", str(src), str(dst), check=False).returncode == 0
        qemu_check(str(dst))
    # concatenated sources and the stream's size
    dst = tmp / "two.qcow2"
    with open(dst, "wb") as f:
        subprocess.run([*qblock_cmd(), "convert", "-O", "qcow2", str(src), str(src), "-"], stdout=f, check=True)
    assert qemu_raw_bytes(str(dst), tmp) == want + want


def test_image_stream_refusals(tmp):
    src, _ = image_source(tmp)
    out = WriteOnly()
    with pytest.raises(qb.UnsupportedError, match="compressed qcow2"):
        qb.convert_to_stream(src, out, "qcow2", compress=True)
    with pytest.raises(qb.UnsupportedError, match="stream"):
        qb.convert_to_stream(src, out, "vdi")
    with pytest.raises(qb.UnsupportedError, match="backing"):
        qb.convert_to_stream(src, out, qb.Qcow2Options(0, backing=str(src), backing_fmt="qcow2"))
    with pytest.raises(qb.UnsupportedError, match="preallocation"):
        qb.convert_to_stream(src, out, qb.Qcow2Options(30 * MiB, preallocation="metadata"))
    with pytest.raises(qb.UnsupportedError, match="only streamOptimized"):
        qb.convert_to_stream(src, out, qb.VmdkOptions(30 * MiB))
    with pytest.raises(qb.InvalidParamError, match="smaller"):
        qb.convert_to_stream(src, out, qb.Qcow2Options(MiB))
    with pytest.raises(qb.UnsupportedError):
        qb.convert_to_stream(src, out, None, compress=True)

    class Closed(WriteOnly):
        def write(self, b):
            raise BrokenPipeError(32, "the reader went away")

    with pytest.raises(BrokenPipeError):
        qb.convert_to_stream(src, Closed(), "vmdk")

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qb.convert_to_stream(src, WriteOnly(), "qcow2", progress=stop)


def test_a_vmdk_written_as_a_stream_is_read_only(tmp):
    """Its tables follow its grains: nothing can be appended, so writes are refused, not misplaced."""
    src, want = image_source(tmp)
    dst = tmp / "s.vmdk"
    with open(dst, "wb") as f:
        qb.convert_to_stream(src, f, "vmdk")
    before = dst.read_bytes()
    with qb.open(dst, flags=qb.O_RDWR) as img:
        with pytest.raises(qb.UnsupportedError):
            img.write(bytes(65536), 0)
    assert dst.read_bytes() == before
