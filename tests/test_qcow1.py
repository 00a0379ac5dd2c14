"""qcow (version 1) against qemu-img/qemu-io: images QEMU wrote (plain,
compressed, over a backing file) read back byte for byte and map as `qemu-img
map` says; images we create are byte-identical to QEMU's, and random writes
of ours compare equal to a model under `qemu-img compare` (QEMU has no
`check` for qcow). Hand-made corrupt images are refused with
CorruptImageError in a child process with bounded memory and time."""

from __future__ import annotations

import json
import threading
import os
import resource
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from conftest import qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "compressed", "offset")

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 70001 200000",
    "write -z 1M 192k",
    "write -P 0x33 2M 4096",
    "write -P 0x44 3145721 17",
    "write -P 0x55 5000000 70000",
)


def strip(entries):
    out = []
    for e in entries:
        e = {k: e[k] for k in MAP_KEYS if k in e}
        if out:
            last = out[-1]
            same = all(last.get(k) == e.get(k) for k in MAP_KEYS if k not in ("start", "length", "offset"))
            cont = ("offset" in last) == ("offset" in e) and (
                "offset" not in e or last["offset"] + last["length"] == e["offset"]
            )
            if same and cont and last["start"] + last["length"] == e["start"]:
                last["length"] += e["length"]
                continue
        out.append(e)
    return out


def assert_reads_like_qemu(path, tmp, compare_map=True):
    expected = qemu_raw_bytes(str(path), tmp)
    with qb.open(path, flags=0) as img:
        assert img.virt_size == len(expected)
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (65535, 65538), (len(expected) - 3, 3)):
            assert img.read(n, off) == expected[off : off + n], (off, n)
        if compare_map:
            ours = [e.to_qemu_map() for e in img.map()]
            assert strip(ours) == strip(qemu_map(str(path)))
    return expected


def test_read_and_map_what_qemu_wrote(tmp):
    p = tmp / "a.qcow"
    qemu_img("create", "-f", "qcow", str(p), "6M")
    qemu_io(str(p), *QEMU_IO_WRITES, fmt="qcow")
    assert_reads_like_qemu(p, tmp)
    info = qemu_info(str(p))
    with qb.open(p, flags=0) as img:
        i = img.info()
        assert i.format is qb.Format.QCOW
        assert i.virt_size == info["virtual-size"]
        assert i.cluster_size == info["cluster-size"]
        assert i.backing_location is None


def test_compressed_clusters(tmp):
    # `qemu-img convert -c -O qcow` fails in QEMU 10; qemu-io writes
    # compressed clusters one at a time.
    p = tmp / "c.qcow"
    qemu_img("create", "-f", "qcow", str(p), "3M")
    cmds = [f"write -c -P {0x20 + i} {i * 4096} 4k" for i in range(6)]
    cmds += ["write -c -P 0x66 2M 4k", "write -P 0x67 1M 8k"]
    qemu_io(str(p), *cmds, fmt="qcow")
    assert any(e.get("compressed") for e in qemu_map(str(p)))
    data = bytearray(assert_reads_like_qemu(p, tmp))
    # Writing into compressed clusters decompresses them into plain ones.
    with qb.open(p) as img:
        img.write(b"\xee" * 10, 2 * MiB + 4090)
        img.write_zeroes(4096 * 3, 4096 * 2)
        img.write(b"\xef" * 100, 100)
        data[2 * MiB + 4090 : 2 * MiB + 4100] = b"\xee" * 10
        data[4096 * 3 : 4096 * 5] = bytes(4096 * 2)
        data[100:200] = b"\xef" * 100
        assert img.read(len(data), 0) == bytes(data)
    assert qemu_raw_bytes(str(p), tmp) == bytes(data)


