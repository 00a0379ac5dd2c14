"""qed against qemu-img/qemu-io: images QEMU wrote read back byte for byte
and map as `qemu-img map` says; images we create are byte-identical to QEMU's
and pass `qemu-img check` after random writes of ours, comparing equal to a
model; the need-check flag is set while allocating writes are in flight and
cleared on flush/close; a writable open of an image left with the flag set
repairs what QEMU's check repairs. Hand-made corrupt images are refused with
CorruptImageError in a child process with bounded memory and time.

QEMU cannot open images with table_size=1 (its table offset check rejects a
one-cluster table), so the QEMU-facing tests use table_size >= 2."""

from __future__ import annotations

import json
import threading
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from conftest import qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "compressed", "offset")
F_BACKING, F_NEED_CHECK, F_NO_PROBE = 1, 2, 4

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 70001 200000",
    "write -z 1M 192k",
    "write -P 0x33 2M 4096",
    "write -z 2150000 3000",
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


def assert_reads_like_qemu(path, tmp):
    expected = qemu_raw_bytes(str(path), tmp)
    with qb.open(path, flags=0) as img:
        assert img.virt_size == len(expected)
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (65535, 65538), (len(expected) - 3, 3)):
            assert img.read(n, off) == expected[off : off + n], (off, n)
        assert strip([e.to_qemu_map() for e in img.map()]) == strip(qemu_map(str(path)))
    return expected


def check_clean(path):
    r = qemu_check(str(path))
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r
    return r


def features(path) -> int:
    return struct.unpack_from("<Q", Path(path).read_bytes(), 16)[0]


GEOMETRIES = {
    "default": (),
    "c4k-t2": ("-o", "cluster_size=4096,table_size=2"),
    "c16k-t16": ("-o", "cluster_size=16384,table_size=16"),
    "c1m-t4": ("-o", "cluster_size=1M,table_size=4"),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_read_and_map_what_qemu_wrote(tmp, name):
    p = tmp / "a.qed"
    qemu_img("create", "-f", "qed", *GEOMETRIES[name], str(p), "6M")
    qemu_io(str(p), *QEMU_IO_WRITES, fmt="qed")
    assert_reads_like_qemu(p, tmp)
    info = qemu_info(str(p))
    with qb.open(p, flags=0) as img:
        i = img.info()
        assert i.format is qb.Format.QED
        assert i.virt_size == info["virtual-size"]
        assert i.cluster_size == info["cluster-size"]
    # Our writes on top of QEMU's pass its check and read back in QEMU.
    with qb.open(p) as img:
        data = bytearray(img.read(img.virt_size, 0))
        img.write(b"\x66" * 100000, 3 * MiB - 7)
        img.write_zeroes(0, 200000)
        data[3 * MiB - 7 : 3 * MiB - 7 + 100000] = b"\x66" * 100000
        data[0:200000] = bytes(200000)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(data)
    assert features(p) & F_NEED_CHECK == 0


@pytest.mark.parametrize("opts", [dict(), dict(cluster_size=4096, table_size=2), dict(cluster_size=1 << 20, table_size=16)])
def test_create_matches_qemu(tmp, opts):
    ours, theirs = tmp / "ours.qed", tmp / "theirs.qed"
    qb.create(ours, qb.QedOptions(6 * MiB, **opts))
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    qemu_img("create", "-f", "qed", *(("-o", o) if o else ()), str(theirs), str(6 * MiB))
    assert ours.read_bytes() == theirs.read_bytes()
    info = qemu_info(str(ours))
    assert info["format"] == "qed" and info["virtual-size"] == 6 * MiB
    check_clean(ours)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", None])
def test_backing_file_and_format(tmp, fmt):
    base = tmp / "base.img"
    bfmt = fmt or "raw"
    qemu_img("create", "-f", bfmt, str(base), "5M")
    qemu_io(str(base), "write -P 0xb0 0 5M", "write -z 1M 64k", fmt=bfmt)
    ours, theirs = tmp / "ours.qed", tmp / "theirs.qed"
    kw = dict(backing=base.name)
    if fmt:
        kw["backing_fmt"] = qb.Format.from_str(fmt)
    qb.create(ours, qb.QedOptions(6 * MiB, **kw))
    qemu_img("create", "-f", "qed", "-b", base.name, "-F", bfmt, str(theirs), str(6 * MiB))
    if fmt:
        assert ours.read_bytes() == theirs.read_bytes()
    info = qemu_info(str(ours))
    assert info["backing-filename"] == base.name
    with qb.open(ours, flags=0) as img:
        i = img.info()
        assert i.backing_filename == base.name
        assert i.backing_format == (qb.Format.RAW if fmt == "raw" else None)
        assert (features(ours) & F_NO_PROBE != 0) == (fmt == "raw")
    qemu_io(str(theirs), "write -P 0xa1 10000 30000", "write -z 2M 64k", fmt="qed")
    assert_reads_like_qemu(theirs, tmp)
    # Partial-cluster writes of ours copy the backing data around them.
    with qb.open(ours) as img:
        img.write(b"\x01\x02\x03", 12345)
        img.write(b"\x04" * 70000, 5242800)
        img.write_zeroes(3 * MiB, 128 * KiB)
    check_clean(ours)
    expected = qemu_raw_bytes(str(ours), tmp)
    base_data = qemu_raw_bytes(str(base), tmp)
    assert expected[12345:12348] == b"\x01\x02\x03"
    assert expected[:12345] == base_data[:12345]
    assert expected[3 * MiB : 3 * MiB + 128 * KiB] == bytes(128 * KiB)
    assert expected[5242800 : 5242800 + 70000] == b"\x04" * 70000
    assert_reads_like_qemu(ours, tmp)


def test_need_check_flag(tmp):
    p = tmp / "n.qed"
    qb.create(p, qb.QedOptions(4 * MiB, cluster_size=4096, table_size=2))
    img = qb.open(p)
    img.write(b"x" * 10, 5000)
    # Set on disk before the allocating write, shown as dirty.
    assert features(p) & F_NEED_CHECK
    assert img.info().dirty
    img.flush()
    assert not img.info().dirty
    assert features(p) & F_NEED_CHECK == 0
    img.write(b"y" * 10, 5000)  # in place: no flag
    assert features(p) & F_NEED_CHECK == 0
    img.write(b"z" * 10, 3 * MiB)
    assert features(p) & F_NEED_CHECK
    img.close()
    assert features(p) & F_NEED_CHECK == 0
    check_clean(p)


def _dirty_with_bad_entries(tmp: Path) -> Path:
    """An image left with need-check set whose tables name clusters past
    the end of the file (a crash after the metadata reached the disk and
    before the data did)."""
    p = tmp / "d.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096,table_size=2", str(p), "4M")
    qemu_io(str(p), "write -P 0x11 0 8k", "write -P 0x22 2M 4k", fmt="qed")
    b = bytearray(p.read_bytes())
    l1 = 4096
    l2a = struct.unpack_from("<Q", b, l1)[0]
    struct.pack_into("<Q", b, l2a + 8, 1 << 30)  # cluster 1: past the end
    struct.pack_into("<Q", b, l1 + 8, 1 << 31)  # L1 entry 1: table past the end
    struct.pack_into("<Q", b, 16, F_NEED_CHECK)
    p.write_bytes(bytes(b))
    return p


