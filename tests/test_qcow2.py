"""qcow2 against qemu-img/qemu-io: images QEMU wrote read back byte for byte
and map as `qemu-img map` says; images and writes of ours pass `qemu-img
check` and compare identical."""

from __future__ import annotations

import os
import struct

import pytest

import libqblock as qb

from conftest import qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

MiB = 1024 * 1024
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data", "compressed", "offset")

# Writes at odd offsets, crossing clusters and subclusters, zero writes
# (whole and partial clusters) and a discard.
QEMU_IO_WRITES = (
    "write -P 0x11 1000 5000",
    "write -P 0x22 70001 200000",
    "write -z 1M 192k",
    "write -P 0x33 2M 4096",
    "write -z 2150000 3000",
    "write -P 0x44 3145721 17",
    "discard 4M 64k",
    "write -P 0x55 5000000 70000",
)


def strip(entries, keys=MAP_KEYS):
    """Comparable form of a map: the chosen keys, then adjacent extents merged
    where everything but the length agrees and host offsets continue.

    QEMU prints a host offset for unallocated subclusters of an allocated
    cluster (present: false) and splits extents there; such an offset says
    nothing about the guest data, so it is dropped before merging.
    """
    out = []
    for e in entries:
        e = {k: e[k] for k in keys if k in e}
        if not e.get("present", True):
            e.pop("offset", None)
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
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r
    assert r.get("check-errors", 0) == 0, r
    return r


def assert_reads_like_qemu(path, tmp, *, compare_map=True, fmt=None, map_keys=MAP_KEYS):
    expected = qemu_raw_bytes(str(path), tmp)
    with qb.open(path, fmt=fmt, flags=0) as img:
        assert img.virt_size == len(expected)
        assert img.read(len(expected), 0) == expected
        # Unaligned reads of every size class.
        for off, n in ((1, 1), (999, 7777), (65535, 65538), (len(expected) - 3, 3)):
            if off + n <= len(expected):
                assert img.read(n, off) == expected[off : off + n], (off, n)
        if compare_map:
            assert strip(ours_map(img), map_keys) == strip(qemu_map(str(path)), map_keys)
    return expected


# --- reading what QEMU wrote --------------------------------------------------

READ_MATRIX = {
    "default": (),
    "c512": ("-o", "cluster_size=512"),
    "c4k": ("-o", "cluster_size=4096"),
    "c2m": ("-o", "cluster_size=2M"),
    "v2": ("-o", "compat=0.10"),
    "v2-c4k": ("-o", "compat=0.10,cluster_size=4096"),
    "rc1": ("-o", "refcount_bits=1"),
    "rc64": ("-o", "refcount_bits=64"),
    "lazy": ("-o", "lazy_refcounts=on"),
    "extl2": ("-o", "extended_l2=on"),
    "extl2-c16k": ("-o", "extended_l2=on,cluster_size=16k"),
}


@pytest.mark.parametrize("name", sorted(READ_MATRIX))
def test_read_and_map_what_qemu_wrote(tmp, name):
    p = tmp / f"{name}.qcow2"
    qemu_img("create", "-f", "qcow2", *READ_MATRIX[name], str(p), "6M")
    qemu_io(str(p), *QEMU_IO_WRITES)
    assert_reads_like_qemu(p, tmp)
    info = qemu_info(str(p))
    with qb.open(p, flags=0) as img:
        i = img.info()
        assert i.format is qb.Format.QCOW2
        assert i.cluster_size == info["cluster-size"]
        assert i.format_specific == info["format-specific"]["data"]