def test_backing_file_both_ways(tmp):
    base, top = tmp / "base.raw", tmp / "top.qcow"
    qemu_img("create", "-f", "raw", str(base), "5M")
    qemu_io(str(base), "write -P 0xb0 0 5M", "write -z 1M 64k", fmt="raw")
    qemu_img("create", "-f", "qcow", "-b", base.name, "-F", "raw", str(top), "6M")
    qemu_io(str(top), "write -P 0xa1 10000 30000", "write -P 0xa2 5242870 20", fmt="qcow")
    assert_reads_like_qemu(top, tmp)
    with qb.open(top, flags=0) as img:
        i = img.info()
        assert i.backing_filename == base.name
        assert qemu_info(str(top))["backing-filename"] == base.name
    # Partial-cluster writes of ours copy the backing data around them.
    with qb.open(top) as img:
        img.write(b"\x01\x02\x03", 12345)
        img.write(b"\x04" * 70000, 5242800)
    expected = qemu_raw_bytes(str(top), tmp)
    assert expected[12345:12348] == b"\x01\x02\x03"
    assert expected[5242800 : 5242800 + 70000] == b"\x04" * 70000
    with qb.open(top, flags=0) as img:
        assert img.read(len(expected), 0) == expected
    # An image we create over the same backing file: as QEMU's, byte for byte.
    ours, theirs = tmp / "ours.qcow", tmp / "theirs.qcow"
    qb.create(ours, qb.QcowOptions(0, backing=base.name))
    qemu_img("create", "-f", "qcow", "-b", base.name, "-F", "raw", str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("size", [512, 6 * MiB, 6 * MiB + 512, 3 << 30])
def test_create_matches_qemu(tmp, size):
    ours, theirs = tmp / "ours.qcow", tmp / "theirs.qcow"
    qb.create(ours, qb.QcowOptions(size))
    qemu_img("create", "-f", "qcow", str(theirs), str(size))
    assert ours.read_bytes() == theirs.read_bytes()
    info = qemu_info(str(ours))
    assert info["format"] == "qcow" and info["virtual-size"] == size


def test_writes_of_ours_read_by_qemu(tmp):
    p = tmp / "w.qcow"
    qb.create(p, qb.QcowOptions(6 * MiB))
    model = bytearray(6 * MiB)
    with qb.open(p) as img:
        for off, n, v in ((1000, 5000, 1), (70001, 200000, 2), (3145721, 17, 3), (6 * MiB - 100, 100, 4)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    # And QEMU's writes on top of ours read back.
    qemu_io(str(p), "write -P 0x77 4000 10000", fmt="qcow")
    model[4000:14000] = b"\x77" * 10000
    assert assert_reads_like_qemu(p, tmp) == bytes(model)


def test_zero_size_is_refused_as_in_qemu(tmp):
    base = tmp / "empty.raw"
    base.write_bytes(b"")
    with pytest.raises(qb.InvalidParamError):
        qb.create(tmp / "z.qcow", qb.QcowOptions(0, backing=base.name, backing_fmt=qb.Format.RAW))
    assert qemu_img("create", "-f", "qcow", str(tmp / "q.qcow"), "0", check=False).returncode != 0


def test_encryption_is_unsupported(tmp):
    with pytest.raises(qb.UnsupportedError):
        qb.create(tmp / "e.qcow", qb.QcowOptions(MiB, encrypt=True))
    p = tmp / "e2.qcow"
    qb.create(p, qb.QcowOptions(MiB))
    b = bytearray(p.read_bytes())
    b[36:40] = struct.pack(">I", 1)  # crypt_method = AES
    p.write_bytes(bytes(b))
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, flags=0)


# --- random operations against a model -----------------------------------------

SIZE = 3 * MiB + 512
offsets = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 511, 4095, 4096, MiB - 1, 2 * MiB + 1, SIZE - 1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 100 * KiB), st.integers(1, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 100 * KiB), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.parametrize("backing", [False, True])
def test_random_ops_against_model(backing):
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            d = Path(td)
            model = bytearray(SIZE)
            p = d / "img.qcow"
            if backing:
                base = d / "base.raw"
                base.write_bytes(b"\xba" * MiB + bytes(MiB) + b"\xbb" * (SIZE - 2 * MiB - 4096))
                model[: SIZE - 4096] = base.read_bytes()
                qb.create(p, qb.QcowOptions(SIZE, backing=base.name, backing_fmt=qb.Format.RAW))
            else:
                qb.create(p, qb.QcowOptions(SIZE))
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
                    else:
                        img.close()
                        img = qb.open(p)
                assert img.read(SIZE, 0) == bytes(model)
            finally:
                if not img.closed:
                    img.close()
            raw = d / "model.raw"
            raw.write_bytes(bytes(model))
            c = qemu_img("compare", "-f", "qcow", "-F", "raw", str(p), str(raw), check=False)
            assert c.returncode == 0, c.stdout + c.stderr

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


