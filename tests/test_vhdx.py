"""vhdx against qemu-img/qemu-io: images QEMU wrote read back byte for byte;
images and writes of ours pass `qemu-img check` and compare identical to a
model; a dirty log is replayed as QEMU replays it; hostile images are
refused quickly with bounded memory (each in a limited child process).

QEMU reports no block status for vhdx (its map says "data" everywhere), so
maps are compared with our own expectations, not QEMU's.
"""

from __future__ import annotations

import bz2
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from conftest import CORPUS, qemu_check, qemu_img, qemu_info, qemu_io, qemu_raw_bytes

MiB = 1 << 20
KiB = 1 << 10

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 1048000 300000",
    "write -z 3M 4096",
    "write -P 0x44 5000001 17",
)


def check_clean(path: Path) -> None:
    r = qemu_check(str(path))
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r
    assert r.get("check-errors", 0) == 0, r


def compare_with_model(path: Path, model: bytes, tmp: Path) -> None:
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    r = qemu_img("compare", "-f", "vhdx", "-F", "raw", str(path), str(raw), check=False)
    raw.unlink()
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- QEMU's images


@pytest.mark.parametrize(
    "opts",
    [
        "subformat=dynamic",
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_state_zero=off",
        "subformat=fixed,block_size=2M",
        "subformat=dynamic,log_size=2M,block_size=4M",
    ],
)
def test_qemu_images_read_identically(tmp, opts):
    p = tmp / "q.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", opts, str(p), "6M")
    qemu_io(str(p), *QEMU_IO_WRITES, fmt="vhdx")
    expected = qemu_raw_bytes(str(p), tmp)
    info = qemu_info(str(p))
    with qb.open(p, flags=0) as img:
        assert img.format == qb.Format.VHDX
        assert img.virt_size == len(expected) == info["virtual-size"]
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (MiB - 1, 3), (len(expected) - 3, 3)):
            assert img.read(n, off) == expected[off : off + n]
        assert img.info().cluster_size == info["cluster-size"]
        # What we map as data holds exactly the bytes QEMU wrote there.
        for e in img.map():
            if not e.data:
                assert expected[e.offset : e.offset + e.length] == bytes(e.length)


# ---------------------------------------------------------------- our images


@pytest.mark.parametrize(
    "size,kw",
    [
        (6 * MiB, {}),
        (6 * MiB, {"subformat": "fixed", "block_size": 1 * MiB}),
        (3 * 1024 * MiB, {}),
        (200 * 1024 * MiB, {"log_size": 2 * MiB}),
        (40 * MiB, {"block_size": 32 * MiB, "block_state_zero": False}),
        (512, {}),
    ],
)
def test_create_matches_qemu_img(tmp, size, kw):
    ours, theirs = tmp / "ours.vhdx", tmp / "theirs.vhdx"
    qb.create(ours, qb.VhdxOptions(size, **kw))
    o = ",".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in kw.items())
    qemu_img("create", "-q", "-f", "vhdx", *(["-o", o] if o else []), str(theirs), str(size))
    qi, ti = qemu_info(str(ours)), qemu_info(str(theirs))
    assert qi["format"] == "vhdx"
    assert qi["virtual-size"] == ti["virtual-size"] == size
    assert qi["cluster-size"] == ti["cluster-size"]
    check_clean(ours)
    with qb.open(ours, flags=0) as img:
        assert img.virt_size == size
        assert img.info().cluster_size == ti["cluster-size"]
        if size <= 64 * MiB:
            assert img.read(size, 0) == bytes(size)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_our_writes_read_by_qemu(tmp, subformat):
    p = tmp / "o.vhdx"
    size = 6 * MiB
    qb.create(p, qb.VhdxOptions(size, subformat=subformat, block_size=1 * MiB))
    model = bytearray(size)
    with qb.open(p, flags=qb.O_RDWR) as img:
        for off, n, v in ((1000, 5000, 1), (MiB - 7, 14, 2), (5 * MiB + 3, MiB - 3, 3), (0, 1, 4)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        img.write_zeroes(1000, 100)
        model[1000:1100] = bytes(100)
    check_clean(p)
    compare_with_model(p, bytes(model), tmp)
    qemu_io(str(p), "write -P 0x66 3000000 70000", fmt="vhdx")
    model[3000000:3070000] = b"\x66" * 70000
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.read(size, 0) == bytes(model)
        img.write(b"\x77" * 4096, 2 * MiB + 5)
        model[2 * MiB + 5 : 2 * MiB + 5 + 4096] = b"\x77" * 4096
    check_clean(p)
    compare_with_model(p, bytes(model), tmp)


SIZE = 5 * MiB
ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "zero", "flush", "reopen"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * MiB),
        st.integers(0, 255),
    ),
    max_size=8,
)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_random_ops_against_model(subformat):
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            d = Path(td)
            p = d / "m.vhdx"
            qb.create(p, qb.VhdxOptions(SIZE, subformat=subformat, block_size=1 * MiB))
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
            compare_with_model(p, bytes(model), d)

    run()