@pytest.mark.parametrize("raw", [False, True])
def test_external_data_file(tmp, raw):
    p, d = tmp / "t.qcow2", tmp / "t.data"
    opts = f"data_file={d}" + (",data_file_raw=on" if raw else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), "6M")
    qemu_io(str(p), *QEMU_IO_WRITES)
    assert_reads_like_qemu(p, tmp)
    with qb.open(p, flags=0) as img:
        fs = img.info().format_specific
        assert fs["data-file"] == str(d) and fs["data-file-raw"] is raw
    # Our writes land in the data file.
    with qb.open(p) as img:
        img.write(b"\x77" * 100000, 3 * MiB - 5)
        img.write_zeroes(65536, 65536)
    check_clean(p)
    expected = qemu_raw_bytes(str(p), tmp)
    assert expected[3 * MiB - 5 : 3 * MiB + 99995] == b"\x77" * 100000
    with qb.open(p, flags=0) as img:
        assert img.read(len(expected), 0) == expected
    if raw:
        assert d.read_bytes()[: len(expected)] == expected


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocated_images(tmp, prealloc):
    p = tmp / "p.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"preallocation={prealloc}", str(p), "3M")
    qemu_io(str(p), "write -P 0x61 100000 5000")
    # QEMU looks into the host file of preallocated images for holes; we
    # report what the metadata says, so compare presence and content only.
    assert_reads_like_qemu(p, tmp, map_keys=("start", "length", "present", "depth"))
    with qb.open(p) as img:
        img.write(b"\x62" * 3000, 2 * MiB + 1)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp)[2 * MiB + 1 : 2 * MiB + 3001] == b"\x62" * 3000


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", ["512", "4k", "64k", "2M", "64k,extended_l2=on"])
def test_compressed_clusters(tmp, ctype, cluster):
    src = tmp / "src.raw"
    pattern = bytes((i * 7 + i // 4096) & 0xFF for i in range(256 * 1024))
    data = bytearray(4 * MiB)
    data[0 : len(pattern)] = pattern
    data[MiB + 5 : MiB + 5 + 100000] = os.urandom(100000)  # incompressible: stored raw
    data[3 * MiB : 3 * MiB + len(pattern)] = pattern
    src.write_bytes(bytes(data))
    p = tmp / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cluster}", str(src), str(p))
    assert_reads_like_qemu(p, tmp)
    # Writing over compressed clusters allocates new ones (decompress + merge).
    with qb.open(p) as img:
        img.write(b"\xee" * 10, 3 * MiB + 4090)
        img.write_zeroes(4096 * 3, 4096 * 2)
        data[3 * MiB + 4090 : 3 * MiB + 4100] = b"\xee" * 10
        data[4096 * 3 : 4096 * 5] = bytes(4096 * 2)
        assert img.read(len(data), 0) == bytes(data)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(data)


# --- backing chains -----------------------------------------------------------


def test_backing_chain_depth_3_raw_and_qcow2(tmp):
    base, mid, top = tmp / "base.raw", tmp / "mid.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-f", "raw", str(base), "5M")
    qemu_io(str(base), "write -P 0xb0 0 5M", "write -z 1M 64k", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", base.name, "-F", "raw", str(mid), "6M")
    qemu_io(str(mid), "write -P 0xa1 10000 30000", "write -z 2M 8k", "write -P 0xa2 5242870 20")
    qemu_img("create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top), "7M")
    qemu_io(str(top), "write -P 0x7a 20001 3", "write -P 0x7b 4M 64k", "write -z 100k 4k")
    assert_reads_like_qemu(top, tmp)
    with qb.open(top, flags=0) as img:
        i = img.info()
        assert i.backing_filename == mid.name and i.backing_format is qb.Format.QCOW2
    # Partial-cluster writes copy the backing data around them.
    with qb.open(top) as img:
        img.write(b"\x01\x02\x03", 12345)
        img.write(b"\x04" * 70000, 5242800)
        img.write_zeroes(2 * MiB + 100, 200)
    check_clean(top)
    expected = qemu_raw_bytes(str(top), tmp)
    assert expected[12345:12348] == b"\x01\x02\x03"
    assert expected[12348:12400] == qemu_raw_bytes(str(mid), tmp)[12348:12400]
    with qb.open(top, flags=0) as img:
        assert img.read(len(expected), 0) == expected
        assert strip(ours_map(img)) == strip(qemu_map(str(top)))


def test_backing_with_extended_l2_subcluster_cow(tmp):
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "2M")
    qemu_io(str(base), "write -P 0x42 0 2M")
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", "-b", base.name, "-F", "qcow2", str(top))
    qemu_io(str(top), "write -P 0x11 1024 512", "write -z 40k 2k")
    assert_reads_like_qemu(top, tmp)
    with qb.open(top) as img:
        img.write(b"\x99" * 10, 1500)
        img.write(b"\x98" * 5000, 70001)
        img.write_zeroes(100 * 1024, 2048)
    check_clean(top)
    expected = qemu_raw_bytes(str(top), tmp)
    with qb.open(top, flags=0) as img:
        assert img.read(len(expected), 0) == expected
    assert expected[1024:1500] == b"\x11" * 476 and expected[1500:1510] == b"\x99" * 10
    assert expected[100 * 1024 : 102 * 1024] == bytes(2048)
    assert expected[102 * 1024] == 0x42


# --- writing: what we write, QEMU reads ---------------------------------------


def test_unaligned_writes_on_qemu_image(tmp):
    p = tmp / "w.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(p), "2M")
    qemu_io(str(p), "write -P 0x10 0 100k")
    model = bytearray(qemu_raw_bytes(str(p), tmp))
    with qb.open(p) as img:
        for off, n, v in ((1, 1, 1), (4095, 2, 2), (8191, 9000, 3), (2 * MiB - 1, 1, 4), (500000, 200000, 5)):
            img.write(bytes([v]) * n, off)
            model[off : off + n] = bytes([v]) * n
        assert img.read(len(model), 0) == bytes(model)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)



