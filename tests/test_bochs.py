"""bochs (growing redolog images of the Bochs emulator), read-only. qemu-img
cannot create them, so images are built here byte by byte (header, catalog,
extents with their bitmaps) beside a bytearray model of the disk, and read
both by us and by `qemu-img convert -O raw`; the corpus image comes from
QEMU's own tests.

Opening a bochs image writable is refused with UnsupportedError (QEMU's
bochs is read-only too), so no write lock is taken.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from childrun import run_result_child
from conftest import CORPUS, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
S = 512
V1, V2 = 0x00010000, 0x00020000
FREE = 0xFFFFFFFF


def header(version: int = V2, hdr: int = 512, catalog: int = 8, bitmap: int = 512, extent: int = 4096,
           disk: int = 8 * 4096, kind: bytes = b"Redolog", subtype: bytes = b"Growing") -> bytes:
    h = bytearray(512)
    h[0:22] = b"Bochs Virtual HD Image"
    h[32 : 32 + len(kind)] = kind
    h[48 : 48 + len(subtype)] = subtype
    struct.pack_into("<IIIII", h, 64, version, hdr, catalog, bitmap, extent)
    struct.pack_into("<Q", h, 84 if version == V1 else 88, disk)
    return bytes(h)


def build(catalog_map: Dict[int, int], present: Dict[int, Sequence[int]], *, version: int = V2,
          catalog: int = 8, bitmap: int = 512, extent: int = 4096, disk: int = -1,
          seed: int = 0) -> Tuple[bytes, bytes]:
    """An image whose catalog maps extent i -> file extent catalog_map[i];
    present[i] lists the sectors of extent i whose bits are set. Returns the
    image and the model of the disk."""
    disk = catalog * extent if disk < 0 else disk
    img = bytearray(header(version, 512, catalog, bitmap, extent, disk))
    cat = [FREE] * catalog
    for i, e in catalog_map.items():
        cat[i] = e
    img += struct.pack(f"<{catalog}I", *cat)
    bb = -(-bitmap // S) * S
    stride = bb + extent
    data_at = len(img)
    n_ext = max(catalog_map.values(), default=-1) + 1
    img += bytes(n_ext * stride)
    model = bytearray(disk // S * S)
    for i, e in catalog_map.items():
        base = data_at + e * stride
        for s in present.get(i, ()):
            img[base + s // 8] |= 1 << (s % 8)
            g = i * extent + s * S
            sector = bytes(((g + k) * 7 + seed + (g >> 9)) & 0xFF for k in range(S))
            img[base + bb + s * S : base + bb + (s + 1) * S] = sector
            if g < len(model):
                model[g : g + S] = sector[: max(0, min(S, len(model) - g))]
    return bytes(img), bytes(model)


def write(tmp: Path, name: str, b: bytes) -> Path:
    p = tmp / name
    p.write_bytes(b)
    return p


def read_all(p: Path) -> bytes:
    with qb.open(p, flags=0) as img:
        return img.read(img.virt_size, 0)


# --- against qemu-img and the model -------------------------------------------------


def test_corpus_image_reads_as_qemu_reads_it(tmp):
    src = CORPUS / "images" / "qemu" / "empty.bochs"
    if not src.exists():
        pytest.skip("corpus image qemu/empty.bochs not found")
    p = write(tmp, "empty.bochs", src.read_bytes())
    want = qemu_raw_bytes(str(p), tmp)
    assert qb.probe(p) is qb.Format.BOCHS
    with qb.open(p, flags=0) as img:
        info = img.info()
        assert info.format is qb.Format.BOCHS and qemu_info(str(p))["format"] == "bochs"
        assert img.virt_size == len(want) == 1032192
        assert info.cluster_size is None and info.backing_location is None
        assert img.read(len(want), 0) == want == bytes(len(want))
        assert [(e.allocated, e.zero, e.length) for e in img.map()] == [(False, True, len(want))]


CASES = {
    "v2-4k-extents": dict(catalog_map={0: 1, 2: 0, 5: 2}, present={0: [0, 1, 2, 7], 2: range(8), 5: [3]}),
    "v1-header": dict(version=V1, catalog_map={1: 0, 3: 1}, present={1: [0, 5], 3: [7]}),
    "odd-disk-size": dict(catalog_map={0: 0, 7: 1}, present={0: [1], 7: [0, 7]}, disk=8 * 4096 - 700),
    "64k-extents-small-bitmap": dict(
        catalog=4, extent=64 * KiB, bitmap=16, catalog_map={0: 2, 1: 0, 3: 1},
        present={0: [0, 127], 1: range(0, 128, 3), 3: range(64, 128)},
    ),
    "spare-catalog-entries": dict(catalog=16, disk=5 * 4096, catalog_map={0: 0, 4: 1}, present={0: [2], 4: [4]}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_built_image_reads_like_qemu_and_the_model(tmp, name):
    b, model = build(**CASES[name])
    p = write(tmp, f"{name}.bochs", b)
    assert qemu_raw_bytes(str(p), tmp) == model
    assert qemu_info(str(p))["virtual-size"] == len(model)
    with qb.open(p, flags=0) as img:
        assert img.virt_size == len(model)
        assert img.read(len(model), 0) == model
        for off, n in [(1, 1), (511, 2), (4095, 4098), (len(model) - 3, 3), (700, len(model) - 1400)]:
            assert img.read(n, off) == model[off : off + n], (off, n)
    # QEMU has no block status for bochs (one data extent); ours marks what
    # is unallocated, and those bytes are zeroes.
    assert [e["data"] for e in qemu_map(str(p))] == [True]


def test_block_status_follows_catalog_and_bitmaps(tmp):
    b, model = build({0: 1, 2: 0}, {0: [0, 1, 5], 2: range(8)})
    p = write(tmp, "map.bochs", b)
    stride = 512 + 4096
    data_at = 512 + 8 * 4
    with qb.open(p, flags=0) as img:
        m = [(e.offset, e.length, e.allocated, e.data, e.zero, e.file_offset) for e in img.map()]
    assert m == [
        (0, 2 * S, True, True, False, data_at + stride + 512),
        (2 * S, 3 * S, False, False, True, None),
        (5 * S, S, True, True, False, data_at + stride + 512 + 5 * S),
        (6 * S, 2 * S + 4096, False, False, True, None),
        (2 * 4096, 4096, True, True, False, data_at + 512),
        (3 * 4096, 5 * 4096, False, False, True, None),
    ]


# --- random reads against the model -------------------------------------------------


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("bochs")
    cat = {i: (i * 7) % 24 for i in range(24)}  # a permutation; extents 24..31 unallocated
    present = {i: [s for s in range(16) if (s * 3 + i) % 5 != 0] for i in cat}
    b, model = build(cat, present, catalog=32, extent=8 * KiB, bitmap=512)
    p = d / "big.bochs"
    p.write_bytes(b)
    img = qb.open(p, flags=0)
    yield img, model
    img.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_reads_match_the_model(big_image, data):
    img, model = big_image
    off = data.draw(st.integers(0, len(model) - 1))
    n = data.draw(st.integers(1, len(model) - off))
    assert img.read(n, off) == model[off : off + n]


def test_concurrent_reads(big_image):
    img, model = big_image
    errors: List[str] = []

    def worker(seed: int) -> None:
        x = seed
        for _ in range(200):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            off = x % len(model)
            n = min(1 + x % 20000, len(model) - off)
            if img.read(n, off) != model[off : off + n]:
                errors.append(f"{off}+{n}")

    ts = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


# --- read-only, other kinds ---------------------------------------------------------


def test_writable_open_is_refused_and_writes_change_nothing(tmp):
    b, _ = build({0: 0}, {0: [0]})
    p = write(tmp, "ro.bochs", b)
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(p)
    assert "read-only" in ei.value.message
    with qb.open(p, flags=0) as img:
        with pytest.raises(qb.QBlockError):
            img.write(b"x", 0)
    assert p.read_bytes() == b


def test_creating_is_unsupported(tmp):
    class BochsOptions(qb.ImageOptions):
        format = qb.Format.BOCHS

    with pytest.raises(qb.UnsupportedError):
        qb.create(tmp / "new.bochs", BochsOptions(MiB))


@pytest.mark.parametrize("subtype", [b"Undoable", b"Volatile"])
def test_other_redolog_subtypes_are_unsupported(tmp, subtype):
    b = bytearray(build({0: 0}, {0: [0]})[0])
    b[48:64] = subtype.ljust(16, b"\0")
    p = write(tmp, "undo.bochs", bytes(b))
    assert qb.probe(p) is qb.Format.BOCHS  # not served as a raw disk
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(p, flags=0)
    assert subtype.decode() in ei.value.message


def test_bochs_as_a_backing_file(tmp):
    b, model = build(**CASES["v2-4k-extents"])
    base = write(tmp, "base.bochs", b)
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "bochs", str(top))
    with qb.open(top, flags=0) as img:
        assert img.info().backing_format is qb.Format.BOCHS
        st_ = img.block_status(2 * 4096, 4096)
        assert st_.depth == 1 and st_.data and not st_.allocated
        assert img.block_status(4096, 4096).zero
    qemu_io(str(top), "write -P 0x3c 4000 300")
    model = bytearray(model)
    model[4000:4300] = b"\x3c" * 300
    assert qemu_raw_bytes(str(top), tmp) == bytes(model)
    with qb.open(top, flags=0) as img:
        assert img.read(img.virt_size, 0) == bytes(model)


# --- hostile images, each opened in a limited child process -------------------------

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
    img = qb.open(p["path"], fmt=p["fmt"], flags=0)
    out["stage"] = "info"
    img.info()
    v = img.virt_size
    for off in range(0, v, max(1 << 20, v // 64)):
        out["stage"] = f"read {off}"
        img.read(min(1 << 20, v - off), off)
    out["stage"] = "map"
    for _ in img.map():
        pass
    img.close()
    out["stage"] = None
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:400]
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
print("RESULT " + json.dumps(out), flush=True)
"""



