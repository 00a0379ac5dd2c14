"""parallels against qemu-img/qemu-io: images QEMU wrote read back byte for
byte and map as `qemu-img map` says; images we create and write pass
`qemu-img check` and compare identical to a model; the in-use flag behaves
as QEMU's; the corpus images (v1, v2, with a bitmap extension, .hdd bundles)
decode to QEMU's hashes; hand-made corrupt images are refused quickly with
bounded memory.

There is no ParallelsOptions class in libqblock.options yet, so images are
created through the engine's create call with QEMU's option names (`size`,
`cluster_size`), exactly what such a class's to_native() would pass.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb
from libqblock import _native

from childrun import run_result_child
from conftest import CORPUS, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "offset")

# Header fields: name -> (offset, struct format).
TRACKS, BAT_ENTRIES, NB_SECTORS, INUSE, DATA_OFF, EXT_OFF = 28, 32, 36, 44, 48, 56
BAT = 64
INUSE_MAGIC = 0x746F6E59

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 70001 200000",
    "write -z 1M 192k",
    "write -P 0x44 3145721 17",
)


def pcreate(path, size, cluster_size=None):
    opts = {"size": size}
    if cluster_size is not None:
        opts["cluster_size"] = cluster_size
    _native.create("file", str(path), "parallels", opts)


def strip(entries):
    """Comparable form of a map; QEMU's `zero` over host-file holes inside
    data extents (the protocol layer's view) is dropped before merging."""
    out = []
    for e in entries:
        e = {k: e[k] for k in MAP_KEYS if k in e}
        if e.get("data"):
            e.pop("zero", None)
        if out:
            last = out[-1]
            same = all(last.get(k) == e.get(k) for k in MAP_KEYS if k not in ("start", "length", "offset"))
            cont = ("offset" in last) == ("offset" in e) and (
                "offset" not in e or last["offset"] + last["length"] == e["offset"]
            )
            if same and cont:
                last["length"] += e["length"]
                continue
        out.append(e)
    return out


def ours_map(img):
    return strip(e.to_qemu_map() for e in img.map())


def check_clean(path):
    r = qemu_check(str(path))
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0 and r.get("check-errors", 0) == 0, r


def inuse(path):
    with open(path, "rb") as f:
        f.seek(INUSE)
        return struct.unpack("<I", f.read(4))[0]


def assert_reads_like_qemu(path, tmp, compare_map=True):
    expected = qemu_raw_bytes(str(path), tmp)
    with qb.open(path, flags=0) as img:
        assert img.format == qb.Format.PARALLELS
        assert img.virt_size == len(expected)
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (65535, 65538), (len(expected) - 3, 3)):
            if off + n <= len(expected):
                assert img.read(n, off) == expected[off : off + n], (off, n)
        if compare_map:
            assert ours_map(img) == strip(qemu_map(str(path)))
        assert img.info().backing_location is None


@pytest.mark.parametrize("cluster", [None, "64k", "4k"])
def test_qemu_images_read_identically(tmp, cluster):
    p = tmp / "q.hds"
    opts = ["-o", f"cluster_size={cluster}"] if cluster else []
    qemu_img("create", "-f", "parallels", *opts, str(p), str(4 * MiB + 512))
    assert qb.probe(p) is qb.Format.PARALLELS
    assert_reads_like_qemu(p, tmp)
    qemu_io(str(p), *QEMU_IO_WRITES, fmt="parallels")
    assert_reads_like_qemu(p, tmp)


