"""``Image.stream()``: the virtual disk as a seekable ``io.RawIOBase``, handed
to the standard library's file consumers and to a real partition-table
parser from PyPI (dissect.volume); and every location as ``str``, ``bytes``
or ``os.PathLike``."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

import libqblock as qb

from conftest import qemu_img

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "d.qcow2"
    qb.create(p, qb.Qcow2Options(4 * MiB + 512))
    with qb.open(p) as img:
        img.write(bytes(range(256)) * 4096, MiB)  # 1 MiB of pattern at 1 MiB
    return p


def test_the_stream_reads_seeks_and_tells_like_a_file_of_the_disk(disk: Path) -> None:
    with qb.open(disk, flags=0) as img:
        s = img.stream()
        assert s.readable() and s.seekable() and not s.writable()
        assert repr(s).startswith("<libqblock.ImageStream ") and "at 0 of" in repr(s)
        assert s.seek(MiB) == MiB and s.read(3) == b"\x00\x01\x02" and s.tell() == MiB + 3
        assert s.seek(-2, io.SEEK_CUR) == MiB + 1 and s.read(1) == b"\x01"
        assert s.seek(-4, io.SEEK_END) == img.virt_size - 4
        assert s.read(100) == b"\0" * 4 and s.read(1) == b""  # cut at the end, then EOF
        s.seek(img.virt_size + 10)
        assert s.read(5) == b"" and s.readinto(bytearray(5)) == 0
        buf = bytearray(10)
        s.seek(MiB + 250)
        assert s.readinto(buf) == 10 and bytes(buf) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
        with pytest.raises(ValueError):
            s.seek(-1)
        with pytest.raises(io.UnsupportedOperation):
            s.write(b"x")
        s.seek(0)
        assert s.read() == img.read(img.virt_size, 0)
        s.close()
        assert s.closed and not img.closed  # the image outlives its stream
        with pytest.raises(ValueError):
            s.read(1)


def test_the_standard_library_takes_the_stream(disk: Path, tmp_path: Path) -> None:
    with qb.open(disk, flags=0) as img:
        whole = img.read(img.virt_size, 0)
        assert hashlib.file_digest(io.BufferedReader(img.stream()), "sha256").digest() == hashlib.sha256(whole).digest()
        out = io.BytesIO()
        shutil.copyfileobj(img.stream(), out, 65536)
        assert out.getvalue() == whole
        r = io.BufferedReader(img.stream(), 4096)
        r.seek(MiB + 1)
        assert r.read(2) == b"\x01\x02" and r.peek(1)[:1] == b"\x03"


def test_tar_and_zip_archives_written_into_the_disk_and_read_back(tmp_path: Path) -> None:
    p = tmp_path / "arch.vmdk"
    qb.create(p, qb.VmdkOptions(8 * MiB))
    payload = os.urandom(300_000)
    with qb.open(p) as img:
        s = img.stream()
        assert s.writable()
        with tarfile.open(fileobj=s, mode="w") as tar:
            info = tarfile.TarInfo("data.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        # A zip is found from its end: put it at the end of the disk.
        z = io.BytesIO()
        with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("hello.txt", "hello from a vmdk")
        s.seek(-len(z.getvalue()), io.SEEK_END)
        assert s.write(z.getvalue()) == len(z.getvalue())
        with pytest.raises(OSError, match="passes the end"):
            s.write(b"x")  # a disk does not grow by writing
        s.flush()
    assert qemu_img("check", str(p), check=False).returncode == 0
    with qb.open(p, flags=0) as img:
        with tarfile.open(fileobj=img.stream(), mode="r:") as tar:
            f = tar.extractfile("data.bin")
            assert f is not None and f.read() == payload
        with zipfile.ZipFile(img.stream()) as zf:
            assert zf.read("hello.txt") == b"hello from a vmdk"


def _mbr(parts: list) -> bytes:
    mbr = bytearray(512)
    for i, (boot, kind, lba, count) in enumerate(parts):
        off = 446 + 16 * i
        mbr[off], mbr[off + 4] = boot, kind
        struct.pack_into("<II", mbr, off + 8, lba, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def test_a_partition_table_parser_from_pypi_reads_the_disk(tmp_path: Path) -> None:
    """dissect.volume finds the MBR partitions of a qcow2 overlay whose
    partition table lies in its vmdk backing file."""
    from dissect.volume.disk import Disk  # a test extra (pip install -e '.[test]')
    base, top = tmp_path / "base.vmdk", tmp_path / "top.qcow2"
    qb.create(base, qb.VmdkOptions(64 * MiB))
    with qb.open(base) as img:
        img.stream().write(_mbr([(0x80, 0x83, 2048, 40960), (0, 0x07, 43008, 20480)]))
    qb.create(top, qb.Qcow2Options(64 * MiB, backing=base.name, backing_fmt=qb.Format.VMDK))
    with qb.open(top, flags=0) as img:
        parts = [(p.number, p.offset, p.size, p.type) for p in Disk(img.stream()).partitions]
    assert parts == [(1, 2048 * 512, 40960 * 512, 0x83), (2, 43008 * 512, 20480 * 512, 0x07)]


@pytest.mark.parametrize("kind", ["str", "bytes", "pathlike"])
def test_every_location_may_be_str_bytes_or_pathlike(kind: str, tmp_path: Path) -> None:
    def loc(p: Path) -> object:
        return {"str": str(p), "bytes": os.fsencode(p), "pathlike": p}[kind]

    src, dst = tmp_path / "s.qcow2", tmp_path / "d.vmdk"
    qb.create(loc(src), qb.Qcow2Options(MiB))  # type: ignore[arg-type]
    with qb.open(loc(src)) as img:  # type: ignore[arg-type]
        img.write(b"abc", 0)
        assert img.location == qb.Location.file(str(src))
    assert qb.probe(loc(src)) is qb.Format.QCOW2  # type: ignore[arg-type]
    qb.convert(loc(src), loc(dst), qb.VmdkOptions)  # type: ignore[arg-type]
    assert qb.check(loc(src)).filename == str(src)  # type: ignore[arg-type]
    assert qb.compare(loc(src), loc(dst)).identical  # type: ignore[arg-type]
    assert qb.inspect(loc(src)).format is qb.Format.QCOW2  # type: ignore[arg-type]


def test_a_path_that_is_not_utf8_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(qb.UnsupportedError, match="not valid UTF-8"):
        qb.open(os.fsencode(tmp_path) + b"/\xff.qcow2")
