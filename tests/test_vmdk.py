"""vmdk against qemu-img/qemu-io: every subformat QEMU writes reads back byte
for byte and maps as `qemu-img map` says; images we create and write pass
`qemu-img check` and compare equal to a model; descriptors with mixed
extents; backing chains both ways; hostile images refused in a limited
child process."""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from conftest import CORPUS, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
GRAIN = 64 * KiB
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "compressed", "offset")
# For flat extents QEMU asks the host file too and reports holes as
# data+zero, which our status model (data xor hole) does not express.
FLAT_MAP_KEYS = ("start", "length", "depth", "present", "data", "compressed", "offset")

QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 70001 200000",
    "write -P 0x33 2M 4096",
    "write -P 0x44 3145721 17",
    "write -P 0x55 5000000 70000",
)


def strip(entries, keys=MAP_KEYS):
    """Comparable map: chosen keys, adjacent extents merged where all but the
    length agree and host offsets continue."""
    out = []
    for e in entries:
        e = {k: e[k] for k in keys if k in e}
        if out:
            last = out[-1]
            same = all(last.get(k) == e.get(k) for k in keys if k not in ("start", "length", "offset"))
            cont = ("offset" in last) == ("offset" in e) and (
                "offset" not in e or last["offset"] + last["length"] == e["offset"]
            )
            if same and cont and last["start"] + last["length"] == e["start"]:
                last["length"] += e["length"]
                continue
        out.append(e)
    return out


def ours_map(img):
    return [e.to_qemu_map() for e in img.map()]


def check_clean(path):
    r = qemu_check(str(path))
    assert r.get("corruptions", 0) == 0 and r.get("check-errors", 0) == 0, r
    return r


def assert_reads_like_qemu(path, tmp, map_keys=MAP_KEYS):
    expected = qemu_raw_bytes(str(path), tmp)
    with qb.open(path, flags=0) as img:
        assert img.format is qb.Format.VMDK
        assert img.virt_size == len(expected)
        assert img.read(len(expected), 0) == expected
        for off, n in ((1, 1), (999, 7777), (65535, 65538), (len(expected) - 3, 3)):
            if off + n <= len(expected):
                assert img.read(n, off) == expected[off : off + n], (off, n)
        assert strip(ours_map(img), map_keys) == strip(qemu_map(str(path)), map_keys)
    return expected


def assert_info_like_qemu(path):
    info = qemu_info(str(path))
    with qb.open(path, flags=0) as img:
        i = img.info()
        assert i.format is qb.Format.VMDK
        assert i.virt_size == info["virtual-size"]
        assert i.cluster_size == info.get("cluster-size")
        assert i.format_specific == info["format-specific"]["data"]
        assert (i.backing_location is None) == ("backing-filename" not in info)


# --- reading what QEMU wrote ---------------------------------------------------

READ_MATRIX = {
    "monolithicSparse": ("-o", "subformat=monolithicSparse"),
    "monolithicFlat": ("-o", "subformat=monolithicFlat"),
    "twoGbMaxExtentSparse": ("-o", "subformat=twoGbMaxExtentSparse"),
    "twoGbMaxExtentFlat": ("-o", "subformat=twoGbMaxExtentFlat"),
    "zeroed_grain": ("-o", "zeroed_grain=on"),
    "compat6": ("-o", "compat6=on,adapter_type=lsilogic"),
}


@pytest.mark.parametrize("name", sorted(READ_MATRIX))
def test_read_and_map_what_qemu_wrote(tmp, name):
    p = tmp / f"{name}.vmdk"
    qemu_img("create", "-f", "vmdk", *READ_MATRIX[name], str(p), "6M")
    writes = QEMU_IO_WRITES
    if name == "zeroed_grain":
        writes += ("write -z 128k 192k", "write -z 64k 64k")
    qemu_io(str(p), *writes, fmt="vmdk")
    assert_reads_like_qemu(p, tmp, FLAT_MAP_KEYS if "Flat" in name else MAP_KEYS)
    assert_info_like_qemu(p)


def test_stream_optimized_read(tmp):
    raw = tmp / "src.raw"
    rnd = random.Random(4)
    data = bytearray(5 * MiB + 512)
    for off in (0, 70001, 2 * MiB, 5 * MiB - 100):
        chunk = bytes(rnd.getrandbits(8) for _ in range(3000)) * 10
        data[off : off + len(chunk)] = chunk[: len(data) - off]
    data[3 * MiB : 3 * MiB + 65536] = b"\x5a" * 65536  # compresses well
    raw.write_bytes(bytes(data))
    p = tmp / "s.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(p))
    assert_reads_like_qemu(p, tmp)
    assert_info_like_qemu(p)
    with qb.open(p, flags=0) as img:
        assert img.read(len(data), 0) == bytes(data)
        assert img.info().format_specific["create-type"] == "streamOptimized"
    with qb.open(p, flags=qb.O_RDWR) as img:
        with pytest.raises(qb.UnsupportedError):
            img.write(b"x", 4 * MiB)