def test_dirty_image_is_repaired_on_writable_open(tmp):
    p = _dirty_with_bad_entries(tmp)
    # Read-only: served as is, the bad entry refused when reached.
    with qb.open(p, flags=0) as img:
        assert img.read(4096, 0) == b"\x11" * 4096
        with pytest.raises(qb.CorruptImageError):
            img.read(4096, 4096)
    before = p.read_bytes()
    with qb.open(p, flags=0) as img:
        pass
    assert p.read_bytes() == before
    # Writable: the bad entries are dropped and the flag cleared.
    with qb.open(p) as img:
        assert img.read(8192, 0) == b"\x11" * 4096 + bytes(4096)
        assert img.read(4096, 2 * MiB) == b"\x22" * 4096
    assert features(p) & F_NEED_CHECK == 0
    # The dropped cluster leaks (exit code 3); nothing is corrupt.
    r = qemu_img("check", "--output=json", str(p), check=False)
    assert r.returncode in (0, 3) and json.loads(r.stdout).get("corruptions", 0) == 0, r.stdout
    # QEMU repairs the same image the same way.
    (tmp / "q").mkdir()
    q = _dirty_with_bad_entries(tmp / "q")
    qemu_img("check", "-r", "all", str(q), check=False)
    assert qemu_raw_bytes(str(q), tmp) == qemu_raw_bytes(str(p), tmp)


# --- random operations against a model -----------------------------------------

SIZE = 3 * MiB + 512
offsets = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 511, 4095, 4096, MiB - 1, 2 * MiB + 1, SIZE - 1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 100 * KiB), st.integers(1, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 200 * KiB), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
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
            p = d / "img.qed"
            kw = dict(cluster_size=4096, table_size=2)
            if backing:
                base = d / "base.raw"
                base.write_bytes(b"\xba" * MiB + bytes(MiB) + b"\xbb" * (SIZE - 2 * MiB - 4096))
                model[: SIZE - 4096] = base.read_bytes()
                kw.update(backing=base.name, backing_fmt=qb.Format.RAW)
            qb.create(p, qb.QedOptions(SIZE, **kw))
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
            check_clean(p)
            raw = d / "model.raw"
            raw.write_bytes(bytes(model))
            c = qemu_img("compare", "-f", "qed", "-F", "raw", str(p), str(raw), check=False)
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