def test_small_writes_into_fresh_clusters_leave_their_zero_tails_unwritten(tmp):
    """A 4 KiB write into a new 64 KiB cluster with nothing below writes the
    4 KiB alone: the file stays sparse, the tail reads as zeroes before and
    after the flush, the flush grows the file to the last cluster's end, and
    QEMU agrees on every byte. With a backing file the tail is copied."""
    base = tmp / "base.raw"
    base.write_bytes(b"\x5a" * (4 * MiB))
    for backing in (None, base):
        p = tmp / "fresh.qcow2"
        qb.create(p, qb.Qcow2Options(4 * MiB, backing=backing, backing_fmt=qb.Format.RAW if backing else None))
        model = bytearray(base.read_bytes() if backing else bytes(4 * MiB))
        with qb.open(p) as img:
            for k in range(0, 64, 4):
                off = k * 65536 + 8192
                img.write(bytes([k + 1]) * 4096, off)
                model[off : off + 4096] = bytes([k + 1]) * 4096
            assert img.read(len(model), 0) == bytes(model)
        st = os.stat(p)
        assert st.st_size % 65536 == 0
        if backing is None:
            # 16 data writes of 4 KiB plus metadata: far below 16 whole clusters.
            assert st.st_blocks * 512 < 16 * 65536
        check_clean(p)
        assert qemu_raw_bytes(str(p), tmp) == bytes(model)
        with qb.open(p, flags=0) as img:
            assert img.read(len(model), 0) == bytes(model)
        p.unlink()