def test_split_extents_across_2gb_boundaries(tmp):
    """4.5 GiB in three extents (sparse and flat): writes crossing extent
    boundaries read back, maps agree; only small ranges are compared."""
    for sub in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        p = tmp / f"{sub}.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", f"subformat={sub}", str(p), str(4 * GiB + GiB // 2))
        qemu_io(str(p), f"write -P 0x61 {2 * GiB - 1000} 3000", f"write -P 0x62 {4 * GiB - 5} 70000", fmt="vmdk")
        with qb.open(p, flags=0) as img:  # read-only: qemu-img map may open it beside us
            assert img.virt_size == 4 * GiB + GiB // 2
            assert img.read(3000, 2 * GiB - 1000) == b"\x61" * 3000
            assert img.read(70002, 4 * GiB - 6) == b"\0" + b"\x62" * 70000 + b"\0"
            keys = FLAT_MAP_KEYS if "Flat" in sub else MAP_KEYS
            assert strip(ours_map(img), keys) == strip(qemu_map(str(p)), keys)
            assert len(img.info().format_specific["extents"]) == 3
        with qb.open(p, flags=qb.O_RDWR) as img:
            img.write(b"\x63" * 100000, 2 * GiB - 50000)
        out = qemu_io(str(p), f"read -P 0x63 {2 * GiB - 50000} 100000", fmt="vmdk")
        assert "Pattern verification failed" not in out
        check_clean(p)


# --- images we create -------------------------------------------------------------

CREATE_MATRIX = [
    dict(),
    dict(subformat="monolithicFlat"),
    dict(subformat="twoGbMaxExtentSparse"),
    dict(subformat="twoGbMaxExtentFlat"),
    dict(zeroed_grain=True),
    dict(compat6=True),
    dict(adapter_type="lsilogic", hwversion="10", toolsversion="12"),
    dict(adapter_type="legacyESX", subformat="monolithicFlat"),
]


@pytest.mark.parametrize("opts", CREATE_MATRIX, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_create_matches_qemu(tmp, opts):
    p = tmp / "n.vmdk"
    size = 5 * MiB + 512 * 3
    qb.create(p, qb.VmdkOptions(size, **opts))
    check_clean(p)
    info = qemu_info(str(p))
    assert info["format"] == "vmdk" and info["virtual-size"] == size
    fs = info["format-specific"]["data"]
    assert fs["create-type"] == opts.get("subformat", "monolithicSparse")
    assert fs["parent-cid"] == 0xFFFFFFFF
    assert qemu_raw_bytes(str(p), tmp) == bytes(size)
    desc = qemu_desc(p)
    hw = "6" if opts.get("compat6") else opts.get("hwversion", "4")
    assert f'ddb.virtualHWVersion = "{hw}"' in desc
    assert f'ddb.adapterType = "{opts.get("adapter_type", "ide")}"' in desc
    model = bytearray(size)
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.info().format_specific == fs
        for off, n in ((12345, 70000), (size - 700, 700), (GRAIN, GRAIN), (3 * MiB + 1, 1)):
            chunk = os.urandom(n)
            img.write(chunk, off)
            model[off : off + n] = chunk
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    assert_reads_like_qemu(p, tmp, FLAT_MAP_KEYS if "Flat" in opts.get("subformat", "") else MAP_KEYS)


def qemu_desc(p: Path) -> str:
    data = p.read_bytes()
    if data[:4] == b"KDMV":
        data = data[512 : 512 * 21]
    return data.split(b"\0")[0].decode()


def grain_data(i: int) -> bytes:
    """A grain of text-like, repeated or random bytes, by index."""
    if i % 3 == 0:
        return b"".join(b"grain %d line %05d\n" % (i, k) for k in range(4000))[:GRAIN]
    if i % 3 == 1:
        return bytes([i & 0xFF]) * GRAIN
    return os.urandom(GRAIN)


def test_stream_optimized_created_and_written_in_whole_grains(tmp):
    """QEMU's streamOptimized layout: whole grains, in any order, each once; qemu-img finds the image
    clean and reads the model; what qemu-io writes into ours and ours into QEMU's reads back."""
    p = tmp / "s.vmdk"
    size = 3 * MiB + 512 * 5  # a short last grain
    qb.create(p, qb.VmdkOptions(size, subformat="streamOptimized"))
    info = qemu_info(str(p))
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["format-specific"]["data"]["extents"][0]["compressed"] is True
    model = bytearray(size)
    order = list(range(size // GRAIN))
    random.Random(5).shuffle(order)
    with qb.open(p, flags=qb.O_RDWR) as img:
        for i in order[:30]:
            d = grain_data(i)
            img.write(d, i * GRAIN)
            model[i * GRAIN : (i + 1) * GRAIN] = d
        tail = os.urandom(size % GRAIN)
        img.write(tail, size - len(tail))
        model[size - len(tail):] = tail
        i = order[0]
        with pytest.raises(qb.UnsupportedError, match="once"):
            img.write(grain_data(i), i * GRAIN)
        with pytest.raises(qb.UnsupportedError, match="whole grains"):
            img.write(b"x" * 512, order[40] * GRAIN)
        with pytest.raises(qb.UnsupportedError, match="whole grains"):
            img.write(b"x" * GRAIN, order[40] * GRAIN + 512)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    assert_reads_like_qemu(p, tmp)
    # QEMU writes a free grain of ours; we write a free grain of QEMU's
    free = order[45]
    qemu_io(str(p), f"write -P 0x5a {free * GRAIN} {GRAIN}", fmt="vmdk")
    model[free * GRAIN : (free + 1) * GRAIN] = b"\x5a" * GRAIN
    q = tmp / "q.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(q), str(size))
    qemu_io(str(q), f"write -P 0x11 {GRAIN} {GRAIN}", fmt="vmdk")
    with qb.open(q, flags=qb.O_RDWR) as img:
        img.write(grain_data(3), 3 * GRAIN)
        with pytest.raises(qb.UnsupportedError):
            img.write(grain_data(3), GRAIN)
    check_clean(q)
    assert qemu_raw_bytes(str(q), tmp) == bytes(GRAIN) + b"\x11" * GRAIN + bytes(GRAIN) + grain_data(3) + bytes(
        size - 4 * GRAIN)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)


def test_convert_to_stream_optimized_matches_qemu_img(tmp):
    """convert compresses every grain on its workers; qemu-img checks and compares the result, and it is
    no larger than qemu-img's own."""
    src = tmp / "src.raw"
    size = 6 * MiB + 512 * 3
    data = bytearray(size)
    for i in range(0, size // GRAIN, 2):
        data[i * GRAIN : (i + 1) * GRAIN] = grain_data(i)
    data[-1000:] = os.urandom(1000)
    src.write_bytes(bytes(data))
    ours, theirs = tmp / "ours.vmdk", tmp / "theirs.vmdk"
    qb.convert(src, ours, qb.VmdkOptions(0 or size, subformat="streamOptimized"))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src), str(theirs))
    check_clean(ours)
    assert qemu_img("compare", "-f", "raw", "-F", "vmdk", str(src), str(ours), check=False).returncode == 0
    assert qemu_info(str(ours))["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert ours.stat().st_size <= theirs.stat().st_size * 1.02
    assert_reads_like_qemu(ours, tmp)
    # -c to a vmdk that cannot hold compressed grains is refused (qemu-img silently writes it plain)
    with pytest.raises(qb.UnsupportedError, match="streamOptimized"):
        qb.convert(src, tmp / "plain.vmdk", qb.VmdkOptions(size), compress=True)
    assert not (tmp / "plain.vmdk").exists()


def model_ops():
    size = 3 * MiB
    op = st.tuples(
        st.sampled_from(["write", "zero"]),
        st.integers(0, size - 1),
        st.integers(1, 150000),
        st.integers(1, 255),
    )
    return st.lists(op, min_size=1, max_size=8)


@pytest.mark.parametrize("sub", ["monolithicSparse", "zeroed_grain", "twoGbMaxExtentFlat"])
def test_random_ops_against_model(tmp, sub):
    size = 3 * MiB
    counter = [0]
    opts = dict(zeroed_grain=True) if sub == "zeroed_grain" else dict(subformat=sub)

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model_ops())
    def run(ops):
        counter[0] += 1
        p = tmp / f"m{counter[0]}.vmdk"
        qb.create(p, qb.VmdkOptions(size, **opts))
        model = bytearray(size)
        with qb.open(p, flags=qb.O_RDWR | qb.O_CACHE_WB) as img:
            for kind, off, n, byte in ops:
                n = min(n, size - off)
                if kind == "write":
                    data = bytes([byte]) * n
                    img.write(data, off)
                else:
                    data = bytes(n)
                    img.write_zeroes(off, n)
                model[off : off + n] = data
                assert img.read(n, off) == data
        with qb.open(p, flags=0) as img:
            assert img.read(size, 0) == bytes(model)
            keys = FLAT_MAP_KEYS if "Flat" in sub else MAP_KEYS
            assert strip(ours_map(img), keys) == strip(qemu_map(str(p)), keys)
        check_clean(p)
        modelp = tmp / f"m{counter[0]}.raw"
        modelp.write_bytes(bytes(model))
        r = qemu_img("compare", "-f", "vmdk", "-F", "raw", str(p), str(modelp), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        for f in tmp.glob(f"m{counter[0]}*"):
            f.unlink()

    run()


def test_write_where_no_grain_table_exists(tmp):
    """An image whose directory entries are empty (tables not preallocated):
    our writes add zeroed tables, and QEMU then reads and checks it."""
    p = tmp / "nogt.vmdk"
    qemu_img("create", "-f", "vmdk", str(p), "40M")  # two grain tables
    d = bytearray(p.read_bytes())
    gd, rgd = struct.unpack_from("<Q", d, 56)[0] * 512, struct.unpack_from("<Q", d, 48)[0] * 512
    for at in (gd, gd + 4, rgd, rgd + 4):
        struct.pack_into("<I", d, at, 0)
    p.write_bytes(bytes(d))
    model = bytearray(40 * MiB)
    with qb.open(p, flags=qb.O_RDWR | qb.O_CACHE_WB) as img:
        for off, n, b in ((100, 5000, 1), (33 * MiB + 3, 70000, 2), (5 * MiB, 65536, 3)):
            img.write(bytes([b]) * n, off)
            model[off : off + n] = bytes([b]) * n
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)
    assert_reads_like_qemu(p, tmp)


def test_concurrent_writers_and_readers(tmp):
    import threading

    p = tmp / "t.vmdk"
    qb.create(p, qb.VmdkOptions(8 * MiB))
    errors = []
    with qb.open(p, flags=qb.O_RDWR | qb.O_CACHE_WB) as img:

        def writer(k):
            try:
                for i in range(40):
                    off = (k * 2 * MiB) + i * 50000
                    img.write(bytes([k + 1]) * 30000, off)
                    assert img.read(30000, off) == bytes([k + 1]) * 30000
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    check_clean(p)
    data = qemu_raw_bytes(str(p), tmp)
    for k in range(4):
        for i in range(40):
            off = k * 2 * MiB + i * 50000
            assert data[off : off + 30000] == bytes([k + 1]) * 30000


CRASH = r"""
import os, sys
import libqblock as qb
img = qb.open(sys.argv[1], flags=qb.O_RDWR | qb.O_CACHE_WB)
img.write(b"A" * 100000, 0)
img.flush()
img.write(b"B" * 100000, 3 << 20)
os._exit(0)  # a crash: no close, no flush, no destructors
"""


def test_crash_before_flush_leaves_a_consistent_image(tmp):
    """Grains are written before their table entries, which reach the file
    only at flush: a crash loses the unflushed write, never the image."""
    p = tmp / "c.vmdk"
    qb.create(p, qb.VmdkOptions(4 * MiB))
    subprocess.run([sys.executable, "-c", CRASH, str(p)], check=True, timeout=30)
    check_clean(p)
    data = qemu_raw_bytes(str(p), tmp)
    assert data[:100000] == b"A" * 100000
    assert data[3 * MiB : 3 * MiB + 100000] == bytes(100000)


# --- backing files ----------------------------------------------------------------


def test_our_overlay_on_qemu_base(tmp):
    base = tmp / "base.vmdk"
    qemu_img("create", "-f", "vmdk", str(base), "4M")
    qemu_io(str(base), "write -P 0xaa 0 4M", fmt="vmdk")
    top = tmp / "top.vmdk"
    qb.create(top, qb.VmdkOptions(0, backing="base.vmdk"))
    info = qemu_info(str(top))
    assert info["backing-filename"] == "base.vmdk" and info["virtual-size"] == 4 * MiB
    base_cid = qemu_info(str(base))["format-specific"]["data"]["cid"]
    assert info["format-specific"]["data"]["parent-cid"] == base_cid
    with qb.open(top, flags=qb.O_RDWR) as img:
        i = img.info()
        assert i.backing_format is qb.Format.VMDK
        img.write(b"\x01" * 1000, 100000)
        st_ = img.block_status(0, 4 * MiB)
        assert not st_.allocated and st_.depth == 1
    check_clean(top)
    expected = bytearray(b"\xaa" * 4 * MiB)
    expected[100000:101000] = b"\x01" * 1000
    assert qemu_raw_bytes(str(top), tmp) == bytes(expected)
    assert_reads_like_qemu(top, tmp)


def test_qemu_overlay_on_our_base(tmp):
    base = tmp / "base.vmdk"
    qb.create(base, qb.VmdkOptions(4 * MiB))
    with qb.open(base, flags=qb.O_RDWR) as img:
        img.write(b"\xbb" * (2 * MiB), MiB)
    top = tmp / "top.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(top))
    qemu_io(str(top), "write -P 0x77 1500000 100", fmt="vmdk")
    assert_reads_like_qemu(top, tmp)
    with qb.open(top, flags=0) as img:
        assert img.info().backing_location is not None


def test_changed_parent_is_refused_like_qemu(tmp):
    """A write to the parent changes its CID; QEMU and we then refuse to read
    the overlay's unallocated ranges through it."""
    base = tmp / "base.vmdk"
    qb.create(base, qb.VmdkOptions(2 * MiB))
    top = tmp / "top.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(top))
    qemu_io(str(top), "write -P 0x12 0 4096", fmt="vmdk")
    qemu_raw_bytes(str(top), tmp)  # fine while the CIDs match
    with qb.open(base, flags=qb.O_RDWR) as img:
        img.write(b"x", MiB)
    assert qemu_img("convert", "-O", "raw", str(top), str(tmp / "o.raw"), check=False).returncode != 0
    with qb.open(top, flags=0) as img:
        assert img.read(4096, 0) == b"\x12" * 4096
        with pytest.raises(qb.CorruptImageError):
            img.read(10, MiB)


# --- hand-written descriptors -------------------------------------------------------


def test_descriptor_with_mixed_extents(tmp):
    """FLAT at an offset, VMFS, and a SPARSE extent made by qemu-img, in one
    descriptor; QEMU reads it the same way."""
    flat = tmp / "data.bin"
    flat_bytes = os.urandom(3 * MiB)
    flat.write_bytes(flat_bytes)
    vmfs = tmp / "vmfs.bin"
    vmfs.write_bytes(b"\x42" * MiB)
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(tmp / "sp.vmdk"), "2M")
    qemu_io(str(tmp / "sp.vmdk"), "write -P 0x99 65536 65536", fmt="vmdk")
    desc = (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        'RW 2048 FLAT "data.bin" 2048\n'
        'RW 4096 SPARSE "sp-s001.vmdk"\n'
        'RW 2048 VMFS "vmfs.bin"\n'
    )
    p = tmp / "mixed.vmdk"
    p.write_text(desc)
    expected = assert_reads_like_qemu(p, tmp, FLAT_MAP_KEYS)
    assert expected[: MiB] == flat_bytes[MiB : 2 * MiB]
    assert expected[MiB + 65536 : MiB + 131072] == b"\x99" * 65536
    assert expected[3 * MiB :] == b"\x42" * MiB
    assert_info_like_qemu(p)
    with qb.open(p, flags=qb.O_RDWR) as img:
        img.write(b"\x07" * 200000, MiB - 100000)  # flat into sparse
        img.write(b"\x08" * 5, 4 * MiB - 5)
    out = qemu_io(str(p), f"read -P 0x07 {MiB - 100000} 200000", "read -P 0x08 4194299 5", fmt="vmdk")
    assert "Pattern verification failed" not in out
    assert flat.read_bytes()[2 * MiB - 100000 : 2 * MiB] == b"\x07" * 100000


def test_zero_and_rdonly_extents(tmp):
    """Extents QEMU skips: ZERO reads as zeroes, RDONLY reads but refuses
    writes (our behaviour; see the module docs)."""
    (tmp / "a.bin").write_bytes(b"\x11" * MiB)
    (tmp / "b.bin").write_bytes(b"\x22" * MiB)
    p = tmp / "z.vmdk"
    p.write_text(
        'version=1\ncreateType="monolithicFlat"\n'
        'RW 2048 FLAT "a.bin" 0\nRW 2048 ZERO\nRDONLY 2048 FLAT "b.bin" 0\n'
    )
    with qb.open(p, flags=qb.O_RDWR) as img:
        assert img.virt_size == 3 * MiB
        assert img.read(3 * MiB, 0) == b"\x11" * MiB + bytes(MiB) + b"\x22" * MiB
        st_ = img.block_status(MiB, MiB)
        assert st_.allocated and st_.zero and not st_.data and st_.length == MiB
        img.write(b"x", 5)
        with pytest.raises(qb.UnsupportedError):
            img.write(b"x", MiB + 5)
        with pytest.raises(qb.UnsupportedError):
            img.write(b"x", 2 * MiB + 5)


def make_cowd(path: Path) -> bytes:
    """A VMFS sparse ("COWD") extent by hand: 2 MiB in 4 KiB grains, one
    4096-entry grain table, three grains written. Returns the disk."""
    sectors, gran = 4096, 8
    disk = bytearray(sectors * 512)
    hdr = bytearray(512)
    hdr[:4] = b"COWD"
    struct.pack_into("<IIIIII", hdr, 4, 1, 3, sectors, gran, 1, 1)
    gd = bytearray(512)
    struct.pack_into("<I", gd, 0, 2)
    gt = bytearray(4096 * 4)
    grains = bytearray()
    for i, g in enumerate((0, 5, 300)):
        data = bytes([0x40 + i]) * (gran * 512)
        struct.pack_into("<I", gt, 4 * g, 2 + 32 + i * gran)
        grains += data
        disk[g * gran * 512 : (g + 1) * gran * 512] = data
    path.write_bytes(bytes(hdr + gd + gt + grains))
    return bytes(disk)


def test_vmfs_sparse_cowd_extents(tmp):
    c = tmp / "c.vmdk"
    disk = make_cowd(c)
    # QEMU opens a bare COWD extent only if "CID" happens to follow the
    # header (it reads a descriptor there); we read it as its own disk.
    with qb.open(c, flags=0) as img:
        assert img.read(len(disk), 0) == disk
        assert img.info().format_specific["create-type"] == "vmfsSparse"
    d = tmp / "d.vmdk"
    d.write_text('version=1\nCID=1\nparentCID=ffffffff\ncreateType="vmfsSparse"\nRW 4096 VMFSSPARSE "c.vmdk"\n')
    assert assert_reads_like_qemu(d, tmp) == disk
    assert_info_like_qemu(d)
    with qb.open(d, flags=qb.O_RDWR) as img:
        img.write(b"\x77" * 10000, 4000)
    model = bytearray(disk)
    model[4000:14000] = b"\x77" * 10000
    assert qemu_raw_bytes(str(d), tmp) == bytes(model)


def test_sesparse_extent_through_a_descriptor(tmp):
    """The corpus's bare SEsparse extent, named by a descriptor: read-only,
    as QEMU reads it (the header's capacity counts, not the line's)."""
    import gzip
    import shutil

    src = CORPUS / "images" / "dissect.hypervisor" / "vmdk" / "sesparse.vmdk.gz"
    if not src.exists():
        pytest.skip("conformance corpus not found")
    with gzip.open(src, "rb") as fin, open(tmp / "se.bin", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    p = tmp / "d.vmdk"
    p.write_text('version=1\nCID=1\nparentCID=ffffffff\ncreateType="seSparse"\nRW 20480 SESPARSE "se.bin"\n')
    out = tmp / "o.raw"
    qemu_img("convert", "-O", "raw", str(p), str(out))
    with qb.open(p, flags=0) as img, open(out, "rb") as f:  # 512 MiB: compared in chunks
        assert img.virt_size == out.stat().st_size
        for pos in range(0, img.virt_size, 8 * MiB):
            assert img.read(8 * MiB, pos) == f.read(8 * MiB), pos
        assert strip(ours_map(img)) == strip(qemu_map(str(p)))
    out.unlink()
    assert_info_like_qemu(p)
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, flags=qb.O_RDWR)


def test_sesparse_extent_without_descriptor_is_raw(tmp):
    p = tmp / "se.vmdk"
    p.write_bytes(struct.pack("<Q", 0xCAFEBABE) + bytes(4096))
    with qb.open(p, flags=0) as img:
        assert img.format is qb.Format.RAW


# --- hostile images -----------------------------------------------------------------

CHILD = r"""
import sys, resource
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import libqblock as qb
try:
    with qb.open(sys.argv[1], flags=0) as img:
        img.info()
        size = img.virt_size
        pos = 0
        while pos < size and pos < (256 << 20):
            n = min(1 << 20, size - pos)
            img.read(n, pos)
            pos += n
        if size:
            img.read(1, size - 1)
        img.map()
    print("ok")
except qb.QBlockError as e:
    print(type(e).__name__, e.message[:200])
"""


def run_child(path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"child crashed ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout.strip()


def hdr_field(data: bytearray, off: int, fmt: str, value: int):
    struct.pack_into(fmt, data, off, value)


def make_sparse(tmp: Path) -> bytearray:
    p = tmp / "base-sparse.vmdk"
    if not p.exists():
        qemu_img("create", "-f", "vmdk", str(p), "4M")
        qemu_io(str(p), "write -P 0x33 0 128k", fmt="vmdk")
    return bytearray(p.read_bytes())


def with_footer(d: bytearray) -> bytearray:
    """Move the grain directory offset into a footer (GD_AT_END), as VMware's
    stream writers do: footer marker, header copy, end-of-stream marker."""
    footer = bytearray(d[:512])
    hdr_field(d, 56, "<Q", (1 << 64) - 1)
    marker = bytearray(512)
    hdr_field(marker, 12, "<I", 3)
    return d + marker + footer + bytearray(512)


def make_stream(tmp: Path) -> bytearray:
    p = tmp / "base-stream.vmdk"
    if not p.exists():
        raw = tmp / "s.raw"
        raw.write_bytes(os.urandom(128 * KiB) + bytes(MiB))
        q = tmp / "q-stream.vmdk"
        qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(q))
        p.write_bytes(bytes(with_footer(bytearray(q.read_bytes()))))
    return bytearray(p.read_bytes())


def test_stream_optimized_footer(tmp):
    """The grain directory found through the footer reads as QEMU reads it."""
    p = tmp / "f.vmdk"
    p.write_bytes(bytes(make_stream(tmp)))
    assert_reads_like_qemu(p, tmp)


def gd_of(d: bytearray) -> int:
    return struct.unpack_from("<Q", d, 56)[0] * 512


def gt_of(d: bytearray) -> int:
    return struct.unpack_from("<I", d, gd_of(d))[0] * 512


def first_grain(d: bytearray) -> int:
    return struct.unpack_from("<I", d, gt_of(d))[0] * 512


def stream_grain(d: bytearray, idx: int = 0) -> int:
    # the footer (second-to-last sector) holds the grain directory offset
    footer = len(d) - 1024
    gd = struct.unpack_from("<Q", d, footer + 56)[0] * 512
    gt = struct.unpack_from("<I", d, gd)[0] * 512
    return struct.unpack_from("<I", d, gt + 4 * idx)[0] * 512


def _set(off, fmt, value):
    return lambda d: hdr_field(d, off, fmt, value)


HOSTILE_SPARSE = {
    "capacity-huge": _set(12, "<Q", 2233785398448881665),
    "capacity-overflow": _set(12, "<Q", 1 << 62),
    "granularity-0": _set(20, "<Q", 0),
    "granularity-huge": _set(20, "<Q", 1 << 40),
    "gtes-0": _set(44, "<I", 0),
    "gtes-huge": _set(44, "<I", 1 << 31),
    "rgd-beyond-eof": _set(48, "<Q", 1 << 40),
    "gd-beyond-eof": _set(56, "<Q", 1 << 33),
    "gd-at-header": _set(56, "<Q", 0),
    "grain-offset-beyond-eof": _set(64, "<Q", 1 << 50),
    "gd-entry-beyond-eof": lambda d: hdr_field(d, gd_of(d), "<I", 0xFFFFFFF0),
    "gte-beyond-eof": lambda d: hdr_field(d, gt_of(d), "<I", 0x7FFFFFFF),
    "gd-at-end-no-footer": _set(56, "<Q", (1 << 64) - 1),
    "truncated-header": lambda d: d.__delitem__(slice(200, None)),
}

HOSTILE_STREAM = {
    "footer-magic": lambda d: d.__setitem__(len(d) - 1024, 0),
    "footer-marker-type": lambda d: hdr_field(d, len(d) - 1536 + 12, "<I", 7),
    "eos-marker": lambda d: hdr_field(d, len(d) - 512, "<Q", 5),
    "grain-marker-size-0": lambda d: hdr_field(d, stream_grain(d) + 8, "<I", 0),
    "grain-marker-size-huge": lambda d: hdr_field(d, stream_grain(d) + 8, "<I", 0xFFFFFFFF),
    "grain-garbage": lambda d: d.__setitem__(slice(stream_grain(d) + 12, stream_grain(d) + 40), b"\xff" * 28),
    "grain-size-1gib": lambda d: hdr_field(d, len(d) - 1024 + 20, "<Q", 0x200000),
    "grain-marker-past-eof": lambda d: hdr_field(d, stream_grain(d, 1) + 8, "<I", 2 * 65536),
    "footer-gd-beyond-eof": lambda d: hdr_field(d, len(d) - 1024 + 56, "<Q", 1 << 40),
}

HOSTILE_COWD = {
    "granularity-0": _set(16, "<I", 0),
    "granularity-huge": _set(16, "<I", 0xFFFFFFFF),
    "gd-beyond-eof": _set(20, "<I", 0xFFFFFF),
    "gd-too-small": _set(24, "<I", 0),
    "gd-huge": _set(24, "<I", 0xFFFFFFFF),
    "gt-beyond-eof": _set(512, "<I", 0xFFFFFFF),
    "grain-beyond-eof": _set(1024, "<I", 0xFFFFFFF),
}

HOSTILE_DESC = {
    "no-create-type": "version=1\nRW 8 FLAT \"x.bin\" 0\n",
    "flat-without-offset": 'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x.bin"\n',
    "negative-sectors": 'version=1\ncreateType="monolithicFlat"\nRW -8 FLAT "x.bin" 0\n',
    "sectors-overflow": 'version=1\ncreateType="monolithicFlat"\nRW 99999999999999999999 FLAT "x.bin" 0\n',
    "offset-overflow": 'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x.bin" 36028797018963968\n',
    "too-many-extents": 'version=1\ncreateType="monolithicFlat"\n' + "RW 1 ZERO\n" * 5000,
    "no-extents": 'version=1\ncreateType="monolithicFlat"\n',
    "sesparse-bad-magic": 'version=1\ncreateType="seSparse"\nRW 8 SESPARSE "x.bin"\n',
    "sparse-not-kdmv": 'version=1\ncreateType="twoGbMaxExtentSparse"\nRW 8 SPARSE "x.bin"\n',
    "unterminated-name": 'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "x.bin 0\n',
    "fifo-extent": 'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "fifo" 0\n',
    "chardev-extent": 'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "/dev/zero" 0\n',
    "fifo-parent": 'version=1\ncreateType="monolithicFlat"\nparentFileNameHint="fifo"\nRW 8 FLAT "x.bin" 0\n',
    "self-extent": 'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "d.vmdk" 0\n',
    "self-parent": 'version=1\ncreateType="monolithicFlat"\nparentFileNameHint="d.vmdk"\nRW 8 FLAT "x.bin" 0\n',
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.mark.parametrize("name", sorted(HOSTILE_SPARSE))
def test_hostile_sparse(hostile_dir, name):
    d = make_sparse(hostile_dir)
    HOSTILE_SPARSE[name](d)
    p = hostile_dir / f"{name}.vmdk"
    p.write_bytes(bytes(d))
    out = run_child(p)
    assert out.startswith("CorruptImageError"), out


@pytest.mark.parametrize("name", sorted(HOSTILE_STREAM))
def test_hostile_stream_optimized(hostile_dir, name):
    d = make_stream(hostile_dir)
    HOSTILE_STREAM[name](d)
    p = hostile_dir / f"{name}.vmdk"
    p.write_bytes(bytes(d))
    out = run_child(p)
    assert out.startswith("CorruptImageError"), out


@pytest.mark.parametrize("name", sorted(HOSTILE_COWD))
def test_hostile_cowd(hostile_dir, name):
    p = hostile_dir / f"cowd-{name}.vmdk"
    make_cowd(p)
    d = bytearray(p.read_bytes())
    HOSTILE_COWD[name](d)
    p.write_bytes(bytes(d))
    out = run_child(p)
    assert out.startswith("CorruptImageError"), out


@pytest.mark.parametrize("name", sorted(HOSTILE_DESC))
def test_hostile_descriptor(tmp, name):
    (tmp / "x.bin").write_bytes(bytes(8 * 512))
    os.mkfifo(tmp / "fifo")
    p = tmp / "d.vmdk"
    p.write_text(HOSTILE_DESC[name])
    out = run_child(p)
    assert out.startswith("CorruptImageError"), out


def test_sparse_extent_shared_with_another_extent_is_refused(tmp):
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(tmp / "s.vmdk"), "1M")
    for second in ('RW 2048 SPARSE "./s-s001.vmdk"', 'RW 8 FLAT "s-s001.vmdk" 0'):
        p = tmp / "d.vmdk"
        p.write_text(f'version=1\ncreateType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "s-s001.vmdk"\n{second}\n')
        out = run_child(p)
        assert out.startswith("CorruptImageError") and "shared" in out, out


def test_version_3_uncompressed_is_read_only(tmp):
    p = tmp / "v3.vmdk"
    qemu_img("create", "-f", "vmdk", str(p), "1M")
    d = bytearray(p.read_bytes())
    hdr_field(d, 4, "<I", 3)
    p.write_bytes(bytes(d))
    with qb.open(p, flags=0) as img:
        assert img.read(10, 0) == bytes(10)
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, flags=qb.O_RDWR)