def _base(tmp: Path) -> bytearray:
    """A 4 MiB image with a few plain clusters and one compressed cluster."""
    p = tmp / "base.qcow"
    qemu_img("create", "-f", "qcow", str(p), "4M")
    qemu_io(str(p), "write -c -P 0x11 0 4k", "write -P 0x5a 1M 8k", fmt="qcow")
    return bytearray(p.read_bytes())


def _l1(b: bytearray, i: int) -> int:
    return struct.unpack_from(">Q", b, 48 + 8 * i)[0]


def _first_l2_entry_offset(b: bytearray) -> int:
    return _l1(b, 0)


def _set(b: bytearray, off: int, fmt: str, v: int) -> bytearray:
    struct.pack_into(fmt, b, off, v)
    return b


HOSTILE = {
    "size-1": lambda b: _set(b, 24, ">Q", 1),
    "size-huge": lambda b: _set(b, 24, ">Q", (1 << 64) - 4096),
    "size-l1-beyond-file": lambda b: _set(b, 24, ">Q", 1 << 45),
    "cluster-bits-8": lambda b: _set(b, 32, ">B", 8),
    "cluster-bits-17": lambda b: _set(b, 32, ">B", 17),
    "l2-bits-5": lambda b: _set(b, 33, ">B", 5),
    "l2-bits-14": lambda b: _set(b, 33, ">B", 14),
    "crypt-method-7": lambda b: _set(b, 36, ">I", 7),
    "l1-offset-past-eof": lambda b: _set(b, 40, ">Q", 1 << 40),
    "l1-offset-wraps": lambda b: _set(b, 40, ">Q", (1 << 64) - 8),
    "backing-name-too-long": lambda b: _set(_set(b, 8, ">Q", 48), 16, ">I", 4096),
    "backing-name-past-eof": lambda b: _set(_set(b, 8, ">Q", 1 << 33), 16, ">I", 10),
    "l1-entry-past-eof": lambda b: _set(b, 48, ">Q", 1 << 40),
    "l1-entry-wraps": lambda b: _set(b, 48, ">Q", (1 << 64) - 100),
    "l1-entry-on-l1-table": lambda b: _set(b, 48, ">Q", 48),
    "l1-entry-on-header": lambda b: _set(b, 48, ">Q", 8),
    "l2-entry-unaligned": lambda b: _set(b, _first_l2_entry_offset(b), ">Q", 4097),
    "l2-entry-past-eof": lambda b: _set(b, _first_l2_entry_offset(b), ">Q", 1 << 50),
    "l2-entry-compressed-past-eof": lambda b: _set(
        b, _first_l2_entry_offset(b), ">Q", (1 << 63) | (4000 << 51) | (1 << 40)
    ),
    "l2-entry-compressed-size-0": lambda b: _set(b, _first_l2_entry_offset(b), ">Q", (1 << 63) | 4096),
    "compressed-garbage": lambda b: _set(b, _first_l2_entry_offset(b), ">Q", (1 << 63) | (200 << 51) | 0),
}


@pytest.fixture(scope="module")
def hostile_base():
    with tempfile.TemporaryDirectory() as td:
        yield _base(Path(td))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_refused(tmp, hostile_base, name):
    b = HOSTILE[name](bytearray(hostile_base))
    p = tmp / f"{name}.qcow"
    p.write_bytes(bytes(b))
    before = p.read_bytes()
    out = run_hostile(p, "qcow")
    assert out["exc"] == "CorruptImageError", out
    assert p.read_bytes() == before
    out = run_hostile(p, "qcow", rw=True)
    assert out["exc"] == "CorruptImageError", out