# ---------------------------------------------------------------- the dirty log

DIRTY = CORPUS / "images" / "qemu" / "iotest-dirtylog-10G-4M.vhdx.bz2"


def _decompress(src: Path, dst: Path) -> None:
    with bz2.open(src, "rb") as fin, open(dst, "wb") as fout:
        while True:
            chunk = fin.read(1 << 20)
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), 1)
            else:
                fout.write(chunk)
        fout.truncate()


@pytest.mark.skipif(not DIRTY.exists(), reason="conformance corpus not found")
def test_dirty_log_replayed_like_qemu(tmp):
    ours, theirs = tmp / "ours.vhdx", tmp / "theirs.vhdx"
    _decompress(DIRTY, ours)
    shutil.copyfile(ours, theirs)
    # Read-only: refused as QEMU refuses it, with the advice to replay.
    with pytest.raises(qb.UnsupportedError, match="replay"):
        qb.open(ours, flags=0)
    # QEMU replays on `check -r all`; we on a writable open.
    qemu_img("check", "-r", "all", str(theirs), check=False)
    qb.open(ours, flags=qb.O_RDWR).close()
    check_clean(ours)
    with qb.open(ours, flags=0) as a, qb.open(theirs, fmt=qb.Format.VHDX, flags=0) as b:
        assert a.virt_size == b.virt_size == qemu_info(str(theirs))["virtual-size"]
        # Compare the allocated parts (the disk is 10 GiB, mostly unallocated).
        for e in a.map():
            if e.data:
                pos = e.offset
                while pos < e.offset + e.length:
                    n = min(4 * MiB, e.offset + e.length - pos)
                    assert a.read(n, pos) == b.read(n, pos), pos
                    pos += n
    r = qemu_img("compare", "-f", "vhdx", "-F", "vhdx", str(ours), str(theirs), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- hostile images

CHILD = r"""
import json, resource, sys, time
t0 = time.monotonic()
path, rw = sys.argv[1], sys.argv[2] == "rw"
out = {"exc": None, "msg": None}
try:
    import libqblock as qb
    with qb.open(path, flags=qb.O_RDWR if rw else 0) as img:
        pos = 0
        while pos < img.virt_size:
            n = min(1 << 22, img.virt_size - pos)
            img.read(n, pos)
            pos += n
        img.map()
except Exception as e:
    out["exc"], out["msg"] = type(e).__name__, str(e)
out["elapsed"] = round(time.monotonic() - t0, 3)
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
print("RESULT " + json.dumps(out))
"""


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_hostile(path: Path, rw: bool = False) -> dict:
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), "rw" if rw else "ro"],
            capture_output=True,
            text=True,
            timeout=20,
            preexec_fn=_limit_child,
            env=dict(os.environ, RUST_BACKTRACE="0"),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name}: HANG (no answer within 20 s)")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"{path.name}: CRASH ({r.returncode}): {r.stderr[-2000:]}"
    res = json.loads(lines[-1][len("RESULT ") :])
    assert res["rss_kib"] < 256 * 1024, res
    return res


_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 & -(_c & 1))
    _TABLE.append(_c)