def test_snapshots_and_bitmaps_survive_our_writes(tmp):
    p = tmp / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(str(p), "write -P 0x51 0 1M", "write -P 0x52 2M 100k")
    qemu_img("snapshot", "-c", "snap1", str(p))
    qemu_img("bitmap", "--add", str(p), "bm0")
    before = qemu_raw_bytes(str(p), tmp)
    with qb.open(p) as img:
        img.write(b"\xcc" * 3000, 1000)  # COW of a shared data cluster (and its L2 table)
        img.write(b"\xcd" * 10, 2 * MiB + 65530)
        img.write_zeroes(512 * 1024, 128 * 1024)
        img.write(b"\xce" * 100, 3 * MiB)
    check_clean(p)
    snaps = qemu_img("snapshot", "-l", str(p)).stdout
    assert "snap1" in snaps
    assert qemu_raw_bytes(str(p), tmp, "-l", "snapshot.name=snap1") == before
    now = qemu_raw_bytes(str(p), tmp)
    assert now[1000:4000] == b"\xcc" * 3000 and now[:1000] == before[:1000]
    assert now[512 * 1024 : 640 * 1024] == bytes(128 * 1024)
    bitmaps = qemu_info(str(p))["format-specific"]["data"]["bitmaps"]
    # We do not track writes in bitmaps: the enabled bitmap is flagged in use
    # (inconsistent), but kept.
    assert [b["name"] for b in bitmaps] == ["bm0"] and "in-use" in bitmaps[0]["flags"]
    with qb.open(p, flags=0) as img:
        assert img.info().format_specific == qemu_info(str(p))["format-specific"]["data"]
    # QEMU still opens and writes the image.
    qemu_io(str(p), "write -P 0x53 1M 4k")
    check_clean(p)


def test_truncate_grows(tmp):
    p = tmp / "g.qcow2"
    qb.create(p, qb.Qcow2Options(1 * MiB, cluster_size=512))
    with qb.open(p) as img:
        img.write(b"a" * 1000, 1000)
        img.truncate(300 * MiB)  # beyond the L1 table's reach: it moves
        img.write(b"b" * 1000, 300 * MiB - 1000)
    check_clean(p)
    assert qemu_info(str(p))["virtual-size"] == 300 * MiB
    with qb.open(p, flags=0) as img:
        assert img.read(1000, 1000) == b"a" * 1000 and img.read(1000, 300 * MiB - 1000) == b"b" * 1000
    with qb.open(p) as img:  # and back (shrinking: tests/test_commit_rebase.py)
        img.truncate(MiB)
    check_clean(p)
    assert qemu_info(str(p))["virtual-size"] == MiB and qemu_raw_bytes(str(p), tmp)[1000:2000] == b"a" * 1000


# --- create -------------------------------------------------------------------

CREATE_MATRIX = [
    dict(),
    dict(cluster_size=512),
    dict(cluster_size=2 * MiB),
    dict(compat="0.10"),
    dict(refcount_bits=1),
    dict(refcount_bits=64, cluster_size=4096),
    dict(lazy_refcounts=True),
    dict(extended_l2=True),
    dict(compression_type="zstd"),
    dict(preallocation="metadata"),
    dict(preallocation="falloc", cluster_size=4096),
    dict(preallocation="full"),
    dict(compat="0.10", preallocation="metadata"),
]