def test_hostile_base_is_fine(tmp, hostile_base):
    p = tmp / "ok.qcow"
    p.write_bytes(bytes(hostile_base))
    assert run_hostile(p, "qcow")["exc"] is None
    assert run_hostile(p, "qcow", rw=True)["exc"] is None


def test_data_cluster_on_metadata_is_never_written(tmp, hostile_base):
    """A data cluster placed on the image's own L2 table reads (as QEMU
    reads it) but is never written into: that would rewrite the table."""
    b = bytearray(hostile_base)
    l2 = _first_l2_entry_offset(b)
    struct.pack_into(">Q", b, l2, l2)
    p = tmp / "overlap.qcow"
    p.write_bytes(bytes(b))
    assert run_hostile(p, "qcow")["exc"] is None
    before = p.read_bytes()
    assert run_hostile(p, "qcow", rw=True)["exc"] == "CorruptImageError"
    assert p.read_bytes() == before


def test_threads_write_and_read_concurrently(tmp):
    """Writers on disjoint ranges and readers at once: no deadlock, and
    every byte as the writers left it."""
    p = tmp / "t.qcow"
    qb.create(p, qb.QcowOptions(8 * MiB))
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

    p = tmp / "m.qcow"
    qemu_img("create", "-f", "qcow", str(p), "2M")
    qemu_io(str(p), "write -c -P 0x11 0 4k", "write -P 0x22 1M 12k", fmt="qcow")
    hot = [(0, 48), (48, 8), (4096, 64)]
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
        q = tmp / f"mut{i}.qcow"
        q.write_bytes(bytes(b))
        paths.append(str(q))
    r = subprocess.run(
        [sys.executable, "-c", MUTATION_CHILD, json.dumps(paths), "qcow"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(seen) <= {None, "CorruptImageError", "UnsupportedError"}, seen


def test_large_sparse_image(tmp):
    """1 TiB: a 4 MiB L1 table; map() is one extent and the last byte is writable."""
    import time

    p = tmp / "big.qcow"
    size = 1 << 40
    qb.create(p, qb.QcowOptions(size))
    t = time.monotonic()
    with qb.open(p) as img:
        assert [(e.offset, e.length, e.present) for e in img.map()] == [(0, size, False)]
        img.write(b"\x99", size - 1)
        assert img.read(2, size - 2) == b"\x00\x99"
    assert time.monotonic() - t < 10
    assert qemu_info(str(p))["virtual-size"] == size
    qemu_io(str(p), "read -P 0x99 1099511627775 1", fmt="qcow")


@pytest.mark.parametrize("cluster_bits,l2_bits", [(9, 6), (16, 13), (12, 13), (16, 6), (9, 13)])
def test_every_geometry_qemu_accepts(tmp, cluster_bits, l2_bits):
    """QEMU creates only two geometries but reads every one from 512 B to
    64 KiB clusters and 512 B to 64 KiB L2 tables: hand-made empty images of
    each, written by us, read back identically in QEMU (data and map)."""
    size = 5 * MiB + 512
    span = 1 << (cluster_bits + l2_bits)
    l1_entries = -(-size // span)
    header = struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 0, 0, 0, size, cluster_bits, l2_bits, 0, 0, 48)
    p = tmp / "g.qcow"
    p.write_bytes(header + bytes(-(-(l1_entries * 8) // 512) * 512))
    model = bytearray(size)
    with qb.open(p) as img:
        for off, n, v in ((1, 1, 1), (700, 100000, 2), (3 * MiB - 9, 70000, 3), (size - 513, 513, 4)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
    assert assert_reads_like_qemu(p, tmp) == bytes(model)
    with qb.open(p, flags=0) as img:
        assert img.info().cluster_size == 1 << cluster_bits == qemu_info(str(p))["cluster-size"]