def crc32c_fast(data: bytes) -> int:
    crc = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def seal(b: bytearray, start: int, size: int) -> None:
    b[start + 4 : start + 8] = bytes(4)
    struct.pack_into("<I", b, start + 4, crc32c_fast(bytes(b[start : start + size])))


HDR = (64 * KiB, 128 * KiB)
RT = (192 * KiB, 256 * KiB)
LOG_AT = MiB
BAT_AT = 2 * MiB  # QEMU: log of 1 MiB at 1 MiB, BAT after it
META_AT = 3 * MiB


def _base(tmp: Path) -> bytearray:
    p = tmp / "base.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(p), "4M")
    qemu_io(str(p), "write -P 0x5a 0 4096", fmt="vhdx")
    return bytearray(p.read_bytes())


def _headers(b: bytearray, **fields) -> None:
    """Set fields in both headers and reseal them."""
    offs = {"sequence": (8, "<Q"), "version": (66, "<H"), "log_length": (68, "<I"), "log_offset": (72, "<Q")}
    for h in HDR:
        for k, v in fields.items():
            if k == "log_guid":
                b[h + 48 : h + 64] = v
            else:
                o, f = offs[k]
                struct.pack_into(f, b, h + o, v)
        seal(b, h, 4096)


def _region(b: bytearray, entry: int, field: str, value: int) -> None:
    o, f = {"offset": (16, "<Q"), "length": (24, "<I"), "count": (-8, "<I")}[field]
    for rt in RT:
        at = rt + 8 if field == "count" else rt + 16 + 32 * entry + o
        struct.pack_into(f, b, at, value)
        seal(b, rt, 64 * KiB)


def _meta_item(b: bytearray, guid_head: bytes, value: bytes) -> None:
    n = struct.unpack_from("<H", b, META_AT + 10)[0]
    for i in range(n):
        at = META_AT + 32 + 32 * i
        if b[at : at + 4] == guid_head:
            off = struct.unpack_from("<I", b, at + 16)[0]
            b[META_AT + off : META_AT + off + len(value)] = value
            return
    raise AssertionError("metadata item not found")


FILE_PARAMS = struct.pack("<I", 0xCAA16737)
VDISK_SIZE = struct.pack("<I", 0x2FA54224)
LOGICAL = struct.pack("<I", 0x8141BF1D)


def _bat(b: bytearray, i: int, value: int) -> None:
    struct.pack_into("<Q", b, BAT_AT + 8 * i, value)


def _bad_log(b: bytearray) -> None:
    """A valid log entry whose data descriptor writes into the header section."""
    g = bytes(range(16))
    entry = bytearray(8192)
    entry[0:4] = b"loge"
    struct.pack_into("<IIQI", entry, 8, 8192, 0, 1, 1)
    entry[32:48] = g
    struct.pack_into("<Q", entry, 56, len(b))
    entry[64:68] = b"desc"
    struct.pack_into("<QQ", entry, 64 + 16, 64 * KiB, 1)
    entry[4096:4100] = b"data"
    struct.pack_into("<I", entry, 4096 + 4092, 1)
    seal(entry, 0, 8192)
    b[LOG_AT : LOG_AT + 8192] = entry
    _headers(b, log_guid=g, sequence=100)


