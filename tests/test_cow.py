"""cow (User Mode Linux copy-on-write v2, in the layout of QEMU <= 2.1's
block/cow.c): QEMU no longer ships it, so there is no oracle. Tested by the
exact bytes of the headers we create, by round trips (random writes against
a model, reopened), by reads through raw and qcow2 backing files, and by
hand-made corrupt images refused with CorruptImageError in a child process
with bounded memory and time."""

from __future__ import annotations

import json
import threading
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from conftest import qemu_img, qemu_io, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
HEADER = 1056


def expected_header(name: str, mtime: int, size: int) -> bytes:
    h = bytearray(HEADER)
    struct.pack_into(">II", h, 0, 0x4F4F4F4D, 2)
    h[8 : 8 + len(name)] = name.encode()
    struct.pack_into(">I", h, 1032, mtime)
    struct.pack_into(">Q", h, 1040, size)
    struct.pack_into(">I", h, 1048, 512)
    return bytes(h)


def test_header_bytes_without_backing(tmp):
    p = tmp / "a.cow"
    qb.create(p, qb.CowOptions(10 * MiB))
    b = p.read_bytes()
    # Header, then the zeroed bitmap (one bit per sector); nothing else.
    assert len(b) == HEADER + 10 * MiB // 512 // 8
    assert b[:HEADER] == expected_header("", 0, 10 * MiB)
    assert b[:8] == b"OOOM\x00\x00\x00\x02"
    assert b[HEADER:] == bytes(len(b) - HEADER)
    with qb.open(p, flags=0) as img:
        i = img.info()
        assert i.format is qb.Format.COW and i.virt_size == 10 * MiB
        assert i.backing_location is None
        assert img.read(10 * MiB, 0) == bytes(10 * MiB)
        assert [(e.allocated, e.length) for e in img.map()] == [(False, 10 * MiB)]


