"""vpc (VHD) against qemu-img/qemu-io: images QEMU wrote read back byte for
byte and map as `qemu-img map` says; images and writes of ours open in QEMU
with the same size and compare identical to a model; hostile images are
refused quickly with bounded memory (each in a limited child process).

QEMU has no `check` for vpc, so `qemu-img compare` is the oracle for ours.
"""

from __future__ import annotations

import json
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

MiB = 1 << 20
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "offset")

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 2097000 300000",
    "write -z 3M 4096",
    "write -P 0x44 5000001 17",
)


def merged(entries, keys=MAP_KEYS):
    out = []
    for e in entries:
        e = {k: e[k] for k in keys if k in e}
        if out:
            last = out[-1]
            same = all(last.get(k) == e.get(k) for k in keys if k not in ("start", "length", "offset"))
            cont = ("offset" in last) == ("offset" in e) and (
                "offset" not in e or last["offset"] + last["length"] == e["offset"]
            )
            if same and cont:
                last["length"] += e["length"]
                continue
        out.append(e)
    return out


def ours_map(img):
    return [e.to_qemu_map() for e in img.map()]


def compare_with_model(path: Path, model: bytes, tmp: Path) -> None:
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    r = qemu_img("compare", "-f", "vpc", "-F", "raw", str(path), str(raw), check=False)
    raw.unlink()
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- QEMU's images


@pytest.mark.parametrize(
    "opts",
    ["subformat=dynamic", "subformat=fixed", "subformat=dynamic,force_size=on", "subformat=fixed,force_size=on"],
)
def test_qemu_images_read_identically(tmp, opts):
    p = tmp / "q.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", opts, str(p), "6M")
    qemu_io(str(p), *QEMU_IO_WRITES, fmt="vpc")
    expected = qemu_raw_bytes(str(p), tmp, "-f", "vpc")
    with qb.open(p, fmt=qb.Format.VPC, flags=0) as img:
        assert img.virt_size == len(expected) == qemu_info(str(p), "-f", "vpc")["virtual-size"]
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (2097151, 3), (len(expected) - 3, 3)):
            assert img.read(n, off) == expected[off : off + n]
        # QEMU marks holes of a fixed image's file data *and* zero; we say data.
        keys = MAP_KEYS if "dynamic" in opts else tuple(k for k in MAP_KEYS if k != "zero")
        assert merged(ours_map(img), keys) == merged(qemu_map(str(p), "-f", "vpc"), keys)
        info = img.info()
        assert info.format == qb.Format.VPC
        assert info.cluster_size == qemu_info(str(p), "-f", "vpc").get("cluster-size")


def test_probe_finds_fixed_vhd_by_its_end_footer(tmp):
    p = tmp / "f.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(p), "1M")
    with qb.open(p, flags=0) as img:
        assert img.format == qb.Format.VPC


# ---------------------------------------------------------------- our images


# A fixed image is as large as its disk: the 130 GiB size is for dynamic only.
@pytest.mark.parametrize(
    "subformat, size",
    [(sf, size) for sf in ("dynamic", "fixed") for size in (512, 10 * MiB, 10 * MiB + 1024, 130 * 1024 * MiB)
     if sf == "dynamic" or size <= 64 * MiB],
)
@pytest.mark.parametrize("force", [False, True])
def test_create_matches_qemu_img(tmp, subformat, force, size):
    ours, theirs = tmp / "ours.vhd", tmp / "theirs.vhd"
    qb.create(ours, qb.VpcOptions(size, subformat=subformat, force_size=force))
    o = f"subformat={subformat},force_size={'on' if force else 'off'}"
    qemu_img("create", "-q", "-f", "vpc", "-o", o, str(theirs), str(size))
    qi, ti = qemu_info(str(ours), "-f", "vpc"), qemu_info(str(theirs), "-f", "vpc")
    assert qi["format"] == "vpc"
    assert qi["virtual-size"] == ti["virtual-size"]
    assert qi.get("cluster-size") == ti.get("cluster-size")
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    with qb.open(ours, fmt=qb.Format.VPC, flags=0) as img:
        assert img.virt_size == ti["virtual-size"]
        assert img.info().cluster_size == ti.get("cluster-size")