@pytest.mark.parametrize("cluster", [None, 64 * KiB, 4096, 1536])
def test_our_images_pass_qemu(tmp, cluster):
    p = tmp / "o.hds"
    size = 3 * MiB + 1536
    pcreate(p, size, cluster)
    qi = qemu_info(str(p))
    assert (qi["format"], qi["virtual-size"]) == ("parallels", size)
    assert "backing-filename" not in qi
    check_clean(p)
    # Same header and length as QEMU's own.
    q = tmp / "q.hds"
    qemu_img("create", "-f", "parallels", *(["-o", f"cluster_size={cluster}"] if cluster else []), str(q), str(size))
    assert p.read_bytes() == q.read_bytes()
    model = bytearray(size)
    with qb.open(p, flags=qb.O_RDWR) as img:
        for off, n, v in ((1000, 5000, 1), (MiB - 7, 20, 2), (2 * MiB, 300 * KiB, 3), (size - 100, 100, 4), (0, 512, 5)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        img.write_zeroes(1500, 100)
        model[1500:1600] = bytes(100)
        assert img.read(size, 0) == bytes(model)
        img.flush()
        assert inuse(p) == INUSE_MAGIC  # open for writing, as QEMU marks it
    assert inuse(p) == 0
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    with qb.open(p, flags=0) as img:
        assert ours_map(img) == strip(qemu_map(str(p)))
    qemu_io(str(p), "write -P 0x77 1M 70000", "write -P 0x78 3M 1", fmt="parallels")
    assert_reads_like_qemu(p, tmp)
    check_clean(p)


def test_create_rejects_bad_options(tmp):
    for opts in ({"size": MiB, "cluster_size": 1000}, {"size": 1001}, {"size": MiB, "cluster_size": 0},
                 {"size": MiB, "preallocation": "full"}, {"size": 1 << 62, "cluster_size": 512}):
        with pytest.raises(qb.InvalidParamError):
            _native.create("file", str(tmp / "x.hds"), "parallels", opts)


# --------------------------------------------------------------------------
# The in-use flag.


def test_dirty_image_reads_and_is_repaired_by_a_writable_open(tmp):
    p = tmp / "d.hds"
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k", str(p), str(2 * MiB))
    qemu_io(str(p), "write -P 0x33 100k 10k", fmt="parallels")
    expected = qemu_raw_bytes(str(p), tmp)
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, INUSE, INUSE_MAGIC)
    b += b"\x5a" * 100_000  # leaked space past the last cluster
    p.write_bytes(bytes(b))
    r = qemu_img("check", str(p), check=False)
    assert r.returncode != 0  # QEMU calls it corrupt until repaired
    with qb.open(p, flags=0) as img:
        assert img.info().dirty
        assert img.read(img.virt_size, 0) == expected
    assert p.read_bytes() == bytes(b)  # a read-only open changes nothing
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.read(img.virt_size, 0) == expected
    assert inuse(p) == 0
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == expected