def test_header_bytes_with_backing_and_size_from_backing(tmp):
    base = tmp / "base.raw"
    base.write_bytes(bytes(range(256)) * (3 * MiB // 256 + 2))  # 3 MiB + 512
    os.utime(base, (1_500_000_000, 1_600_000_123))
    p = tmp / "t.cow"
    qb.create(p, qb.CowOptions(0, backing=base.name))
    size = base.stat().st_size
    b = p.read_bytes()
    assert b[:HEADER] == expected_header("base.raw", 1_600_000_123, size)
    assert len(b) == HEADER + (size // 512 + 7) // 8
    with qb.open(p, flags=0) as img:
        i = img.info()
        assert i.virt_size == size and i.backing_filename == "base.raw"
        assert img.read(size, 0) == base.read_bytes()
        assert [(e.depth, e.length) for e in img.map()] == [(1, size)]


def test_writes_read_through_backing(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(str(base), "write -P 0xb1 0 4M", "write -P 0xb2 1M 64k")
    model = bytearray(4 * MiB)
    model[:] = b"\xb1" * (4 * MiB)
    model[MiB : MiB + 64 * KiB] = b"\xb2" * (64 * KiB)
    p = tmp / "t.cow"
    qb.create(p, qb.CowOptions(5 * MiB, backing=base.name))
    model += bytes(MiB)  # past the backing file's end: zeroes
    with qb.open(p) as img:
        for off, n, v in ((1, 1, 1), (700, 1000, 2), (MiB - 3, 10, 3), (4 * MiB - 100, 300, 4), (5 * MiB - 1, 1, 5)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        assert img.read(len(model), 0) == bytes(model)
    with qb.open(p, flags=0) as img:
        assert img.read(len(model), 0) == bytes(model)
        m = [(e.offset, e.length, e.allocated, e.depth) for e in img.map()]
        # Written sectors are in the top layer; the rest comes from below.
        assert m[0] == (0, 512 * 4, True, 0)
        assert m[1][2:] == (False, 1)
        bs = img.block_status(2 * MiB, 4096)
        assert not bs.allocated and bs.depth == 1 and bs.data
        bs = img.block_status(4 * MiB + 4096, 4096)
        assert not bs.allocated and bs.zero


def test_backing_loop_is_corrupt(tmp):
    p = tmp / "loop.cow"
    other = tmp / "other.raw"
    other.write_bytes(bytes(MiB))
    qb.create(p, qb.CowOptions(MiB, backing=other.name))
    b = bytearray(p.read_bytes())
    b[8 : 8 + len("loop.cow") + 4] = b"loop.cow\0\0\0\0"
    p.write_bytes(bytes(b))
    with pytest.raises(qb.CorruptImageError):
        qb.open(p, flags=0)


# --- random operations against a model -----------------------------------------

SIZE = 2 * MiB + 512
offsets = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 511, 512, 4095, 32767, 32768, MiB - 1, SIZE - 1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 100 * KiB), st.integers(1, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 100 * KiB), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


@pytest.mark.parametrize("backing", [False, True])
def test_random_ops_against_model(backing):
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            d = Path(td)
            model = bytearray(SIZE)
            p = d / "img.cow"
            if backing:
                base = d / "base.raw"
                data = bytes((i * 13 + 7) & 0xFF for i in range(4096)) * ((SIZE - 4096) // 4096)
                base.write_bytes(data)
                model[: len(data)] = data
                qb.create(p, qb.CowOptions(SIZE, backing=base.name))
            else:
                qb.create(p, qb.CowOptions(SIZE))
            img = qb.open(p)
            try:
                for op, off, n, v in seq:
                    n = min(n, SIZE - off)
                    if op == "write":
                        img.write(bytes([v]) * n, off)
                        model[off : off + n] = bytes([v]) * n
                    elif op == "zero":
                        img.write_zeroes(off, n)
                        model[off : off + n] = bytes(n)
                    elif op == "flush":
                        img.flush()
                    else:
                        img.close()
                        img = qb.open(p)
                assert img.read(SIZE, 0) == bytes(model)
            finally:
                if not img.closed:
                    img.close()
            # The bitmap says exactly which sectors were written.
            with qb.open(p, flags=0) as img:
                assert img.read(SIZE, 0) == bytes(model)
                for e in img.map():
                    assert e.offset % 512 == 0 and e.length % 512 == 0 or e.offset + e.length == SIZE

    run()


# --- hostile images ------------------------------------------------------------

CHILD = r"""
import json, resource, sys
p = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
out = {"exc": None, "msg": None}
try:
    import libqblock as qb
    with qb.open(p["path"], fmt=qb.Format.from_str(p["fmt"]), flags=qb.O_RDWR if p["rw"] else 0) as img:
        img.info()
        size = img.virt_size
        pos = 0
        while pos < size:
            n = min(1 << 20, size - pos)
            img.read(n, pos)
            pos += n
        list(img.map())
        if p["rw"]:
            img.write(b"x" * 5000, min(1000, max(size - 5000, 0)))
except Exception as e:
    out["exc"], out["msg"] = type(e).__name__, str(e)
print(json.dumps(out))
"""


def run_hostile(path: Path, fmt: str, rw: bool = False) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"path": str(path), "fmt": fmt, "rw": rw})],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stdout}{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _set(b: bytearray, off: int, fmt: str, v: int) -> bytearray:
    struct.pack_into(fmt, b, off, v)
    return b


def _name(b: bytearray, raw: bytes) -> bytearray:
    b[8 : 8 + 1024] = raw.ljust(1024, b"\0")[:1024]
    return b


HOSTILE = {
    "bad-magic": lambda b: _set(b, 0, ">I", 0x4F4F4F4E),
    "short-header": lambda b: b[:1000],
    "header-only": lambda b: b[:HEADER],
    "name-not-terminated": lambda b: _name(b, b"a" * 1024),
    "name-not-utf8": lambda b: _name(b, b"\xff\xfe.raw"),
    "size-max": lambda b: _set(b, 1040, ">Q", (1 << 64) - 1),
    "size-2-62-plus": lambda b: _set(b, 1040, ">Q", (1 << 62) + 512),
    "size-bitmap-past-eof": lambda b: _set(b, 1040, ">Q", 1 << 40),
    "sectorsize-0": lambda b: _set(b, 1048, ">I", 0),
    "sectorsize-1000": lambda b: _set(b, 1048, ">I", 1000),
    "sectorsize-huge": lambda b: _set(b, 1048, ">I", 0xFFFFFFFF),
    "backing-is-itself": lambda b: _name(b, b"self.cow"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_refused(tmp, name):
    good = tmp / "good.cow"
    qb.create(good, qb.CowOptions(4 * MiB))
    with qb.open(good) as img:
        img.write(b"\x42" * 10000, 3000)
    b = HOSTILE[name](bytearray(good.read_bytes()))
    p = tmp / "self.cow"
    p.write_bytes(bytes(b))
    before = p.read_bytes()
    out = run_hostile(p, "cow")
    assert out["exc"] == "CorruptImageError", out
    assert p.read_bytes() == before
    out = run_hostile(p, "cow", rw=True)
    assert out["exc"] == "CorruptImageError", out


def test_unsupported_sector_size_and_version(tmp):
    good = tmp / "good.cow"
    qb.create(good, qb.CowOptions(MiB))
    for off, v in ((1048, 4096), (4, 3)):
        p = tmp / f"u{off}.cow"
        p.write_bytes(bytes(_set(bytearray(good.read_bytes()), off, ">I", v)))
        assert run_hostile(p, "cow")["exc"] == "UnsupportedError"


def test_probe(tmp):
    p = tmp / "p.cow"
    qb.create(p, qb.CowOptions(MiB))
    with qb.open(p, flags=0) as img:
        assert img.info().format is qb.Format.COW


def test_threads_write_and_read_concurrently(tmp):
    """Writers on disjoint ranges and readers at once: no deadlock, and
    every byte as the writers left it."""
    p = tmp / "t.cow"
    qb.create(p, qb.CowOptions(8 * MiB))
    errors = []

    def writer(k):
        try:
            for i in range(40):
                off = k * 2 * MiB + i * 50000 + k
                img.write(bytes([k + 1]) * 7000, off)
                if i % 10 == 9:
                    img.flush()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader():
        try:
            for i in range(200):
                img.read(65536, (i * 40961) % (8 * MiB - 65536))
                img.block_status((i * 4096) % (8 * MiB), 4096)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with qb.open(p) as img:
        ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        ts += [threading.Thread(target=reader) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in ts) and not errors, errors
    model = bytearray(8 * MiB)
    for k in range(4):
        for i in range(40):
            off = k * 2 * MiB + i * 50000 + k
            model[off : off + 7000] = bytes([k + 1]) * 7000
    with qb.open(p, flags=0) as img:
        assert img.read(8 * MiB, 0) == bytes(model)


MUTATION_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import libqblock as qb
paths, fmt = json.loads(sys.argv[1]), sys.argv[2]
seen = []
for path in paths:
    name = None
    try:
        with qb.open(path, fmt=qb.Format.from_str(fmt), flags=qb.O_RDWR) as img:
            size = img.virt_size
            for pos in range(0, min(size, 8 << 20), 1 << 20):
                img.read(min(1 << 20, size - pos), pos)
            list(img.map())
            if size:
                img.write(b"m" * 3000, size // 3)
                img.read(min(size, 1 << 20), 0)
    except qb.QBlockError as e:
        name = type(e).__name__
    seen.append(name)
print(json.dumps(seen))
"""


def test_random_mutations_never_crash(tmp):
    """Bytes of the header and tables flipped at random (seeded): every
    image opens and reads, or fails with CorruptImageError or
    UnsupportedError; never a crash, a hang or another error class."""
    import random

    p = tmp / "m.cow"
    qb.create(p, qb.CowOptions(2 * MiB))
    with qb.open(p) as img:
        img.write(b"\x42" * 10000, 3000)
    hot = [(0, 8), (1032, 24), (1056, 16)]
    good = p.read_bytes()
    rng = random.Random(1234)
    paths = []
    for i in range(60):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            start, n = rng.choice(hot)
            at = start + rng.randrange(n)
            if at < len(b):
                b[at] = rng.choice([0, 1, 0x80, 0xFF, rng.randrange(256)])
        q = tmp / f"mut{i}.cow"
        q.write_bytes(bytes(b))
        paths.append(str(q))
    r = subprocess.run(
        [sys.executable, "-c", MUTATION_CHILD, json.dumps(paths), "cow"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(seen) <= {None, "CorruptImageError", "UnsupportedError"}, seen


def test_chain_of_every_format_of_issue_4(tmp):
    """cow over qed over qcow over raw: each layer falls through to the one
    below, probed where nothing is recorded; QEMU reads the qed/qcow part
    the same way."""
    base, q1, qe, top = tmp / "base.raw", tmp / "mid.qcow", tmp / "mid.qed", tmp / "top.cow"
    model = bytearray(b"\xa0" * (3 * MiB))
    base.write_bytes(bytes(model))
    qb.create(q1, qb.QcowOptions(3 * MiB, backing=base.name, backing_fmt=qb.Format.RAW))
    qb.create(qe, qb.QedOptions(4 * MiB, backing=q1.name, backing_fmt=qb.Format.QCOW, cluster_size=4096, table_size=2))
    qb.create(top, qb.CowOptions(0, backing=qe.name))
    model += bytes(MiB)
    for path, off, n, v in ((q1, 100000, 5000, 1), (qe, 2 * MiB - 100, 300, 2), (top, 4 * MiB - 700, 700, 3)):
        with qb.open(path) as img:
            img.write(bytes([v]) * n, off)
        model[off : off + n] = bytes([v]) * n
    with qb.open(top, flags=0) as img:
        assert img.virt_size == 4 * MiB
        assert img.read(4 * MiB, 0) == bytes(model)
        depths = {e.depth for e in img.map()}
        assert depths == {0, 1, 2, 3}
    # The qed layer, as QEMU sees it (it probes the qcow below).
    assert qemu_raw_bytes(str(qe), tmp) == bytes(model[: 4 * MiB - 700]) + bytes(700)