CS = 4096


def _base(tmp: Path) -> bytearray:
    p = tmp / "base.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={CS},table_size=2", str(p), "4M")
    qemu_io(str(p), "write -P 0x11 0 8k", "write -z 1M 4k", fmt="qed")
    return bytearray(p.read_bytes())


def _set(b: bytearray, off: int, fmt: str, v: int) -> bytearray:
    struct.pack_into(fmt, b, off, v)
    return b


def _l2(b: bytearray) -> int:
    return struct.unpack_from("<Q", b, CS)[0]


HOSTILE = {
    "cluster-size-2k": lambda b: _set(b, 4, "<I", 2048),
    "cluster-size-not-pow2": lambda b: _set(b, 4, "<I", 12288),
    "cluster-size-huge": lambda b: _set(b, 4, "<I", 1 << 31),
    "table-size-3": lambda b: _set(b, 8, "<I", 3),
    "table-size-32": lambda b: _set(b, 8, "<I", 32),
    "header-size-0": lambda b: _set(b, 12, "<I", 0),
    "header-size-over-l1": lambda b: _set(b, 12, "<I", 2),
    "header-size-huge": lambda b: _set(b, 12, "<I", 0xFFFFFFFF),
    "image-size-unaligned": lambda b: _set(b, 48, "<Q", 4 * MiB + 1),
    "image-size-too-big": lambda b: _set(b, 48, "<Q", 1 << 62),
    "l1-offset-unaligned": lambda b: _set(b, 40, "<Q", CS + 8),
    "l1-offset-past-eof": lambda b: _set(b, 40, "<Q", 1 << 40),
    "l1-offset-wraps": lambda b: _set(b, 40, "<Q", (1 << 64) - CS),
    "l1-offset-in-header": lambda b: _set(b, 40, "<Q", 0),
    "backing-name-outside-header": lambda b: _set(_set(_set(b, 16, "<Q", F_BACKING), 56, "<I", 4000), 60, "<I", 500),
    "backing-name-offset-in-header-struct": lambda b: _set(_set(_set(b, 16, "<Q", F_BACKING), 56, "<I", 0), 60, "<I", 8),
    "l1-entry-past-eof": lambda b: _set(b, CS, "<Q", 1 << 40),
    "l1-entry-unaligned": lambda b: _set(b, CS, "<Q", _l2(b) + 8),
    "l1-entry-wraps": lambda b: _set(b, CS, "<Q", (1 << 64) - CS),
    "l1-entry-on-l1-table": lambda b: _set(b, CS, "<Q", CS),
    "l1-entry-on-header": lambda b: _set(b, CS, "<Q", 0x100),
    "l2-entry-past-eof": lambda b: _set(b, _l2(b), "<Q", 1 << 40),
    "l2-entry-unaligned": lambda b: _set(b, _l2(b), "<Q", 3 * CS + 1),
    "l2-entry-in-header": lambda b: _set(b, _l2(b), "<Q", 2),
}


@pytest.fixture(scope="module")
def hostile_base():
    with tempfile.TemporaryDirectory() as td:
        yield _base(Path(td))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_refused(tmp, hostile_base, name):
    b = HOSTILE[name](bytearray(hostile_base))
    p = tmp / f"{name}.qed"
    p.write_bytes(bytes(b))
    before = p.read_bytes()
    out = run_hostile(p, "qed")
    assert out["exc"] == "CorruptImageError", out
    assert p.read_bytes() == before
    out = run_hostile(p, "qed", rw=True)
    assert out["exc"] == "CorruptImageError", out


def test_unknown_feature_is_unsupported(tmp, hostile_base):
    p = tmp / "f.qed"
    p.write_bytes(bytes(_set(bytearray(hostile_base), 16, "<Q", 8)))
    assert run_hostile(p, "qed")["exc"] == "UnsupportedError"


def test_hostile_base_is_fine(tmp, hostile_base):
    p = tmp / "ok.qed"
    p.write_bytes(bytes(hostile_base))
    assert run_hostile(p, "qed")["exc"] is None
    assert run_hostile(p, "qed", rw=True)["exc"] is None
    check_clean(p)