HOSTILE = {
    "both-headers-bad": lambda b: [b.__setitem__(h + 100, b[h + 100] ^ 1) for h in HDR],
    "header-version-2": lambda b: _headers(b, version=2),
    "log-offset-past-eof": lambda b: _headers(b, log_offset=1 << 50),
    "log-offset-unaligned": lambda b: _headers(b, log_offset=MiB + 4096),
    "log-in-header-section": lambda b: _headers(b, log_offset=0),
    "both-region-tables-bad": lambda b: [b.__setitem__(rt + 20, b[rt + 20] ^ 1) for rt in RT],
    "region-count-huge": lambda b: _region(b, 0, "count", 100000),
    "region-past-eof": lambda b: _region(b, 0, "offset", 1 << 45),
    "region-overlaps-log": lambda b: _region(b, 0, "offset", MiB),
    "regions-overlap": lambda b: _region(b, 1, "offset", BAT_AT),
    "metadata-signature": lambda b: b.__setitem__(slice(META_AT, META_AT + 8), b"garbage!"),
    "metadata-count-huge": lambda b: struct.pack_into("<H", b, META_AT + 10, 60000),
    "block-size-3M": lambda b: _meta_item(b, FILE_PARAMS, struct.pack("<I", 3 * MiB)),
    "block-size-512M": lambda b: _meta_item(b, FILE_PARAMS, struct.pack("<I", 512 * MiB)),
    "logical-sector-1000": lambda b: _meta_item(b, LOGICAL, struct.pack("<I", 1000)),
    "disk-size-huge": lambda b: _meta_item(b, VDISK_SIZE, struct.pack("<Q", 1 << 60)),
    "disk-size-needs-bigger-bat": lambda b: _meta_item(b, VDISK_SIZE, struct.pack("<Q", 60 << 40)),
    "bat-entry-past-eof": lambda b: _bat(b, 0, (1 << 40) | 6),
    "bat-entry-on-metadata": lambda b: _bat(b, 0, META_AT | 6),
    "bat-entry-in-header-section": lambda b: _bat(b, 0, 6),
    "bat-entries-overlap": lambda b: _bat(b, 1, struct.unpack_from("<Q", b, BAT_AT)[0]),
    "bat-state-5": lambda b: _bat(b, 1, 5),
    "bat-partially-present": lambda b: _bat(b, 1, (5 * MiB) | 7),
    "log-writes-header-section": _bad_log,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_image_is_refused(tmp, case):
    b = _base(tmp)
    HOSTILE[case](b)
    p = tmp / f"{case}.vhdx"
    p.write_bytes(bytes(b))
    res = run_hostile(p, rw=case.startswith("log-writes"))
    assert res["exc"] == "CorruptImageError", res
    assert res["elapsed"] < 5, res


def test_differencing_vhdx_is_unsupported_naming_its_parent(tmp):
    b = _base(tmp)
    # Set has_parent, and add a parent locator item naming "parent.vhdx".
    _meta_item(b, FILE_PARAMS, struct.pack("<II", MiB, 2))
    n = struct.unpack_from("<H", b, META_AT + 10)[0]
    at = META_AT + 32 + 32 * n
    b[at : at + 16] = struct.pack("<IHH", 0xA8D35F2D, 0xB30B, 0x454D) + bytes([0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C])
    key, val = "relative_path".encode("utf-16-le"), "parent.vhdx".encode("utf-16-le")
    loc = bytearray(20 + 12)
    loc[:16] = struct.pack("<IHH", 0xB04AEFB7, 0xD19E, 0x4A81) + bytes([0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13])
    struct.pack_into("<H", loc, 18, 1)
    struct.pack_into("<IIHH", loc, 20, 32, 32 + len(key), len(key), len(val))
    loc += key + val
    struct.pack_into("<III", b, at + 16, 128 * KiB, len(loc), 4)
    b[META_AT + 128 * KiB : META_AT + 128 * KiB + len(loc)] = loc
    struct.pack_into("<H", b, META_AT + 10, n + 1)
    p = tmp / "diff.vhdx"
    p.write_bytes(bytes(b))
    with pytest.raises(qb.UnsupportedError, match="parent.vhdx"):
        qb.open(p, flags=0)


def test_first_header_or_region_table_bad_uses_the_other(tmp):
    b = _base(tmp)
    b[HDR[1] + 100] ^= 1  # the newer header (QEMU's creation leaves slot 1 current)
    b[HDR[0] + 100] ^= 0
    b[RT[0] + 20] ^= 1
    p = tmp / "one-bad.vhdx"
    p.write_bytes(bytes(b))
    with qb.open(p, flags=0) as img:
        assert img.read(4096, 0) == b"\x5a" * 4096


AVHDX = CORPUS / "images" / "dissect.hypervisor" / "vhdx" / "differencing.avhdx.gz"


@pytest.mark.skipif(not AVHDX.exists(), reason="conformance corpus not found")
def test_hyperv_differencing_image_names_its_parent(tmp):
    import gzip

    p = tmp / "differencing.avhdx"
    with gzip.open(AVHDX) as f, open(p, "wb") as o:
        shutil.copyfileobj(f, o)
    with pytest.raises(qb.UnsupportedError, match=r"parent '.*\.avhdx'"):
        qb.open(p, flags=0)


def _guid_text(g: bytes) -> str:
    d1, d2, d3 = struct.unpack_from("<IHH", g)
    return "{%08X-%04X-%04X-%s-%s}" % (d1, d2, d3, g[8:10].hex().upper(), g[10:].hex().upper())


def _current_header(b: bytes) -> int:
    seqs = [struct.unpack_from("<Q", b, h + 8)[0] if b[h : h + 4] == b"head" else -1 for h in HDR]
    return HDR[seqs.index(max(seqs))]


def _make_child(d: Path, parent: Path) -> Path:
    """A differencing child of `parent` (4 MiB, 1 MiB blocks): our dynamic
    image with has_parent set and a parent locator linking to the parent's
    data write GUID by a relative path."""
    child = d / "child.vhdx"
    qb.create(child, qb.VhdxOptions(4 * MiB, block_size=MiB, block_state_zero=False))
    pb = parent.read_bytes()
    h = _current_header(pb)
    linkage = _guid_text(pb[h + 32 : h + 48])
    b = bytearray(child.read_bytes())
    _meta_item(b, FILE_PARAMS, struct.pack("<II", MiB, 2))
    kv = [("parent_linkage", linkage), ("relative_path", ".\\" + parent.name)]
    loc = bytearray(20 + 12 * len(kv))
    loc[:16] = struct.pack("<IHH", 0xB04AEFB7, 0xD19E, 0x4A81) + bytes([0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13])
    struct.pack_into("<H", loc, 18, len(kv))
    for i, (k, v) in enumerate(kv):
        ke, ve = k.encode("utf-16-le"), v.encode("utf-16-le")
        struct.pack_into("<IIHH", loc, 20 + 12 * i, len(loc), len(loc) + len(ke), len(ke), len(ve))
        loc += ke + ve
    n = struct.unpack_from("<H", b, META_AT + 10)[0]
    at = META_AT + 32 + 32 * n
    b[at : at + 16] = struct.pack("<IHH", 0xA8D35F2D, 0xB30B, 0x454D) + bytes([0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C])
    struct.pack_into("<III", b, at + 16, 128 * KiB, len(loc), 4)
    b[META_AT + 128 * KiB : META_AT + 128 * KiB + len(loc)] = loc
    struct.pack_into("<H", b, META_AT + 10, n + 1)
    child.write_bytes(bytes(b))
    return child


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.sampled_from(["write", "zero", "reopen"]), st.integers(0, 4 * MiB - 1), st.integers(1, MiB), st.integers(0, 255)),
        max_size=6,
    )
)
def test_differencing_vhdx_random_writes_against_model(seq):
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        parent = d / "parent.vhdx"
        qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(parent), "4M")
        qemu_io(str(parent), "write -P 0x5a 1000 3M", fmt="vhdx")
        model = bytearray(qemu_raw_bytes(str(parent), d))
        child = _make_child(d, parent)
        img = qb.open(child, flags=qb.O_RDWR)
        try:
            assert img.info().backing_location is not None
            assert img.read(4 * MiB, 0) == bytes(model)
            for op, off, n, v in seq:
                n = min(n, 4 * MiB - off)
                if op == "write":
                    img.write(bytes([v]) * n, off)
                    model[off : off + n] = bytes([v]) * n
                elif op == "zero":
                    img.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                else:
                    img.close()
                    img = qb.open(child, flags=qb.O_RDWR)
            assert img.read(4 * MiB, 0) == bytes(model)
        finally:
            if not img.closed:
                img.close()
        check_clean(parent)
        assert qemu_raw_bytes(str(parent), d)[1000:1010] == b"\x5a" * 10


def test_differencing_vhdx_with_a_foreign_parent_is_refused(tmp):
    parent = tmp / "parent.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(parent), "4M")
    child = _make_child(tmp, parent)
    qemu_img("create", "-q", "-f", "vhdx", str(parent), "4M")  # a new parent: another data write GUID
    with pytest.raises(qb.CorruptImageError, match="linkage"):
        qb.open(child, flags=0)