@pytest.mark.parametrize("opts", CREATE_MATRIX, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_create_matches_qemu(tmp, opts):
    p = tmp / "n.qcow2"
    qb.create(p, qb.Qcow2Options(5 * MiB + 512 * 3, **opts))
    check_clean(p)
    info = qemu_info(str(p))
    assert info["virtual-size"] == 5 * MiB + 1536
    assert info["cluster-size"] == opts.get("cluster_size", 65536)
    fs = info["format-specific"]["data"]
    assert fs["compat"] == opts.get("compat", "1.1")
    assert fs["refcount-bits"] == opts.get("refcount_bits", 16)
    assert fs["compression-type"] == opts.get("compression_type", "zlib")
    if fs["compat"] == "1.1":
        assert fs["lazy-refcounts"] == opts.get("lazy_refcounts", False)
        assert fs["extended-l2"] == opts.get("extended_l2", False)
    assert qemu_raw_bytes(str(p), tmp) == bytes(5 * MiB + 1536)
    with qb.open(p) as img:
        assert img.info().format_specific == fs
        img.write(b"z" * 70000, 12345)
    check_clean(p)


def test_create_with_backing_and_data_file(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "3M")
    qemu_io(str(base), "write -P 0x21 0 3M")
    top = tmp / "top.qcow2"
    qb.create(top, qb.Qcow2Options(0, backing=str(base), backing_fmt=qb.Format.QCOW2))
    info = qemu_info(str(top))
    assert info["virtual-size"] == 3 * MiB
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "qcow2"
    check_clean(top)
    with pytest.raises(qb.InvalidParamError):
        qb.create(top, qb.Qcow2Options(MiB, backing=str(top)))
    d = tmp / "ext.qcow2"
    qb.create(d, qb.Qcow2Options(2 * MiB, data_file=str(tmp / "ext.data"), data_file_raw=True))
    fs = qemu_info(str(d))["format-specific"]["data"]
    assert fs["data-file"] == str(tmp / "ext.data") and fs["data-file-raw"] is True
    with qb.open(d) as img:
        img.write(b"q" * 5000, 777)
    check_clean(d)
    assert (tmp / "ext.data").read_bytes()[777:5777] == b"q" * 5000
    assert qemu_raw_bytes(str(d), tmp)[777:5777] == b"q" * 5000
    with pytest.raises(qb.UnsupportedError):
        qb.create(tmp / "enc.qcow2", qb.Qcow2Options(MiB, encrypt=True))


# --- feature bits -------------------------------------------------------------


def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def read_field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def test_feature_bits(tmp):
    p = tmp / "f.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    qemu_io(str(p), "write -P 1 0 4k")
    # Dirty: readable (and reported); a writable open repairs the refcounts.
    patch(p, 72, ">Q", 1)
    with qb.open(p, flags=0) as img:
        assert img.info().dirty and img.read(1, 0) == b"\x01"
    with qb.open(p) as img:
        assert not img.info().dirty
    assert read_field(p, 72, ">Q") == 0
    check_clean(p)
    # Corrupt: read-only only.
    patch(p, 72, ">Q", 2)
    with qb.open(p, flags=0) as img:
        assert img.info().format_specific["corrupt"] is True
    with pytest.raises(qb.CorruptImageError):
        qb.open(p)
    # Unknown incompatible bit.
    patch(p, 72, ">Q", 1 << 40)
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, flags=0)
    # Unknown autoclear bits are cleared by our first write.
    patch(p, 72, ">Q", 0)
    patch(p, 88, ">Q", 1 << 20)
    with qb.open(p) as img:
        img.write(b"x", 5)
    assert read_field(p, 88, ">Q") == 0
    check_clean(p)
    # Encrypted images are not supported yet.
    patch(p, 32, ">I", 2)
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, flags=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths_and_table_relocation(tmp, bits):
    # 512-byte clusters: a refcount table cluster covers few blocks, so
    # filling 6 MiB forces new refcount blocks and relocations of the table.
    p = tmp / "r.qcow2"
    qb.create(p, qb.Qcow2Options(6 * MiB, cluster_size=512, refcount_bits=bits))
    rt_before = read_field(p, 48, ">Q")
    data = bytes((i * 31 + bits) & 0xFF for i in range(MiB))
    with qb.open(p) as img:
        for k in range(6):
            img.write(data, k * MiB)
    if bits == 64:
        assert read_field(p, 48, ">Q") != rt_before  # the table moved
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == data * 6
    assert qemu_info(str(p))["format-specific"]["data"]["refcount-bits"] == bits


def test_concurrent_writers_and_readers(tmp):
    import threading

    p = tmp / "t.qcow2"
    qb.create(p, qb.Qcow2Options(8 * MiB, cluster_size=4096))
    img = qb.open(p)
    errors = []

    def worker(k):
        try:
            for i in range(64):
                off = (i * 8 + k) * 16384 + k * 7
                img.write(bytes([k + 1]) * 5000, off)
                assert img.read(5000, off) == bytes([k + 1]) * 5000
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    img.close()
    assert not errors, errors
    check_clean(p)
    data = qemu_raw_bytes(str(p), tmp)
    for k in range(4):
        for i in range(64):
            off = (i * 8 + k) * 16384 + k * 7
            assert data[off : off + 5000] == bytes([k + 1]) * 5000