def test_create_rejects_more_than_2040_gib(tmp):
    with pytest.raises(qb.InvalidParamError):
        qb.create(tmp / "big.vhd", qb.VpcOptions(2041 << 30, force_size=True))


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_our_writes_read_by_qemu(tmp, subformat):
    p = tmp / "o.vhd"
    qb.create(p, qb.VpcOptions(6 * MiB, subformat=subformat, force_size=True))
    model = bytearray(6 * MiB)
    with qb.open(p, flags=qb.O_RDWR) as img:
        for off, n, v in ((1000, 5000, 1), (2 * MiB - 7, 14, 2), (5 * MiB + 3, MiB - 3, 3), (0, 1, 4)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        img.write_zeroes(1000, 100)
        model[1000:1100] = bytes(100)
    compare_with_model(p, bytes(model), tmp)
    # QEMU writes after ours, we read QEMU's.
    qemu_io(str(p), "write -P 0x66 3000000 70000", fmt="vpc")
    model[3000000:3070000] = b"\x66" * 70000
    with qb.open(p, fmt=qb.Format.VPC, flags=0) as img:
        assert img.read(len(model), 0) == bytes(model)
        if subformat == "dynamic":
            assert merged(ours_map(img)) == merged(qemu_map(str(p), "-f", "vpc"))


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
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            d = Path(td)
            p = d / "m.vhd"
            qb.create(p, qb.VpcOptions(SIZE, subformat=subformat, force_size=True))
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
            compare_with_model(p, bytes(model), d)

    run()


# ---------------------------------------------------------------- hostile images

CHILD = r"""
import json, resource, sys, time
t0 = time.monotonic()
path, fmt = sys.argv[1], sys.argv[2]
out = {"exc": None, "msg": None}
try:
    import libqblock as qb
    with qb.open(path, fmt=None if fmt == "probe" else qb.Format.from_str(fmt), flags=0) as img:
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


def run_hostile(path: Path, fmt: str = "vpc") -> dict:
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), fmt],
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


def _sum(b: bytes, field: int) -> int:
    return ~sum(x for i, x in enumerate(b) if not field <= i < field + 4) & 0xFFFFFFFF


def _refix(img: bytearray) -> None:
    """Recompute the footer (both copies) and dynamic header checksums."""
    for at in (0, len(img) - 512):
        if img[at : at + 8] == b"conectix":
            img[at + 64 : at + 68] = struct.pack(">I", _sum(bytes(img[at : at + 512]), 64))
    if img[512:520] == b"cxsparse":
        img[548:552] = struct.pack(">I", _sum(bytes(img[512:1536]), 36))


def _base(tmp: Path) -> bytearray:
    p = tmp / "base.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(p), "4M")
    qemu_io(str(p), "write -P 0x5a 0 4096", fmt="vpc")
    return bytearray(p.read_bytes())


def _put(off: int, fmt: str, value: int, refix: bool = True):
    def f(b: bytearray) -> None:
        struct.pack_into(fmt, b, off, value)
        if refix:
            _refix(b)

    return f


def _both_footers(off: int, fmt: str, value: int):
    def f(b: bytearray) -> None:
        struct.pack_into(fmt, b, off, value)
        struct.pack_into(fmt, b, len(b) - 512 + off, value)
        _refix(b)

    return f


HOSTILE = {
    "footer-checksums-both": lambda b: [struct.pack_into(">I", b, at + 64, 0x12345678) for at in (0, len(b) - 512)],
    "disk-type-9": _both_footers(60, ">I", 9),
    "dyn-header-offset-huge": _both_footers(16, ">Q", 1 << 62),
    "dyn-header-offset-zero": _both_footers(16, ">Q", 0),
    "dyn-header-cookie": _put(512, ">Q", 0x4141414141414141),
    "dyn-header-checksum": _put(548, ">I", 1, refix=False),
    "block-size-not-pow2": _put(512 + 32, ">I", 3 << 20),
    "block-size-tiny": _put(512 + 32, ">I", 256),
    "max-table-entries-huge": _put(512 + 28, ">I", 0x40000001),
    "table-too-small": _put(512 + 28, ">I", 1),
    "bat-offset-past-eof": _put(512 + 16, ">Q", 1 << 40),
    "bat-overlaps-header": _put(512 + 16, ">Q", 512),
    "bat-entry-past-eof": _put(1536, ">I", 0x7FFFFFFF),
    "bat-entry-on-footer": _put(1536, ">I", 0),
    "bat-entries-overlap": lambda b: (struct.pack_into(">I", b, 1540, struct.unpack_from(">I", b, 1536)[0] + 1)),
    "size-over-2040-gib": _both_footers(48, ">Q", 2041 << 30),
    "truncated": lambda b: b.__delitem__(slice(4096, None)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_image_is_refused(tmp, case):
    b = _base(tmp)
    HOSTILE[case](b)
    p = tmp / f"{case}.vhd"
    p.write_bytes(bytes(b))
    res = run_hostile(p)
    assert res["exc"] == "CorruptImageError", res
    assert res["elapsed"] < 5, res


def test_hostile_fixed_footer_claims_more_than_the_file(tmp):
    p = tmp / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(p), "1M")
    b = bytearray(p.read_bytes())
    struct.pack_into(">Q", b, len(b) - 512 + 48, 1 << 40)
    _refix(b)
    p.write_bytes(bytes(b))
    res = run_hostile(p)
    assert res["exc"] == "CorruptImageError", res


def test_differencing_vhd_is_read_only_and_names_its_parent(tmp):
    b = _base(tmp)
    for at in (0, len(b) - 512):
        struct.pack_into(">I", b, at + 60, 4)
    name = "parent.vhd".encode("utf-16-be")
    b[512 + 64 : 512 + 64 + len(name)] = name
    _refix(b)
    p = tmp / "diff.vhd"
    p.write_bytes(bytes(b))
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.read(4096, 0) == b"\x5a" * 4096
        with pytest.raises(qb.UnsupportedError, match="parent.vhd"):
            img.write(b"x", 0)


def _make_child(tmp: Path, parent_uuid: bytes, locator: str = ".\\parent.vhd") -> Path:
    """A differencing child of 4 MiB: our dynamic image turned into type 4,
    naming its parent by a relative Windows locator and the Unicode name."""
    p = tmp / "child.vhd"
    qb.create(p, qb.VpcOptions(4 * MiB, force_size=True))
    b = bytearray(p.read_bytes())
    footer = b[:512]
    loc = locator.encode("utf-16-le")
    sector = loc + bytes(512 - len(loc))
    b = b[:2048] + sector + footer  # the locator data, then the footer
    for at in (0, len(b) - 512):
        struct.pack_into(">I", b, at + 60, 4)
    b[512 + 40 : 512 + 56] = parent_uuid
    name = "parent.vhd".encode("utf-16-be")
    b[512 + 64 : 512 + 64 + len(name)] = name
    b[512 + 576 : 512 + 580] = b"W2ru"
    struct.pack_into(">IIIQ", b, 512 + 580, 1, len(loc), 0, 2048)
    _refix(b)
    p.write_bytes(bytes(b))
    return p


def test_differencing_vhd_reads_and_writes_through_its_parent(tmp):
    parent = tmp / "parent.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(parent), "4M")
    qemu_io(str(parent), "write -P 0x5a 0 3M", fmt="vpc")
    model = bytearray(qemu_raw_bytes(str(parent), tmp, "-f", "vpc"))
    child = _make_child(tmp, parent.read_bytes()[68:84])
    with qb.open(child, flags=qb.O_RDWR) as img:
        assert img.info().backing_location is not None
        assert img.read(4 * MiB, 0) == bytes(model)
        st = img.block_status(0, 4 * MiB)
        assert (st.allocated, st.depth, st.data) == (False, 1, True)
        for off, n, v in ((1000, 5000, 1), (2 * MiB - 7, 14, 2), (3 * MiB + 3, 100, 3)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        assert img.read(4 * MiB, 0) == bytes(model)
        assert img.block_status(0, 4 * MiB).depth == 0
    # Sectors whose bitmap bit is clear come from the parent again.
    b = bytearray(child.read_bytes())
    first_block = struct.unpack_from(">I", b, 1536)[0] * 512
    b[first_block] = 0x0F  # sectors 0-3 of block 0 absent
    child.write_bytes(bytes(b))
    with qb.open(child, flags=0) as img:
        assert img.read(2048, 0) == b"\x5a" * 2048
        assert img.read(4096, 2048) == bytes(model[2048:6144])
    # QEMU reads the child alone (no parent support): our blocks are there.
    assert qemu_raw_bytes(str(child), tmp, "-f", "vpc")[1000:6000] == b"\x01" * 5000


def test_differencing_vhd_with_a_foreign_parent_is_refused(tmp):
    parent = tmp / "parent.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(parent), "4M")
    child = _make_child(tmp, bytes(16))
    with pytest.raises(qb.CorruptImageError, match="UUID"):
        qb.open(child, flags=0)


def test_alternating_sector_bitmap_reads_sector_by_sector(tmp):
    b = _base(tmp)  # block 0 allocated by qemu-io, full of 0x5a in its first 4 KiB
    block = struct.unpack_from(">I", b, 1536)[0] * 512
    b[block : block + 512] = b"\xaa" * 512  # even sectors present, odd ones absent
    p = tmp / "alt.vhd"
    p.write_bytes(bytes(b))
    with qb.open(p, flags=0) as img:
        data = img.read(2 * MiB, 0)
    expect = bytearray(2 * MiB)
    for s in range(0, 8, 2):
        expect[s * 512 : s * 512 + 512] = b"\x5a" * 512
    assert data == bytes(expect)


def test_bad_footer_copy_at_0_falls_back_to_the_end_footer(tmp):
    b = _base(tmp)
    struct.pack_into(">I", b, 64, 0x12345678)
    p = tmp / "copy0-bad.vhd"
    p.write_bytes(bytes(b))
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.read(4096, 0) == b"\x5a" * 4096
        img.write(b"\x01" * 10, 3 * MiB)
    with qb.open(p, flags=0) as img:
        assert img.read(10, 3 * MiB) == b"\x01" * 10


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.sampled_from(["write", "zero", "reopen"]), st.integers(0, 4 * MiB - 1), st.integers(1, MiB), st.integers(0, 255)),
        max_size=6,
    )
)
def test_differencing_random_writes_against_model(seq):
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        parent = d / "parent.vhd"
        qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(parent), "4M")
        qemu_io(str(parent), "write -P 0x5a 1000 3M", fmt="vpc")
        model = bytearray(qemu_raw_bytes(str(parent), d, "-f", "vpc"))
        child = _make_child(d, parent.read_bytes()[68:84])
        img = qb.open(child, flags=qb.O_RDWR)
        try:
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
        # The parent is untouched.
        assert qemu_raw_bytes(str(parent), d, "-f", "vpc")[1000:1010] == b"\x5a" * 10
