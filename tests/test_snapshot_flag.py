"""O_SNAPSHOT: writes go to a temporary qcow2 overlay and are discarded at
close (QEMU's -snapshot). The image itself is never written, the overlay
leaves nothing behind, and queries answer for the opened image as if the
session's writes were in it."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

import libqblock as qb

from conftest import qemu_img, qemu_io

MiB = 1 << 20
SNAP = qb.O_RDWR | qb.O_SNAPSHOT


def digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def tmpdir_env(tmp, monkeypatch):
    """A private TMPDIR, to see what the overlay leaves there."""
    d = tmp / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def qemu_image(tmp):
    """A qcow2 over a raw base, both holding data: a chain of two layers."""
    base = tmp / "base.raw"
    base.write_bytes(bytes([0x11]) * (4 * MiB))
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top), "4M")
    qemu_io(str(top), "write -P 0x22 1M 64k", "write -z 2M 64k")
    return base, top


def test_writes_are_seen_then_discarded(tmp, tmpdir_env):
    base, top = qemu_image(tmp)
    before = {p: (digest(p), os.stat(p).st_mtime_ns) for p in (base, top)}
    model = bytearray(qb.open(top, flags=0).read(4 * MiB, 0))
    with qb.open(top, flags=SNAP) as img:
        assert list(tmpdir_env.iterdir()) == []  # unlinked as soon as it is open
        for off, n, v in ((0, 4096, 1), (1 * MiB + 100, 70000, 2), (3 * MiB - 1, 2, 3), (4 * MiB - 512, 512, 4)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        img.write_zeroes(2 * MiB + 65536, 65536)
        model[2 * MiB + 65536 : 2 * MiB + 131072] = bytes(65536)
        img.discard(3 * MiB, 65536)  # over a backing file: reads as zeroes
        model[3 * MiB : 3 * MiB + 65536] = bytes(65536)
        img.flush()
        assert img.read(4 * MiB, 0) == bytes(model)
        assert img.format is qb.Format.QCOW2
    assert {p: (digest(p), os.stat(p).st_mtime_ns) for p in (base, top)} == before
    assert list(tmpdir_env.iterdir()) == []
    r = qemu_img("check", str(top), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_queries_answer_for_the_opened_image(tmp, tmpdir_env):
    base, top = qemu_image(tmp)
    with qb.open(top, flags=0) as plain:
        want_map = [e.to_qemu_map() for e in plain.map()]
        want_info = plain.info()
        want_alloc = plain.check_allocation(0, 4 * MiB)
    with qb.open(top, flags=SNAP) as img:
        # Nothing written yet: the same answers as a plain open.
        assert [e.to_qemu_map() for e in img.map()] == want_map
        assert img.check_allocation(0, 4 * MiB) == want_alloc
        info = img.info()
        assert info.location == want_info.location and info.format is qb.Format.QCOW2
        assert info.backing_location == want_info.backing_location
        assert info.virt_size == 4 * MiB
        # A session write is part of the top layer; what it did not touch
        # keeps its own depth (base data stays at depth 1).
        img.write(b"\x99" * 65536, 0)
        st = img.block_status(0, 4 * MiB)
        assert (st.allocated, st.data, st.depth, st.length) == (True, True, 0, 65536)
        st = img.block_status(65536, 4 * MiB - 65536)
        assert (st.allocated, st.depth) == (False, 1)
        st = img.block_status(1 * MiB, 65536)
        assert (st.allocated, st.data, st.depth) == (True, True, 0)
        assert img.check_allocation(0, 65536 * 2) == (True, 65536)
        assert img.check_allocation(65536, 65536) == (False, 65536)


def test_raw_image_and_growing(tmp, tmpdir_env):
    p = tmp / "disk.raw"
    p.write_bytes(os.urandom(2 * MiB))
    before = digest(p)
    with qb.open(p, qb.Format.RAW, flags=SNAP) as img:
        img.truncate(3 * MiB)
        img.write(b"\x42" * 1000, 3 * MiB - 1000)
        assert img.virt_size == 3 * MiB
        assert img.read(1000, 3 * MiB - 1000) == b"\x42" * 1000
        assert img.read(4096, 2 * MiB) == bytes(4096)
        assert img.read(2 * MiB, 0) == p.read_bytes()
    assert digest(p) == before and os.path.getsize(p) == 2 * MiB


def test_without_rdwr_it_is_a_read_only_open(tmp, tmpdir_env):
    base, top = qemu_image(tmp)
    with qb.open(top, flags=qb.O_SNAPSHOT) as img:
        with pytest.raises(qb.InvalidParamError):
            img.write(b"x", 0)
        assert img.read(65536, 1 * MiB) == b"\x22" * 65536


def test_a_missing_temporary_folder_is_a_clear_error(tmp, monkeypatch):
    _, top = qemu_image(tmp)
    monkeypatch.setenv("TMPDIR", str(tmp / "no" / "such" / "dir"))
    with pytest.raises(qb.InternalError) as e:
        qb.open(top, flags=SNAP)
    assert "O_SNAPSHOT" in e.value.message and e.value.errno == errno.ENOENT