def test_data_cluster_on_metadata_is_never_written(tmp, hostile_base):
    """A data cluster placed on the L1 table reads (as QEMU reads it) but
    is never written into: that would rewrite the table."""
    b = bytearray(hostile_base)
    struct.pack_into("<Q", b, _l2(b), CS)
    p = tmp / "overlap.qed"
    p.write_bytes(bytes(b))
    assert run_hostile(p, "qed")["exc"] is None
    before = p.read_bytes()
    assert run_hostile(p, "qed", rw=True)["exc"] == "CorruptImageError"
    assert p.read_bytes() == before


def test_threads_write_and_read_concurrently(tmp):
    """Writers on disjoint ranges and readers at once: no deadlock, and
    every byte as the writers left it."""
    p = tmp / "t.qed"
    qb.create(p, qb.QedOptions(8 * MiB, cluster_size=4096, table_size=2))
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
    check_clean(p)


def test_grow(tmp):
    p = tmp / "g.qed"
    qb.create(p, qb.QedOptions(3 * MiB, cluster_size=4096, table_size=2))
    with qb.open(p) as img:
        img.write(b"a" * 5000, 3 * MiB - 5000)
        img.truncate(5 * MiB)
        assert img.virt_size == 5 * MiB
        img.write(b"b" * 5000, 5 * MiB - 5000)
        with pytest.raises(qb.UnsupportedError):
            img.truncate(MiB)
    assert qemu_info(str(p))["virtual-size"] == 5 * MiB
    check_clean(p)
    data = qemu_raw_bytes(str(p), tmp)
    assert data[3 * MiB - 5000 : 3 * MiB] == b"a" * 5000
    assert data[3 * MiB : 5 * MiB - 5000] == bytes(2 * MiB - 5000)
    assert data[5 * MiB - 5000 :] == b"b" * 5000


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

    p = tmp / "m.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096,table_size=2", str(p), "2M")
    qemu_io(str(p), "write -P 0x11 0 8k", "write -z 1M 4k", fmt="qed")
    hot = [(0, 64), (4096, 16), (12288, 64)]
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
        q = tmp / f"mut{i}.qed"
        q.write_bytes(bytes(b))
        paths.append(str(q))
    r = subprocess.run(
        [sys.executable, "-c", MUTATION_CHILD, json.dumps(paths), "qed"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(seen) <= {None, "CorruptImageError", "UnsupportedError"}, seen


def test_largest_default_image(tmp):
    """64 TiB, the most the default geometry maps: map() is one extent and
    the last byte is writable; QEMU agrees."""
    p = tmp / "big.qed"
    size = 64 << 40
    qb.create(p, qb.QedOptions(size))
    with qb.open(p) as img:
        assert [(e.offset, e.length, e.present) for e in img.map()] == [(0, size, False)]
        img.write(b"\x99", size - 1)
        assert img.read(2, size - 2) == b"\x00\x99"
    assert qemu_info(str(p))["virtual-size"] == size
    check_clean(p)
    qemu_io(str(p), f"read -P 0x99 {size - 1} 1", fmt="qed")


def test_hand_made_header_of_two_clusters(tmp):
    """header_size 2 (QEMU never writes it but reads it): the tables start
    after both header clusters; our writes pass QEMU's check."""
    cs = 4096
    header = struct.pack("<4sIIIQQQQQII", b"QED\0", cs, 2, 2, 0, 0, 0, 2 * cs, 3 * MiB, 0, 0)
    p = tmp / "h2.qed"
    p.write_bytes(header + bytes(2 * cs - len(header)) + bytes(2 * cs))
    check_clean(p)
    model = bytearray(3 * MiB)
    with qb.open(p) as img:
        for off, n, v in ((0, 5000, 1), (MiB + 3, 9000, 2), (3 * MiB - 100, 100, 3)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
    check_clean(p)
    assert assert_reads_like_qemu(p, tmp) == bytes(model)


def test_table_size_1_which_qemu_cannot_open(tmp):
    """qemu-img creates table_size=1 images but cannot open them (its table
    check rejects one-cluster tables); we create the same bytes and serve them."""
    ours, theirs = tmp / "ours.qed", tmp / "theirs.qed"
    qemu_img("create", "-f", "qed", "-o", "table_size=1", str(theirs), "4M")
    qb.create(ours, qb.QedOptions(4 * MiB, table_size=1))
    assert ours.read_bytes() == theirs.read_bytes()
    assert "table offset is invalid" in qemu_img("info", str(theirs), check=False).stderr
    with qb.open(theirs) as img:
        img.write(b"\x31" * 70000, 12345)
        img.write_zeroes(MiB, 65536)
    with qb.open(theirs, flags=0) as img:
        assert img.read(4 * MiB, 0) == bytes(12345) + b"\x31" * 70000 + bytes(4 * MiB - 82345)