@pytest.mark.parametrize("backing", [False, True])
def test_discard(tmp, backing):
    p = tmp / "d.qcow2"
    opts = {}
    model = bytearray(4 * MiB)
    if backing:
        base = tmp / "base.raw"
        base.write_bytes(b"\x42" * (4 * MiB))
        opts = dict(backing=str(base), backing_fmt=qb.Format.RAW)
        model[:] = b"\x42" * (4 * MiB)
    qb.create(p, qb.Qcow2Options(4 * MiB, cluster_size=4096, **opts))
    with qb.open(p) as img:
        img.write(b"\x01" * MiB, 0)
        model[:MiB] = b"\x01" * MiB
        img.discard(10000, 500000)  # whole clusters inside are dropped
        first, last = 12288, (510000 // 4096) * 4096
        model[first:last] = bytes(last - first)
        assert img.read(4 * MiB, 0) == bytes(model)
    check_clean(p)
    assert qemu_raw_bytes(str(p), tmp) == bytes(model)


def test_hostile_images_raise_corrupt(tmp):
    good = tmp / "good.qcow2"
    qemu_img("create", "-f", "qcow2", str(good), "1M")
    qemu_io(str(good), "write -P 1 0 64k")
    raw = good.read_bytes()
    l1_off = struct.unpack(">Q", raw[40:48])[0]
    l2_off = struct.unpack(">Q", raw[l1_off : l1_off + 8])[0] & 0x00FFFFFFFFFFFE00
    cases = {
        "cluster_bits": (20, ">I", 30),
        "l1_size": (36, ">I", 0x7FFFFFFF),
        "reftable_offset": (48, ">Q", 1 << 50),
        "refcount_order": (96, ">I", 7),
        "backing_name": (16, ">I", 5000),
        "l1_overlaps_header": (40, ">Q", 0),
        "l2_entry_unaligned": (l2_off, ">Q", (1 << 63) | (1 << 45) | 512),
    }
    for name, (off, fmt, value) in cases.items():
        p = tmp / f"{name}.qcow2"
        data = bytearray(raw)
        if name == "backing_name":
            data[8:16] = struct.pack(">Q", 512)
        struct.pack_into(fmt, data, off, value)
        p.write_bytes(bytes(data))
        with pytest.raises(qb.CorruptImageError):
            with qb.open(p, flags=0) as img:
                img.read(65536, 0)


def test_backing_chain_loop_is_corrupt(tmp):
    a, b = tmp / "a.qcow2", tmp / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(a), "1M")
    qemu_img("create", "-f", "qcow2", "-b", a.name, "-F", "qcow2", str(b), "1M")
    qemu_img("rebase", "-u", "-b", b.name, "-F", "qcow2", str(a))
    with pytest.raises(qb.CorruptImageError):
        qb.open(b, flags=0)


@pytest.mark.parametrize("snapshot", [False, True])
def test_dirty_image_after_crash_is_repaired(tmp, snapshot):
    p = tmp / "lazy.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", str(p), "4M")
    qemu_io(str(p), "write -P 0x31 0 100k")
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(p))
    # QEMU dies with lazy refcounts not written back: the image is dirty and
    # its refcounts are stale.
    import subprocess

    from conftest import QEMU_IO

    subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x32 50k 300k", "-c", "write -P 0x33 2M 64k",
                    "-c", "sigraise 9", str(p)], capture_output=True)
    info = qemu_info(str(p))
    assert info["dirty-flag"] is True
    with qb.open(p, flags=0) as img:
        assert img.info().dirty
        expected = bytearray(img.read(4 * MiB, 0))
    with qb.open(p) as img:
        img.write(b"\x34" * 5000, 3 * MiB + 1)
        expected[3 * MiB + 1 : 3 * MiB + 5001] = b"\x34" * 5000
    check_clean(p)
    assert qemu_info(str(p))["dirty-flag"] is False
    assert qemu_raw_bytes(str(p), tmp) == bytes(expected)
    assert expected[50 * 1024 : 350 * 1024] == b"\x32" * (300 * 1024)
    if snapshot:
        assert qemu_raw_bytes(str(p), tmp, "-l", "snapshot.name=s1")[: 100 * 1024] == b"\x31" * (100 * 1024)


