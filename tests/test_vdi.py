"""vdi against qemu-img/qemu-io: images QEMU wrote read back byte for byte
and map as `qemu-img map` says; images we create and write pass `qemu-img
check` and compare identical to a model; the corpus image decodes to QEMU's
hash; hand-made corrupt images are refused quickly with bounded memory."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from childrun import run_result_child
from conftest import CORPUS, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "offset")

# Header field offsets (VirtualBox VDI v1.1 header).
SIGNATURE, VERSION, HEADER_SIZE, IMAGE_TYPE = 0x40, 0x44, 0x48, 0x4C
OFFSET_BMAP, OFFSET_DATA, SECTOR_SIZE = 0x154, 0x158, 0x168
DISK_SIZE, BLOCK_SIZE, BLOCK_EXTRA = 0x170, 0x178, 0x17C
BLOCKS_IN_IMAGE, BLOCKS_ALLOCATED, UUID_PARENT = 0x180, 0x184, 0x1B8

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 1048000 1100000",
    "write -z 2500000 3000",
    "write -P 0x44 4194303 17",
    "write -P 0x55 5242880 512",
)


def strip(entries):
    """Comparable form of a map. Where data is stored, QEMU also asks the host
    file and adds `zero` over its holes (sparse static images, partly written
    blocks); that is the protocol layer's view, not the format's, so the flag
    is dropped for data extents before adjacent extents are merged."""
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


def assert_reads_like_qemu(path, tmp):
    expected = qemu_raw_bytes(str(path), tmp)
    with qb.open(path, flags=0) as img:
        assert img.format == qb.Format.VDI
        assert img.virt_size == len(expected)
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (MiB - 3, 9), (len(expected) - 3, 3)):
            if off + n <= len(expected):
                assert img.read(n, off) == expected[off : off + n], (off, n)
        assert ours_map(img) == strip(qemu_map(str(path)))
        info = img.info()
        qi = qemu_info(str(path))
        assert info.cluster_size == qi["cluster-size"]
        assert info.backing_location is None


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("size", [6 * MiB, 6 * MiB + 512])
def test_qemu_images_read_identically(tmp, static, size):
    p = tmp / "q.vdi"
    qemu_img("create", "-f", "vdi", "-o", f"static={'on' if static else 'off'}", str(p), str(size))
    assert qb.probe(p) is qb.Format.VDI
    assert_reads_like_qemu(p, tmp)
    qemu_io(str(p), *QEMU_IO_WRITES, fmt="vdi")
    assert_reads_like_qemu(p, tmp)


def test_empty_image(tmp):
    p = tmp / "e.vdi"
    qemu_img("create", "-f", "vdi", str(p), "0")
    with qb.open(p, flags=0) as img:
        assert img.virt_size == 0
    q = tmp / "o.vdi"
    qb.create(q, qb.VdiOptions(0))
    assert qemu_info(str(q))["virtual-size"] == 0
    check_clean(q)


@pytest.mark.parametrize("static", [False, True])
def test_our_images_pass_qemu(tmp, static):
    p = tmp / "o.vdi"
    size = 5 * MiB + 1536
    qb.create(p, qb.VdiOptions(size, static=static))
    qi = qemu_info(str(p))
    assert (qi["format"], qi["virtual-size"], qi["cluster-size"]) == ("vdi", size, MiB)
    assert "backing-filename" not in qi
    check_clean(p)
    model = bytearray(size)
    with qb.open(p, flags=qb.O_RDWR) as img:
        for off, n, v in ((1000, 5000, 1), (MiB - 7, 20, 2), (3 * MiB, MiB, 3), (size - 100, 100, 4), (0, 512, 5)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        img.write_zeroes(1500, 100)
        model[1500:1600] = bytes(100)
        assert img.read(size, 0) == bytes(model)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    with qb.open(p, flags=0) as img:
        assert ours_map(img) == strip(qemu_map(str(p)))
    # QEMU writes into our image, we read what it wrote.
    qemu_io(str(p), "write -P 0x77 2M 70000", "write -P 0x78 4M 1", fmt="vdi")
    assert_reads_like_qemu(p, tmp)
    check_clean(p)


def test_create_rejects_bad_options(tmp):
    with pytest.raises(qb.InvalidParamError):
        qb.VdiOptions(MiB, cluster_size=2 * MiB)
    with pytest.raises(qb.InvalidParamError):
        qb._native.create("file", str(tmp / "x.vdi"), "vdi", {"size": MiB, "cluster_size": 65536})
    with pytest.raises(qb.InvalidParamError):
        qb._native.create("file", str(tmp / "x.vdi"), "vdi", {"size": MiB, "bogus": 1})


def test_read_only_open_refuses_writes(tmp):
    p = tmp / "r.vdi"
    qb.create(p, qb.VdiOptions(MiB))
    with qb.open(p, flags=0) as img:
        with pytest.raises(qb.QBlockError):
            img.write(b"x", 0)


# --------------------------------------------------------------------------
# Random operations against a model.

SIZE = 3 * MiB + 512
offsets = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 511, MiB - 1, MiB, 2 * MiB + 1, SIZE - 1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 1200 * KiB), st.integers(1, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 1200 * KiB), st.just(0)),
        st.tuples(st.just("discard"), offsets, st.integers(1, 300 * KiB), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.parametrize("static", [False, True])
def test_random_ops_against_model(static):
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            p = Path(td) / "m.vdi"
            qb.create(p, qb.VdiOptions(SIZE, static=static))
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
                        img.discard(off, n)  # a hint: VDI keeps the data, as QEMU
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
            c = qemu_img("compare", "-f", "vdi", "-F", "raw", str(p), str(raw), check=False)
            assert c.returncode == 0, c.stdout + c.stderr

    run()


def test_threads_write_distinct_blocks(tmp):
    import threading

    p = tmp / "t.vdi"
    qb.create(p, qb.VdiOptions(8 * MiB))
    with qb.open(p, flags=qb.O_RDWR) as img:
        def work(i):
            img.write(bytes([i + 1]) * (MiB // 2), i * MiB + 1000)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(7)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for i in range(7):
            assert img.read(MiB // 2, i * MiB + 1000) == bytes([i + 1]) * (MiB // 2)
    check_clean(p)


# --------------------------------------------------------------------------
# The corpus image and the unsupported kinds.


def _manifest_row(name):
    with open(CORPUS / "MANIFEST.tsv", newline="", encoding="utf-8", errors="replace") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["file"] == name:
                return r
    raise AssertionError(f"{name} not in the corpus manifest")


@pytest.mark.skipif(not CORPUS.is_dir(), reason="conformance corpus not present")
def test_corpus_basic(tmp):
    row = _manifest_row("dissect.hypervisor/vdi/basic.vdi.gz")
    expected = row["qemu_convert_raw_sha256_or_error"].split()[0]
    p = tmp / "basic.vdi"
    with gzip.open(CORPUS / "images" / "dissect.hypervisor/vdi/basic.vdi.gz", "rb") as f:
        p.write_bytes(f.read())
    with qb.open(p, flags=0) as img:
        assert img.format == qb.Format.VDI
        assert img.virt_size == json.loads(row["qemu_img_info_json_or_error"])["virtual-size"]
        assert hashlib.sha256(img.read(img.virt_size, 0)).hexdigest() == expected
        assert ours_map(img) == strip(qemu_map(str(p)))
        assert img.info().cluster_size == MiB


def _patched(tmp, name, patches, base_size=4 * MiB):
    p = tmp / "base.vdi"
    if not p.exists():
        qemu_img("create", "-f", "vdi", str(p), str(base_size))
        qemu_io(str(p), "write -P 0x11 0 4k", "write -P 0x22 2M 4k", fmt="vdi")
    b = bytearray(p.read_bytes())
    for off, fmt, v in patches:
        if fmt == "truncate":
            del b[off:]
        else:
            struct.pack_into(fmt, b, off, v)
    out = tmp / f"{name}.vdi"
    out.write_bytes(bytes(b))
    return out


def test_differencing_image_is_unsupported(tmp):
    p = _patched(tmp, "diff", [(IMAGE_TYPE, "<I", 4), (UUID_PARENT, "<Q", 0x1234)])
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(p, flags=0)
    assert "differencing" in ei.value.message
    r = qemu_img("info", str(p), check=False)
    assert r.returncode != 0  # QEMU refuses it too


# --------------------------------------------------------------------------
# Hostile images, each opened in a limited child process.

TIMEOUT = 20
ADDRESS_SPACE = 1 << 30
MAX_RSS_KIB = 256 * 1024

CHILD = r"""
import hashlib, json, resource, sys
p = json.loads(sys.argv[1])
out = {"exc": None, "msg": None, "stage": "import"}
try:
    import libqblock as qb
    out["stage"] = "open"
    img = qb.open(p["path"], fmt=p["fmt"], flags=qb.O_RDWR if p["rw"] else 0)
    out["stage"] = "info"
    img.info()
    v = img.virt_size
    for off in range(0, v, max(1 << 20, v // 64)):
        out["stage"] = f"read {off}"
        img.read(min(1 << 20, v - off), off)
    if v:
        out["stage"] = "map"
        for _ in img.map():
            pass
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



def run_child(path, fmt="vdi", rw=False, write_off=0):
    params = {"path": str(path), "fmt": fmt, "rw": rw, "write_off": write_off}
    res = run_result_child(CHILD, params, path.name, timeout=TIMEOUT, address_space=ADDRESS_SPACE)
    assert res["rss_kib"] < MAX_RSS_KIB, res
    return res


BAD = 0xFFFFFFFF
# name -> patches (offset, struct format, value); every one must be a CorruptImageError.
HOSTILE = {
    "truncated-header": [(300, "truncate", 0)],
    "bad-signature-probed-as-vdi-forced": [(SIGNATURE, "<I", 0x12345678)],
    "header-size-too-small": [(HEADER_SIZE, "<I", 0x100)],
    "header-size-huge": [(HEADER_SIZE, "<I", BAD)],
    "image-type-zero": [(IMAGE_TYPE, "<I", 0)],
    "image-type-unknown": [(IMAGE_TYPE, "<I", 77)],
    "bmap-inside-header": [(OFFSET_BMAP, "<I", 0)],
    "bmap-past-eof": [(OFFSET_BMAP, "<I", 0xFFFFFE00)],
    "data-overlaps-bmap": [(OFFSET_DATA, "<I", 0x200)],
    "block-size-zero": [(BLOCK_SIZE, "<I", 0)],
    "block-size-not-power-of-two": [(BLOCK_SIZE, "<I", 3 * MiB)],
    "block-size-huge": [(BLOCK_SIZE, "<I", 1 << 31)],
    "blocks-in-image-huge": [(BLOCKS_IN_IMAGE, "<I", BAD)],
    "blocks-in-image-past-eof": [(BLOCKS_IN_IMAGE, "<I", 0x1FFFFF00), (DISK_SIZE, "<Q", 4 * MiB)],
    "blocks-allocated-too-many": [(BLOCKS_ALLOCATED, "<I", 5)],
    "disk-size-beyond-bmap": [(DISK_SIZE, "<Q", 5 * MiB)],
    "disk-size-huge": [(DISK_SIZE, "<Q", (1 << 64) - 1)],
    "bmap-entry-too-large": [(0x200 + 4, "<I", 4)],
    "bmap-entry-huge": [(0x200 + 8, "<I", 0xFFFFFFF0)],
    "bmap-entry-shared": [(0x200 + 4, "<I", 0)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("rw", [False, True])
def test_hostile_image_is_refused(tmp, name, rw):
    p = _patched(tmp, name, HOSTILE[name])
    before = p.read_bytes()
    res = run_child(p, rw=rw, write_off=MiB)
    assert res["exc"] == "CorruptImageError", f"{name}: {res}"
    assert p.read_bytes() == before, f"{name}: the image changed"


def test_unsupported_variants_are_refused_cleanly(tmp):
    cases = {
        "version-1.0": [(VERSION, "<I", 0x00010000)],
        "undo": [(IMAGE_TYPE, "<I", 3)],
        "block-extra": [(BLOCK_EXTRA, "<I", 512)],
        "sector-4k": [(SECTOR_SIZE, "<I", 4096)],
        "unaligned-bmap": [(OFFSET_BMAP, "<I", 0x201)],
    }
    for name, patches in cases.items():
        res = run_child(_patched(tmp, name, patches))
        assert res["exc"] == "UnsupportedError", f"{name}: {res}"


def test_crash_between_bmap_and_header_does_not_reuse_a_block(tmp):
    """The header's count lags the map (a crash after the bmap write): the
    next allocation must not hand out the block the map already uses."""
    p = tmp / "c.vdi"
    qb.create(p, qb.VdiOptions(4 * MiB))
    with qb.open(p, flags=qb.O_RDWR) as img:
        img.write(b"\x01" * 4096, 0)
        img.write(b"\x02" * 4096, MiB)
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, BLOCKS_ALLOCATED, 1)
    p.write_bytes(bytes(b))
    with qb.open(p, flags=qb.O_RDWR) as img:
        img.write(b"\x03" * 4096, 2 * MiB)
        assert img.read(4096, 0) == b"\x01" * 4096
        assert img.read(4096, MiB) == b"\x02" * 4096
        assert img.read(4096, 2 * MiB) == b"\x03" * 4096
    check_clean(p)  # the count was rewritten past the highest block


def test_discarded_marker_reads_as_zeroes_and_is_reallocated(tmp):
    """0xfffffffe ("discarded": VirtualBox's zero block) reads as zeroes as in
    QEMU; a write there takes a fresh block, and stale bytes of a reused
    block never show."""
    p = tmp / "z.vdi"
    qemu_img("create", "-f", "vdi", str(p), str(4 * MiB))
    qemu_io(str(p), "write -P 0x11 0 4k", "write -P 0x22 2M 1M", fmt="vdi")
    b = bytearray(p.read_bytes())
    assert struct.unpack_from("<I", b, 0x200 + 8)[0] == 1
    struct.pack_into("<I", b, 0x200 + 8, 0xFFFFFFFE)
    struct.pack_into("<I", b, BLOCKS_ALLOCATED, 1)  # data block 1 is free again
    p.write_bytes(bytes(b))
    check_clean(p)
    assert_reads_like_qemu(p, tmp)
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.read(MiB, 2 * MiB) == bytes(MiB)
        img.write(b"\x33" * 100, 2 * MiB + 500)
    expected = bytearray(4 * MiB)
    expected[:4096] = b"\x11" * 4096
    expected[2 * MiB + 500 : 2 * MiB + 600] = b"\x33" * 100
    assert qemu_raw_bytes(str(p), tmp) == bytes(expected)
    check_clean(p)


@pytest.mark.parametrize("static", [False, True])
def test_vdi_below_qcow2(tmp, static):
    """A vdi image as the backing file of a qcow2 overlay."""
    base = tmp / "base.vdi"
    qb.create(base, qb.VdiOptions(3 * MiB, static=static))
    with qb.open(base, flags=qb.O_RDWR) as img:
        img.write(b"\x44" * 70000, MiB - 1000)
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "vdi", str(top))
    qemu_io(str(top), "write -P 0x55 1M 4k")
    expected = qemu_raw_bytes(str(top), tmp)
    with qb.open(top, flags=0) as img:
        assert img.info().backing_format == qb.Format.VDI
        assert img.read(img.virt_size, 0) == expected


def _virtualbox_style(size_blocks=4, order=(2, 0)):
    """A VDI laid out as VirtualBox lays it out (not as QEMU does): the 0x190
    header with LCHS geometry, data starting at 1 MiB, blocks stored out of
    guest order."""
    h = bytearray(0x200)
    text = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    h[: len(text)] = text
    struct.pack_into("<IIIII", h, SIGNATURE, 0xBEDA107F, 0x00010001, 0x190, 1, 0)
    struct.pack_into("<II", h, OFFSET_BMAP, 0x200, MiB)
    struct.pack_into("<IIII", h, 0x15C, 0, 0, 0, 512)  # legacy geometry, sector size
    struct.pack_into("<QIIII", h, DISK_SIZE, size_blocks * MiB, MiB, 0, size_blocks, len(order))
    h[0x188:0x198] = os.urandom(16)
    h[0x198:0x1A8] = os.urandom(16)
    struct.pack_into("<IIII", h, 0x1C8, 1024, 16, 63, 512)  # LCHS geometry
    bmap = [0xFFFFFFFF] * size_blocks
    for idx, guest in enumerate(order):
        bmap[guest] = idx
    bmap[1] = 0xFFFFFFFE  # a zero block
    body = bytearray(MiB - 0x200)
    struct.pack_into(f"<{size_blocks}I", body, 0, *bmap)
    data = bytearray()
    for idx, guest in enumerate(order):
        data += bytes([0x40 + guest]) * 1000 + bytes(MiB - 2000) + bytes([0x50 + guest]) * 1000
    return bytes(h + body + data)


def test_virtualbox_layout(tmp):
    p = tmp / "vbox.vdi"
    p.write_bytes(_virtualbox_style())
    check_clean(p)
    assert_reads_like_qemu(p, tmp)
    with qb.open(p, flags=qb.O_RDWR) as img:
        img.write(b"\x99" * 3000, 3 * MiB - 1000)  # allocates data block 2 after the two
        img.write(b"\x98" * 10, MiB + 5)  # inside the zero (discarded) block
        assert img.read(10, 5) == b"\x40" * 10
    check_clean(p)
    assert_reads_like_qemu(p, tmp)
    b = p.read_bytes()
    assert struct.unpack_from("<I", b, BLOCKS_ALLOCATED)[0] == 4
    assert len(b) == 5 * MiB