def run_child(path: Path, fmt: str = "bochs") -> dict:
    params = {"path": str(path), "fmt": fmt}
    res = run_result_child(CHILD, params, path.name, timeout=TIMEOUT, address_space=ADDRESS_SPACE)
    assert res["rss_kib"] < MAX_RSS_KIB, res
    return res


def _good() -> bytes:
    return build({0: 1, 1: 0, 2: 2}, {0: [0], 1: [1], 2: [2]})[0]


def _hdr(**kw) -> bytes:
    b = bytearray(_good())
    b[:512] = header(**kw)
    return bytes(b)


def _cat(i: int, v: int) -> bytes:
    b = bytearray(_good())
    struct.pack_into("<I", b, 512 + 4 * i, v)
    return bytes(b)


HOSTILE = {
    "truncated-header": lambda: _good()[:300],
    "header-size-inside-header": lambda: _hdr(hdr=64),
    "catalog-over-qemu-cap": lambda: _hdr(catalog=0x100001),
    "catalog-past-eof": lambda: _hdr(catalog=0x100000, disk=4096),
    "catalog-offset-past-eof": lambda: _hdr(hdr=0xFFFFFF00),
    "extent-size-zero": lambda: _hdr(extent=0),
    "extent-size-not-power-of-two": lambda: _hdr(extent=3 * 4096),
    "extent-size-over-cap": lambda: _hdr(extent=1 << 24),
    "bitmap-size-zero": lambda: _hdr(bitmap=0),
    "bitmap-too-small-for-extent": lambda: _hdr(bitmap=1, extent=64 * KiB, catalog=8, disk=8 * 4096),
    "bitmap-size-huge": lambda: _hdr(bitmap=0xFFFFFFFF),
    "disk-larger-than-catalog": lambda: _hdr(disk=8 * 4096 + 512),
    "disk-size-huge": lambda: _hdr(disk=(1 << 64) - 1),
    "catalog-entry-beyond-catalog": lambda: _cat(3, 8),
    "catalog-entry-huge": lambda: _cat(3, 0xFFFFFFFE),
    "catalog-entry-shared": lambda: _cat(3, 1),
    "extent-past-eof": lambda: _cat(3, 5),
    "last-extent-truncated": lambda: _good()[:-1],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_corrupt(tmp, name):
    p = write(tmp, f"{name}.bochs", HOSTILE[name]())
    res = run_child(p)
    assert res["exc"] == "CorruptImageError", f"{name}: {res}"


def test_largest_catalog_opens_and_maps_with_bounded_memory(tmp):
    # QEMU's caps: 0x100000 catalog entries of 8 MiB extents, an 8 TiB disk.
    n, ext = 0x100000, 0x800000
    b = bytearray(header(catalog=n, extent=ext, bitmap=2048, disk=n * ext)) + b"\xff" * (4 * n)
    struct.pack_into("<I", b, 512 + 4 * (n - 1), 0)  # the last extent allocated
    b += bytes(2048) + bytes(ext)
    b[512 + 4 * n] = 0b101  # sectors 0 and 2 present
    p = write(tmp, "largest.bochs", bytes(b))
    res = run_child(p)
    assert res["exc"] is None, res
    with qb.open(p, flags=0) as img:
        assert img.virt_size == 8 << 40
        m = [(e.length, e.allocated) for e in img.map()]
        assert m == [((8 << 40) - ext, False), (512, True), (512, False), (512, True), (ext - 1536, False)]
