"""raw images: create, I/O, allocation and info against qemu-img."""

from __future__ import annotations

import os

import pytest

import libqblock as qb

from conftest import qemu_img, qemu_info, qemu_io, qemu_map


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_preallocation_matches_qemu(tmp, prealloc):
    ours, theirs = tmp / "ours.raw", tmp / "theirs.raw"
    qb.create(ours, qb.RawOptions(3 * 1024 * 1024 + 512, preallocation=prealloc))
    qemu_img("create", "-f", "raw", "-o", f"preallocation={prealloc}", str(theirs), str(3 * 1024 * 1024 + 512))
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    if prealloc == "off":
        # qemu-img writes the first 4 KiB to probe alignment; we stay fully sparse.
        assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks
    else:
        assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks
    assert qemu_info(str(ours))["virtual-size"] == 3 * 1024 * 1024 + 512


def test_read_what_qemu_io_wrote(tmp):
    p = tmp / "a.raw"
    qemu_img("create", "-f", "raw", str(p), "4M")
    qemu_io(str(p), "write -P 0x5a 12345 70000", "write -P 0x11 3M 4097", fmt="raw")
    with qb.open(p, flags=0) as img:
        assert img.format is qb.Format.RAW
        assert img.read(70000, 12345) == b"\x5a" * 70000
        assert img.read(4097, 3 * 1024 * 1024) == b"\x11" * 4097
        assert img.read(10, 12340) == b"\0" * 5 + b"\x5a" * 5
        assert img.read(0, 4 * 1024 * 1024) == b""


def test_write_read_truncate_and_flush(tmp):
    p = tmp / "b.raw"
    qb.create(p, qb.RawOptions(1 << 20))
    with qb.open(p) as img:
        assert img.write(memoryview(b"xyz" * 1000), 1000) == 3000
        img.flush()
        img.truncate(2 << 20)
        assert img.virt_size == 2 << 20
        img.write(b"end", (2 << 20) - 3)
    data = p.read_bytes()
    assert data[1000:4000] == b"xyz" * 1000 and data[-3:] == b"end" and len(data) == 2 << 20


def test_map_matches_qemu(tmp):
    p = tmp / "c.raw"
    qemu_img("create", "-f", "raw", str(p), "8M")
    qemu_io(str(p), "write -P 1 1M 64k", "write -P 2 5M 1M", fmt="raw")
    with qb.open(p, fmt="raw", flags=0) as img:
        ours = [e.to_qemu_map() for e in img.map()]
    theirs = qemu_map(str(p), "-f", "raw")
    strip = lambda es: [{k: e[k] for k in ("start", "length", "data", "zero", "present", "depth")} for e in es]
    assert strip(ours) == strip(theirs)


def test_check_allocation_is_64_bit(tmp):
    p = tmp / "big.raw"
    qb.create(p, qb.RawOptions(6 << 40))  # 6 TiB sparse
    with qb.open(p) as img:
        img.write(b"x", (5 << 40) + 7)
        status, length = img.check_allocation(0, 6 << 40)
        assert status is True and length == 6 << 40  # raw: every byte is allocated in the top layer
        bs = img.block_status(0, 6 << 40)
        assert not bs.data and bs.zero and bs.length >= 4 << 40
        assert img.read(1, (5 << 40) + 7) == b"x"


def test_out_of_range_and_closed(tmp):
    p = tmp / "d.raw"
    qb.create(p, qb.RawOptions(4096))
    img = qb.open(p)
    with pytest.raises(qb.OutOfRangeError) as ei:
        img.read(2, 4095)
    assert ei.value.code == -101
    with pytest.raises(qb.OutOfRangeError):
        img.write(b"ab", 4095)
    img.close()
    with pytest.raises(qb.InvalidParamError):
        img.read(1, 0)
    img.close()  # harmless a second time


def test_read_only_refuses_writes(tmp):
    p = tmp / "e.raw"
    qb.create(p, qb.RawOptions(4096))
    with qb.open(p, flags=0) as img:
        with pytest.raises(qb.InvalidParamError):
            img.write(b"a", 0)


def test_missing_file_keeps_errno(tmp):
    with pytest.raises(qb.InternalError) as ei:
        qb.open(tmp / "nope.raw")
    assert ei.value.errno == 2
    assert "nope.raw" in ei.value.message