def test_v1_image_is_written_in_sectors(tmp):
    """QEMU's v1 test image: BAT entries count sectors. We write into it and
    QEMU reads back what we wrote."""
    src = CORPUS / "images" / "qemu" / "parallels-v1"
    if not src.exists():
        pytest.skip("corpus not present")
    p = tmp / "v1.hds"
    shutil.copyfile(src, p)
    os.chmod(p, 0o644)
    model = bytearray(qemu_raw_bytes(str(p), tmp))
    with qb.open(p, flags=qb.O_RDWR) as img:
        for off, n, v in ((5000, 70000, 0x61), (2 * MiB - 10, 10, 0x62), (MiB + 3, 1, 0x63)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    check_clean(p)


# --------------------------------------------------------------------------
# Random operations against a model.

SIZE = 3 * MiB + 512
offsets = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 511, 65535, 65536, MiB + 1, SIZE - 1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 200 * KiB), st.integers(1, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 300 * KiB), st.just(0)),
        st.tuples(st.just("discard"), offsets, st.integers(1, 300 * KiB), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.parametrize("cluster", [64 * KiB, 1536])
def test_random_ops_against_model(cluster):
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            p = Path(td) / "m.hds"
            pcreate(p, SIZE, cluster)
            model = bytearray(SIZE)
            img = qb.open(p, flags=qb.O_RDWR)
            try:
                for op, off, n, v in seq:
                    n = min(n, SIZE - off)
                    if op == "write":
                        img.write(bytes([v]) * n, off)
                        model[off : off + n] = bytes([v]) * n
                    elif op == "zero":
                        img.write_zeroes(off, n)
                        model[off : off + n] = bytes(n)
                    elif op == "discard":
                        # As QEMU: whole clusters inside the range read as zeroes.
                        img.discard(off, n)
                        a, b = -(-off // cluster) * cluster, min((off + n) // cluster * cluster, SIZE)
                        if a < b:
                            model[a:b] = bytes(b - a)
                    elif op == "flush":
                        img.flush()
                    else:
                        img.close()
                        img = qb.open(p, flags=qb.O_RDWR)
                assert img.read(SIZE, 0) == bytes(model)
            finally:
                if not img.closed:
                    img.close()
            check_clean(p)
            raw = Path(td) / "model.raw"
            raw.write_bytes(bytes(model))
            c = qemu_img("compare", "-f", "parallels", "-F", "raw", str(p), str(raw), check=False)
            assert c.returncode == 0, c.stdout + c.stderr

    run()


def test_discard_matches_qemu(tmp):
    """Discard drops whole clusters as QEMU's does; QEMU reads the result the same."""
    ours, theirs = tmp / "o.hds", tmp / "q.hds"
    pcreate(ours, 2 * MiB, 64 * KiB)
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k", str(theirs), str(2 * MiB))
    qemu_io(str(theirs), "write -P 0x21 0 1M", "discard 64k 192k", fmt="parallels")
    with qb.open(ours, flags=qb.O_RDWR) as img:
        img.write(b"\x21" * MiB, 0)
        img.discard(64 * KiB, 192 * KiB)
    assert qemu_raw_bytes(str(ours), tmp) == qemu_raw_bytes(str(theirs), tmp)
    check_clean(ours)
    with qb.open(ours, flags=0) as img:
        assert [(e.offset, e.length, e.present) for e in img.map()] == [
            (e["start"], e["length"], e["present"]) for e in qemu_map(str(theirs))
        ]


def test_threads_write_distinct_clusters(tmp):
    import threading

    p = tmp / "t.hds"
    pcreate(p, 8 * MiB, 64 * KiB)
    with qb.open(p, flags=qb.O_RDWR) as img:
        def work(i):
            img.write(bytes([i + 1]) * 100_000, i * MiB + 1000)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(7)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for i in range(7):
            assert img.read(100_000, i * MiB + 1000) == bytes([i + 1]) * 100_000
    check_clean(p)


# --------------------------------------------------------------------------
# Corpus images and bundles.


def _manifest():
    with open(CORPUS / "MANIFEST.tsv", newline="", encoding="utf-8", errors="replace") as f:
        return {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}


def _hash(img, chunk=8 * MiB):
    h = hashlib.sha256()
    for off in range(0, img.virt_size, chunk):
        h.update(img.read(min(chunk, img.virt_size - off), off))
    return h.hexdigest()


needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="conformance corpus not present")


@needs_corpus
@pytest.mark.parametrize("name", ["qemu/parallels-v1", "qemu/parallels-v2", "qemu/fake.parallels"])
def test_corpus_small_images(name):
    row = _manifest()[name]
    with qb.open(CORPUS / "images" / name, flags=0) as img:
        assert img.format == qb.Format.PARALLELS
        assert img.virt_size == json.loads(row["qemu_img_info_json_or_error"])["virtual-size"]
        assert _hash(img) == row["qemu_convert_raw_sha256_or_error"].split()[0]
        assert ours_map(img) == strip(qemu_map(str(CORPUS / "images" / name)))


@needs_corpus
def test_corpus_bitmap_extension_reads_and_refuses_writes(tmp):
    src = CORPUS / "images" / "qemu" / "parallels-with-bitmap"
    p = tmp / "bm.hds"
    shutil.copyfile(src, p)
    os.chmod(p, 0o644)
    before = p.read_bytes()
    expected_map = strip(qemu_map(str(p)))  # (not while we hold it for writing: QEMU would refuse it)
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.virt_size == 64 << 30
        assert ours_map(img) == expected_map
        assert img.read(MiB, 0) == bytes(MiB) and img.read(MiB, (64 << 30) - MiB) == bytes(MiB)
        assert img.info().format_specific == {}  # as qemu-img info
        with pytest.raises(qb.UnsupportedError):
            img.write(b"x", 0)
    assert p.read_bytes() == before  # bitmaps untouched (QEMU 10's check counts their clusters as leaks)


def _materialize_bundle(tmp, name):
    src = CORPUS / "images" / "dissect.hypervisor" / "hdd" / name
    dst = tmp / name
    dst.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as fin, open(dst / f.name[:-3], "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(f, dst / f.name)
    return dst


@needs_corpus
@pytest.mark.parametrize("name", ["expanding.hdd", "plain.hdd"])
def test_corpus_bundle_through_descriptor(tmp, name):
    d = _materialize_bundle(tmp, name)
    row = next(r for f, r in _manifest().items() if f.startswith(f"dissect.hypervisor/hdd/{name}/") and ".hds" in f)
    expected = row["qemu_convert_raw_sha256_or_error"].split()[0]
    assert qb.probe(d / "DiskDescriptor.xml") == qb.Format.PARALLELS
    with qb.open(d / "DiskDescriptor.xml", flags=0) as img:
        assert img.format == qb.Format.PARALLELS
        assert img.virt_size == 100 * MiB
        assert _hash(img) == expected
    # Writes go to the extent; QEMU reads them from the .hds file.
    hds = next(d.glob("*.hds"))
    fmt = "parallels" if name == "expanding.hdd" else "raw"
    clean_before = fmt == "parallels" and qemu_img("check", str(hds), check=False).returncode == 0
    with qb.open(d / "DiskDescriptor.xml", flags=qb.O_RDWR) as img:
        img.write(b"\x5a" * 5000, MiB - 7)
        img.write(b"\x5b" * 100, 100 * MiB - 100)
    qemu_io(str(hds), f"read -P 0x5a {MiB - 7} 5000", f"read -P 0x5b {100 * MiB - 100} 100", fmt=fmt)
    if clean_before:
        check_clean(hds)


@needs_corpus
def test_corpus_split_bundle_spans_six_extents(tmp):
    d = _materialize_bundle(tmp, "split.hdd")
    parts = sorted(d.glob("split.hdd.*.hds"), key=lambda f: int(f.name.split(".")[2]))
    assert len(parts) == 6
    with qb.open(d / "DiskDescriptor.xml", flags=0) as img:
        assert img.virt_size == 20971520 * 512
        start = 0
        for part in parts:
            with qb.open(part, flags=0) as p:
                n = 3989504 * 512 if part != parts[-1] else 1024000 * 512
                # Every allocated run of the part reads the same through the bundle.
                for e in p.map(0, min(n, p.virt_size)):
                    if e.data:
                        k = min(e.length, 2 * MiB)
                        assert img.read(k, start + e.offset) == p.read(k, e.offset)
                assert img.read(4096, start + n - 4096) == p.read(4096, n - 4096)
                start += n
        assert start == img.virt_size
        assert any(e.data for e in img.map())


@needs_corpus
def test_corpus_split_bundle_writes_across_extents(tmp):
    d = _materialize_bundle(tmp, "split.hdd")
    parts = sorted(d.glob("split.hdd.*.hds"), key=lambda f: int(f.name.split(".")[2]))
    edge = 3989504 * 512
    with qb.open(d / "DiskDescriptor.xml", flags=qb.O_RDWR) as img:
        img.write(b"\x61" * 6000, edge - 3000)
        img.write(b"\x62" * 512, img.virt_size - 512)
        assert img.read(6000, edge - 3000) == b"\x61" * 6000
    qemu_io(str(parts[0]), f"read -P 0x61 {edge - 3000} 3000", fmt="parallels")
    qemu_io(str(parts[1]), "read -P 0x61 0 3000", fmt="parallels")
    qemu_io(str(parts[5]), f"read -P 0x62 {1024000 * 512 - 512} 512", fmt="parallels")
    for part in (parts[0], parts[1], parts[5]):
        assert inuse(part) != INUSE_MAGIC  # every extent closed clean


@needs_corpus
def test_bundle_with_missing_extent_fails_cleanly(tmp):
    d = _materialize_bundle(tmp, "split.hdd")
    next(d.glob("split.hdd.3.*.hds")).unlink()
    with pytest.raises(qb.QBlockError):
        qb.open(d / "DiskDescriptor.xml", flags=0)


# --------------------------------------------------------------------------
# Hostile images, each opened in a limited child process.

TIMEOUT = 20
ADDRESS_SPACE = 1 << 30
MAX_RSS_KIB = 256 * 1024

CHILD = r"""
import json, resource, sys
p = json.loads(sys.argv[1])
out = {"exc": None, "msg": None, "stage": "import"}
try:
    import libqblock as qb
    out["stage"] = "open"
    img = qb.open(p["path"], fmt=p["fmt"], flags=qb.O_RDWR if p["rw"] else 0)
    out["stage"] = "info"
    img.info()
    v = img.virt_size
    for i in range(64):
        off = (v // 64 * i) & ~511
        if off < v:
            out["stage"] = f"read {off}"
            img.read(min(1 << 20, v - off), off)
    if v:
        out["stage"] = "map"
        for i, _ in enumerate(img.map()):
            if i > 100000:
                break
    if p["rw"]:
        out["stage"] = "write"
        img.write(b"x" * 5000, p["write_off"])
    out["stage"] = "close"
    img.close()
    out["stage"] = None
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:400]
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
print("RESULT " + json.dumps(out), flush=True)
"""



def run_child(path, fmt="parallels", rw=False, write_off=0):
    params = {"path": str(path), "fmt": fmt, "rw": rw, "write_off": write_off}
    res = run_result_child(CHILD, params, Path(path).name, timeout=TIMEOUT, address_space=ADDRESS_SPACE)
    assert res["rss_kib"] < MAX_RSS_KIB, res
    return res


def _base(tmp):
    """64 KiB clusters, data at 64 KiB; clusters 0 and 3 allocated (BAT 1, 2)."""
    p = tmp / "base.hds"
    if not p.exists():
        qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k", str(p), str(MiB))
        qemu_io(str(p), "write -P 0x11 0 4k", "write -P 0x22 192k 4k", fmt="parallels")
    return bytearray(p.read_bytes())


def _v1(b):
    b[:16] = b"WithoutFreeSpace"
    for i in range(16):  # cluster entries -> sector entries
        (e,) = struct.unpack_from("<I", b, BAT + 4 * i)
        struct.pack_into("<I", b, BAT + 4 * i, e * 128)
    return b


U32 = 0xFFFFFFFF
# name -> list of (offset, struct format, value) patches, or a function.
HOSTILE = {
    "truncated-header": lambda b: b[:40],
    "version-3": [(16, "<I", 3)],
    "tracks-zero": [(TRACKS, "<I", 0)],
    "tracks-huge": [(TRACKS, "<I", U32)],
    "bat-entries-huge": [(BAT_ENTRIES, "<I", U32)],
    "bat-past-eof": [(BAT_ENTRIES, "<I", 1 << 24)],
    "size-huge": [(NB_SECTORS, "<Q", (1 << 64) - 1)],
    "data-off-inside-bat": [(BAT_ENTRIES, "<I", 200), (DATA_OFF, "<I", 1)],
    "data-off-past-eof": [(DATA_OFF, "<I", U32)],
    "entry-before-data-off": [(DATA_OFF, "<I", 256)],
    "entry-past-eof": [(BAT + 12, "<I", 1000)],
    "entry-huge": [(BAT + 12, "<I", U32)],
    "entries-duplicate": [(BAT + 4, "<I", 1)],
    "v1-entries-overlap": lambda b: struct.pack_into("<I", _v1(b), BAT + 12, 128 + 64) or b,
    "v1-entry-in-bat": lambda b: struct.pack_into("<I", _v1(b), BAT + 12, 1) or b,
    "ext-past-eof": [(EXT_OFF, "<Q", 1 << 40)],
    "ext-overflows": [(EXT_OFF, "<Q", (1 << 64) - 1)],
    "ext-in-bat": [(EXT_OFF, "<Q", 1)],
    "ext-on-data-cluster": [(EXT_OFF, "<Q", 128)],
    "ext-bad-magic": lambda b: struct.pack_into("<Q", b, EXT_OFF, len(b) // 512) or b + bytes(64 * KiB),
}


def _hostile(tmp, name):
    b = _base(tmp)
    h = HOSTILE[name]
    if callable(h):
        b = h(b)
    else:
        for off, fmt, v in h:
            struct.pack_into(fmt, b, off, v)
    p = tmp / f"{name}.hds"
    p.write_bytes(bytes(b))
    return p


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("rw", [False, True])
def test_hostile_image_is_refused(tmp, name, rw):
    p = _hostile(tmp, name)
    before = p.read_bytes()
    res = run_child(p, rw=rw, write_off=512 * KiB)
    assert res["exc"] == "CorruptImageError", f"{name}: {res}"
    assert p.read_bytes() == before, f"{name}: the image changed"


HOSTILE_BUNDLES = {
    "no-storage": "<StorageData></StorageData>",
    "gap": "<StorageData><Storage><Start>8</Start><End>2048</End><Image><Type>Plain</Type><File>a</File></Image>"
    "</Storage></StorageData>",
    "escape": "<StorageData><Storage><Start>0</Start><End>2048</End><Image><Type>Plain</Type><File>../a</File>"
    "</Image></Storage></StorageData>",
    "short": "<StorageData><Storage><Start>0</Start><End>1024</End><Image><Type>Plain</Type><File>a</File></Image>"
    "</Storage></StorageData>",
    "not-a-number": "<StorageData><Storage><Start>0</Start><End>x</End><Image><Type>Plain</Type><File>a</File>"
    "</Image></Storage></StorageData>",
    "plain-extent-too-small": "<StorageData><Storage><Start>0</Start><End>2048</End><Image><Type>Plain</Type>"
    "<File>b</File></Image></Storage></StorageData>",
    "extent-too-small": "<StorageData><Storage><Start>0</Start><End>2048</End><Image><Type>Compressed</Type>"
    "<File>small.hds</File></Image></Storage></StorageData>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BUNDLES))
def test_hostile_descriptor_is_refused(tmp, name):
    (tmp / "a").write_bytes(bytes(MiB))
    (tmp / "b").write_bytes(bytes(MiB - 512))
    pcreate(tmp / "small.hds", 512 * KiB, 64 * KiB)
    xml = ("<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\"><Disk_Parameters>"
           "<Disk_size>2048</Disk_size></Disk_Parameters>" + HOSTILE_BUNDLES[name] + "</Parallels_disk_image>\n")
    p = tmp / "DiskDescriptor.xml"
    p.write_text(xml)
    res = run_child(p)
    assert res["exc"] == "CorruptImageError", f"{name}: {res}"


def test_parallels_below_qcow2(tmp):
    """A parallels image as the backing file of a qcow2 overlay."""
    base = tmp / "base.hds"
    pcreate(base, 3 * MiB, 64 * KiB)
    with qb.open(base, flags=qb.O_RDWR) as img:
        img.write(b"\x44" * 70000, MiB - 1000)
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "parallels", str(top))
    qemu_io(str(top), "write -P 0x55 1M 4k")
    expected = qemu_raw_bytes(str(top), tmp)
    with qb.open(top, flags=0) as img:
        assert img.info().backing_format == qb.Format.PARALLELS
        assert img.read(img.virt_size, 0) == expected
    with qb.open(top, flags=qb.O_RDWR) as img:  # copy-on-write from the parallels layer
        img.write(b"\x66" * 10, MiB - 5)
        assert img.read(20, MiB - 10) == b"\x44" * 5 + b"\x66" * 10 + b"\x55" * 5


def test_preallocated_qemu_image(tmp):
    """qemu-img's preallocation leaves unreferenced space after the data
    offset; we read it, write into it and close it clean."""
    p = tmp / "pre.hds"
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k,preallocation=falloc", str(p), str(2 * MiB))
    assert_reads_like_qemu(p, tmp)
    with qb.open(p, flags=qb.O_RDWR) as img:
        img.write(b"\x12" * 3000, 100_000)
    expected = bytearray(2 * MiB)
    expected[100_000:103_000] = b"\x12" * 3000
    assert qemu_raw_bytes(str(p), tmp) == bytes(expected)
    check_clean(p)