def test_luks_encrypted_image_is_unsupported(tmp):
    p = tmp / "enc.qcow2"
    qemu_img("create", "--object", "secret,id=s0,data=pw", "-f", "qcow2",
             "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(p), "1M")
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, flags=0)


def test_huge_virtual_size_64_bit_offsets(tmp):
    p = tmp / "huge.qcow2"
    size = 100 << 40  # 100 TiB
    qb.create(p, qb.Qcow2Options(size))
    off = size - 12345
    with qb.open(p) as img:
        img.write(b"end of the disk", off - 15)
        img.write(b"\x74" * 1000, off - 1020)
        img.write(b"start", (1 << 40) + 3)
        assert img.read(20, off - 17) == b"\0\0end of the disk\0\0\0"
        status, length = img.check_allocation(0, size)
        assert status is False and length == (1 << 40)
        st = img.block_status(1 << 40, size - (1 << 40))
        assert st.allocated and st.data and st.length == 65536
    check_clean(p)
    assert qemu_info(str(p))["virtual-size"] == size
    qemu_io(str(p), f"read -P 0x73 {(1 << 40) + 3} 1", f"read -P 0x74 {off - 1020} 1000", f"read -P 0 {off} 12345")


def test_compressed_over_backing(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "2M")
    qemu_io(str(base), "write -P 0x10 0 2M")
    src = tmp / "src.raw"
    data = bytearray(b"\x10" * (2 * MiB))
    data[100000:300000] = bytes(range(256)) * 781 + bytes(64)
    src.write_bytes(bytes(data))
    p = tmp / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-B", str(base), "-F", "qcow2", str(src), str(p))
    assert_reads_like_qemu(p, tmp)
    assert qemu_raw_bytes(str(p), tmp) == bytes(data)


def test_preallocation_with_backing_needs_extended_l2(tmp):
    base = tmp / "base.raw"
    base.write_bytes(b"\x66" * MiB)
    with pytest.raises(qb.InvalidParamError):
        qb.create(tmp / "x.qcow2", qb.Qcow2Options(MiB, backing=str(base), preallocation="metadata"))
    p = tmp / "p.qcow2"
    qb.create(p, qb.Qcow2Options(MiB, backing=str(base), backing_fmt=qb.Format.RAW, extended_l2=True,
                                 preallocation="metadata"))
    check_clean(p)
    # Preallocated clusters, unallocated subclusters: the backing file shows.
    assert qemu_raw_bytes(str(p), tmp) == b"\x66" * MiB
    assert_reads_like_qemu(p, tmp)
    with qb.open(p) as img:
        img.write(b"\x01" * 100, 70000)
    check_clean(p)
    data = qemu_raw_bytes(str(p), tmp)
    assert data[70000:70100] == b"\x01" * 100 and data[:70000] == b"\x66" * 70000
    assert data[70100:] == b"\x66" * (MiB - 70100)


def test_l2_cache_memory_is_bounded(tmp):
    # 32 GiB of 4 KiB clusters: each L2 table covers 2 MiB, so touching every
    # region needs 16384 tables (64 MiB); the cache must stay near 16 MiB.
    import subprocess
    import sys

    p = tmp / "wide.qcow2"
    size = 32 << 30
    qb.create(p, qb.Qcow2Options(size, cluster_size=4096))
    step = 2 * MiB
    with qb.open(p) as img:
        for i in range(size // step):
            img.write(b"\x01", i * step + 7)
    check_clean(p)
    script = f"""
import resource, libqblock as qb
img = qb.open({str(p)!r}, flags=0)
assert img.read(1, 7) == b"\\x01"
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for rnd in range(2):
    for i in range({size // step}):
        assert img.read(1, i * {step} + 7) == b"\\x01"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown_kib < 32 * 1024, f"RSS grew by {grown_kib} KiB"
