"""amend against qemu-img amend: each change is made by both on copies of
the same image; then ours must report the same compat / lazy refcounts /
refcount width, pass `qemu-img check` with no leak or corruption, and read
back the same guest bytes (active layer and snapshots) as the original and
as QEMU's copy. Every refusal is QEMU's too, and leaves our file untouched."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

import libqblock as qb

from conftest import qemu_check, qemu_img, qemu_info, qemu_io, qemu_raw_bytes
from conftest import qblock_cmd

MiB = 1 << 20
FIELDS = ("compat", "lazy-refcounts", "refcount-bits")


def make(tmp, name="src.qcow2", *, opts="", size="16M", writes=(), snapshot=None, bitmap=None, backing=None):
    """A qcow2 image made by qemu-img/qemu-io."""
    path = tmp / name
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    # In the image's folder: QEMU resolves a relative data_file against its
    # working folder (we resolve it against the image's folder).
    qemu_img(*args, str(path), size, cwd=tmp)
    if writes:
        qemu_io(str(path), *writes, cwd=tmp)
    if bitmap:
        qemu_img("bitmap", "--add", str(path), bitmap)
    if snapshot:
        qemu_img("snapshot", "-c", snapshot, str(path))
    return path


def specific(path):
    return qemu_info(str(path))["format-specific"]["data"]


def merged_map(path):
    """qemu-img map without host offsets, adjacent extents merged: what the guest sees where."""
    out = []
    for e in qemu_img_map(path):
        key = (e["present"], e["zero"], e["data"], e["depth"])
        if out and out[-1][0] == key and out[-1][1] + out[-1][2] == e["start"]:
            out[-1][2] += e["length"]
            continue
        out.append([key, e["start"], e["length"]])
    return out


def qemu_img_map(path):
    import json

    return json.loads(qemu_img("map", "--output=json", str(path)).stdout)


def both(tmp, src, options, *, snapshots=(), same_map=True, convert_opts=None):
    """Amend copies of `src` with qemu-img and with us; compare. Returns (ours, theirs).

    With `convert_opts`, QEMU's image is a `qemu-img convert -o convert_opts`
    of `src` instead, where its amend cannot be used (see its caller)."""
    ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
    shutil.copyfile(src, ours)
    if convert_opts is None:
        shutil.copyfile(src, theirs)
        text = ",".join(f"{k}={v}" for k, v in options.items())
        r = qemu_img("amend", "-o", text, str(theirs), check=False)
        assert r.returncode == 0, r.stderr
    else:
        qemu_img("convert", "-O", "qcow2", "-o", convert_opts, str(src), str(theirs))
    qb.amend(str(ours), options)
    mine, qemu = specific(ours), specific(theirs)
    assert {k: mine.get(k) for k in FIELDS} == {k: qemu.get(k) for k in FIELDS}
    assert mine == qemu  # the rest too: compression type, bitmaps, corrupt, extended L2, data file
    assert qemu_info(str(ours))["virtual-size"] == qemu_info(str(theirs))["virtual-size"]
    for key in ("backing-filename", "backing-filename-format", "snapshots"):
        assert qemu_info(str(ours)).get(key) == qemu_info(str(theirs)).get(key)
    report = qemu_check(str(ours))  # exit status 0: no leak, no corruption
    assert report["check-errors"] == 0 and "leaks" not in report and "corruptions" not in report
    if "size" not in options:
        assert qemu_img("compare", str(src), str(ours), check=False).returncode == 0
    data = qemu_raw_bytes(str(ours), tmp)
    assert data == qemu_raw_bytes(str(theirs), tmp)
    if "size" not in options:
        assert data == qemu_raw_bytes(str(src), tmp)
    for sn in snapshots:
        want = qemu_raw_bytes(str(src), tmp, "-l", sn)
        assert qemu_raw_bytes(str(ours), tmp, "-l", sn) == want
        assert qemu_raw_bytes(str(theirs), tmp, "-l", sn) == want
    if same_map:
        assert merged_map(ours) == merged_map(theirs)
    return ours, theirs


WRITES = ("write -P 0x11 0 1M", "write -P 0x22 3M 100k", "write -z 1M 128k", "write -z 3M 64k", "write -P 0x33 9M 4k")


# --- lazy refcounts ---------------------------------------------------------


@pytest.mark.parametrize("value", ["on", "off"])
def test_lazy_refcounts(tmp, value):
    src = make(tmp, opts=f"lazy_refcounts={'off' if value == 'on' else 'on'}", writes=WRITES)
    both(tmp, src, {"lazy_refcounts": value})


def test_lazy_refcounts_off_on_a_dirty_image_recounts_first(tmp):
    src = make(tmp, opts="lazy_refcounts=on", writes=WRITES)
    # A crash after allocating writes leaves stale refcounts and the dirty bit.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 12M 256k", "-c", "abort", str(src)],
                   capture_output=True)
    assert qemu_info(str(src))["dirty-flag"] is True
    ours, _ = both(tmp, src, {"lazy_refcounts": "off"})
    assert qemu_info(str(ours))["dirty-flag"] is False


def test_a_refusal_leaves_even_a_dirty_image_unrepaired(tmp):
    src = make(tmp, opts="lazy_refcounts=on", writes=WRITES)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 12M 256k", "-c", "abort", str(src)],
                   capture_output=True)
    before = src.read_bytes()
    with pytest.raises(qb.InvalidParamError):
        qb.amend(str(src), compat="0.10", refcount_bits=8)
    assert src.read_bytes() == before


def test_lazy_refcounts_as_keyword_and_bool(tmp):
    src = make(tmp, writes=WRITES)
    qb.amend(str(src), lazy_refcounts=True)
    assert specific(src)["lazy-refcounts"] is True
    qb.amend(str(src), {"lazy-refcounts": "off"})
    assert specific(src)["lazy-refcounts"] is False
    qemu_check(str(src))


# --- compat -----------------------------------------------------------------


def test_downgrade_with_data_and_zero_clusters(tmp):
    src = make(tmp, writes=WRITES)
    ours, _ = both(tmp, src, {"compat": "0.10"})
    assert specific(ours)["compat"] == "0.10"
    head = ours.read_bytes()[:8]
    assert struct.unpack(">I", head[4:8])[0] == 2


def test_downgrade_with_lazy_refcounts(tmp):
    both(tmp, make(tmp, opts="lazy_refcounts=on", writes=WRITES), {"compat": "0.10"})


def test_downgrade_over_a_backing_file_keeps_its_name_and_format(tmp):
    base = make(tmp, "base.qcow2", writes=("write -P 0x66 0 16M",))
    # Zero clusters over a backing file must become allocated zeroes in v2.
    src = make(tmp, backing="base.qcow2", writes=WRITES)
    ours, _ = both(tmp, src, {"compat": "v2"})
    info = qemu_info(str(ours))
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    assert base.exists()


def test_downgrade_with_compressed_clusters(tmp):
    raw = tmp / "in.raw"
    raw.write_bytes(bytes(range(256)) * (4 * MiB // 256) + bytes(4 * MiB))
    src = tmp / "src.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(src))
    qemu_io(str(src), "write -z 0 64k", "write -P 0x77 1M 64k")
    both(tmp, src, {"compat": "0.10"})


def test_downgrade_with_snapshots(tmp):
    # The snapshot shares L2 tables and zero clusters with the active layer.
    src = make(tmp, writes=WRITES, snapshot="s1")
    qemu_io(str(src), "write -P 0x55 0 64k", "write -z 5M 64k", "write -z 0 4k")
    both(tmp, src, {"compat": "0.10"}, snapshots=("s1",))


def test_downgrade_with_preallocated_zero_clusters(tmp):
    src = make(tmp, opts="preallocation=metadata", size="4M")
    qemu_io(str(src), "write -P 0x12 0 1M", "write -z 512k 128k")
    both(tmp, src, {"compat": "0.10"})


def test_downgrade_drops_bitmaps_without_leaking_them(tmp):
    src = make(tmp, writes=WRITES, bitmap="b0")
    assert specific(src)["bitmaps"]
    # qemu-img leaves the bitmap directory and table behind as leaked
    # clusters (its check exits 3); ours frees them.
    ours, _ = both(tmp, src, {"compat": "0.10"})
    assert "bitmaps" not in specific(ours)
    assert b"\x23\x85\x28\x75" not in ours.read_bytes()[:4096]  # no bitmaps extension left


def test_downgrade_of_zstd_image_without_compressed_clusters(tmp):
    src = make(tmp, opts="compression_type=zstd", writes=WRITES)
    ours, _ = both(tmp, src, {"compat": "0.10"})
    assert specific(ours)["compression-type"] == "zlib"


def test_upgrade(tmp):
    base = make(tmp, "base.qcow2", opts="compat=0.10", writes=("write -P 0x66 0 16M",))
    src = make(tmp, opts="compat=0.10", backing=base.name, writes=WRITES[:3], snapshot="s1")
    qemu_io(str(src), "write -P 0x56 0 64k")
    ours, _ = both(tmp, src, {"compat": "1.1"}, snapshots=("s1",))
    assert specific(ours)["compat"] == "1.1"
    assert b"lazy refcounts" in ours.read_bytes()[:65536]  # the feature name table


def _strip_snapshot_extra(path):
    """Make the (single) snapshot entry an old QEMU's: no extra data."""
    data = bytearray(path.read_bytes())
    snap_off = struct.unpack(">Q", data[64:72])[0]
    e = data[snap_off:snap_off + 1024]
    id_len, name_len = struct.unpack(">HH", e[12:16])
    extra = struct.unpack(">I", e[36:40])[0]
    strings = bytes(e[40 + extra:40 + extra + id_len + name_len])
    entry = bytearray(e[:40]) + strings
    entry[36:40] = b"\0\0\0\0"
    entry += bytes(-len(entry) % 8)
    old_len = (40 + extra + id_len + name_len + 7) & ~7
    data[snap_off:snap_off + old_len] = entry + bytes(old_len - len(entry))
    path.write_bytes(bytes(data))


def test_upgrade_completes_old_snapshot_entries(tmp):
    src = make(tmp, opts="compat=0.10", writes=WRITES[:2], snapshot="s1")
    _strip_snapshot_extra(src)
    qemu_check(str(src))
    ours, _ = both(tmp, src, {"compat": "1.1"}, snapshots=("s1",))
    snaps = qemu_info(str(ours))["snapshots"]
    assert [s["name"] for s in snaps] == ["s1"]


def test_round_trip_down_and_up(tmp):
    src = make(tmp, writes=WRITES, snapshot="s1")
    ours, _ = both(tmp, src, {"compat": "0.10"}, snapshots=("s1",))
    shutil.copyfile(ours, tmp / "v2.qcow2")
    both(tmp, tmp / "v2.qcow2", {"compat": "1.1"}, snapshots=("s1",))


# --- refcount width -----------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 8, 32, 64])
def test_refcount_bits(tmp, bits):
    src = make(tmp, writes=WRITES)
    both(tmp, src, {"refcount_bits": bits})


@pytest.mark.parametrize("bits", [8, 16, 64])
def test_refcount_bits_with_snapshots_and_bitmaps(tmp, bits):
    src = make(tmp, opts="refcount_bits=4", writes=WRITES, bitmap="b0", snapshot="s1")
    qemu_io(str(src), "write -P 0x58 0 128k")
    ours, theirs = both(tmp, src, {"refcount_bits": bits}, snapshots=("s1",))
    assert specific(ours)["bitmaps"] == specific(theirs)["bitmaps"]


@pytest.mark.parametrize("cluster_size,bits", [(512, 1), (512, 64), (2 * MiB, 1), (2 * MiB, 64)])
def test_refcount_bits_at_extreme_cluster_sizes(tmp, cluster_size, bits):
    src = make(tmp, opts=f"cluster_size={cluster_size}", size="64M",
               writes=("write -P 0x21 0 3M", "write -z 8M 4M", "write -P 0x22 40M 700k"))
    if cluster_size == 2 * MiB:
        # qemu-img amend 10.0 takes time growing steeply with the cluster
        # size to change the width (64 KiB: 1 s, 256 KiB: 14 s, 512 KiB and
        # more: minutes, CPU-bound): QEMU's image of the same content and
        # width is a convert instead.
        both(tmp, src, {"refcount_bits": bits}, same_map=False,
             convert_opts=f"cluster_size={cluster_size},refcount_bits={bits}")
    else:
        both(tmp, src, {"refcount_bits": bits})


@pytest.mark.parametrize("cluster_size", [512, 2 * MiB])
def test_compat_at_extreme_cluster_sizes(tmp, cluster_size):
    src = make(tmp, opts=f"cluster_size={cluster_size}", size="64M",
               writes=("write -P 0x21 0 3M", "write -z 8M 4M", "write -z 40M 700k"))
    ours, _ = both(tmp, src, {"compat": "0.10"})
    shutil.copyfile(ours, tmp / "v2.qcow2")
    both(tmp, tmp / "v2.qcow2", {"compat": "1.1"})


def test_refcount_bits_of_compressed_clusters(tmp):
    raw = tmp / "in.raw"
    raw.write_bytes(bytes(range(256)) * (2 * MiB // 256))
    src = tmp / "src.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(src))
    both(tmp, src, {"refcount_bits": 8})
    # Compressed clusters share host clusters (32 here): one bit cannot count them.
    r = qemu_img("amend", "-o", "refcount_bits=1", str(src), check=False)
    with pytest.raises(qb.InvalidParamError) as e:
        qb.amend(str(src), refcount_bits=1)
    assert r.returncode == 1 and r.stderr.strip() == f"qemu-img: {e.value.message}"


def test_downgrade_with_refcount_bits_16_from_64(tmp):
    src = make(tmp, opts="refcount_bits=64", writes=WRITES)
    both(tmp, src, {"compat": "0.10", "refcount_bits": 16})


def test_upgrade_with_refcount_bits_and_lazy_refcounts(tmp):
    src = make(tmp, opts="compat=0.10", writes=WRITES[:2])
    both(tmp, src, {"compat": "1.1", "refcount_bits": 64, "lazy_refcounts": "on"})


def test_data_file_raw_off_and_the_same_data_file(tmp, monkeypatch):
    # qemu-img creates a relative data file in its working folder (and the image finds it beside itself)
    monkeypatch.chdir(tmp)
    src = make(tmp, opts="data_file=data.raw,data_file_raw=on", writes=WRITES[:2])
    ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    qemu_img("amend", "-o", "data_file=data.raw,data_file_raw=off", str(theirs))
    qb.amend(str(ours), data_file="data.raw", data_file_raw=False)
    assert specific(ours)["data-file-raw"] is False
    assert specific(ours) == specific(theirs)
    qemu_check(str(ours))
    with pytest.raises(qb.UnsupportedError, match="not supported yet"):
        qb.amend(str(ours), data_file="elsewhere.raw")


# --- size -------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["32M", "8M", "16M"])
def test_size(tmp, size):
    src = make(tmp, writes=("write -P 0x11 0 1M", "write -P 0x22 7M 100k"))
    both(tmp, src, {"size": size})


# --- refusals ---------------------------------------------------------------------

REFUSALS = [
    # (create options, amend options, our class, a piece of both messages)
    ("", "cluster_size=4096", qb.InvalidParamError, "Invalid parameter 'cluster_size'"),
    ("", "extended_l2=on", qb.InvalidParamError, "Invalid parameter 'extended_l2'"),
    ("", "preallocation=full", qb.InvalidParamError, "Invalid parameter 'preallocation'"),
    ("", "compression_type=zstd", qb.InvalidParamError, "Invalid parameter 'compression_type'"),
    ("", "encrypt.format=luks", qb.InvalidParamError, "Invalid parameter 'encrypt.format'"),
    ("", "foo=bar", qb.InvalidParamError, "Invalid parameter 'foo'"),
    ("", "compat=0.9", qb.InvalidParamError, "Unknown compatibility level 0.9"),
    ("", "refcount_bits=3", qb.InvalidParamError, "Refcount width must be a power of two"),
    ("", "refcount_bits=128", qb.InvalidParamError, "Refcount width must be a power of two"),
    ("", "refcount_bits=0", qb.InvalidParamError, "Refcount width must be a power of two"),
    ("", "lazy_refcounts=maybe", qb.InvalidParamError, "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    ("", "backing_file=foo", qb.InvalidParamError, "Cannot amend the backing file"),
    ("", "backing_fmt=raw", qb.InvalidParamError, "Cannot amend the backing file"),
    ("", "data_file=x.raw", qb.InvalidParamError, "data-file can only be set for images that use an external data file"),
    ("", "data_file_raw=on", qb.InvalidParamError, "data-file-raw cannot be set on existing images"),
    ("", "compat=0.10,lazy_refcounts=on", qb.InvalidParamError, "Lazy refcounts only supported with compatibility level 1.1"),
    ("", "compat=0.10,refcount_bits=8", qb.InvalidParamError, "Refcount widths other than 16 bits require compatibility level 1.1"),
    ("compat=0.10", "lazy_refcounts=on", qb.InvalidParamError, "Lazy refcounts only supported with compatibility level 1.1"),
    ("compat=0.10", "refcount_bits=64", qb.InvalidParamError, "Refcount widths other than 16 bits require compatibility level 1.1"),
    ("refcount_bits=8", "compat=0.10", qb.UnsupportedError, "compat=0.10 requires refcount_bits=16"),
    ("extended_l2=on", "compat=0.10", qb.UnsupportedError, "Cannot downgrade an image with incompatible features 0x10 set"),
    ("data_file=data.raw", "compat=0.10", qb.UnsupportedError, "Cannot downgrade an image with a data file"),
]


def _refused(tmp, src, text, cls, piece):
    theirs = tmp / "theirs.qcow2"
    shutil.copyfile(src, theirs)
    r = qemu_img("amend", "-o", text, str(theirs), check=False, cwd=tmp)
    assert r.returncode == 1 and piece in r.stderr, r.stderr
    before = src.read_bytes()
    opts = dict(kv.split("=", 1) for kv in text.split(","))
    with pytest.raises(cls) as e:
        qb.amend(str(src), opts)
    assert piece in e.value.message
    assert src.read_bytes() == before  # refused before anything was written


@pytest.mark.parametrize("create,text,cls,piece", REFUSALS, ids=[r[1] + "@" + (r[0] or "v3") for r in REFUSALS])
def test_refusals(tmp, create, text, cls, piece):
    _refused(tmp, make(tmp, opts=create, writes=WRITES[:2]), text, cls, piece)


def test_refused_downgrade_with_zstd_compressed_clusters(tmp):
    raw = tmp / "in.raw"
    raw.write_bytes(bytes(range(256)) * (MiB // 256))
    src = tmp / "src.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), str(src))
    _refused(tmp, src, "compat=0.10", qb.UnsupportedError,
             "Cannot downgrade an image with zstd compression type and existing compressed clusters")


def test_refused_downgrade_with_a_snapshot_of_another_size(tmp):
    src = make(tmp, writes=WRITES[:2], snapshot="s1")
    qemu_img("resize", str(src), "32M")
    _refused(tmp, src, "compat=0.10", qb.UnsupportedError, "Internal snapshots prevent downgrade of image")


def test_refused_refcount_width_too_narrow_for_a_snapshot(tmp):
    src = make(tmp, writes=WRITES[:2], snapshot="s1")
    _refused(tmp, src, "refcount_bits=1", qb.InvalidParamError,
             "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x")


def test_refused_narrowing_after_an_upgrade_touches_nothing(tmp):
    src = make(tmp, opts="compat=0.10", writes=WRITES[:2], snapshot="s1")
    # qemu-img upgrades first, then refuses the width: its copy ends up v3.
    _refused(tmp, src, "compat=1.1,refcount_bits=1", qb.InvalidParamError,
             "Cannot decrease refcount entry width to 1 bits")
    assert specific(tmp / "theirs.qcow2")["compat"] == "1.1"
    assert specific(src)["compat"] == "0.10"


@pytest.mark.parametrize("fmt", ["raw", None])
def test_other_formats_are_refused(tmp, fmt):
    path = tmp / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(path), "1M")
    r = qemu_img("amend", "-f", "raw", "-o", "size=2M", str(path), check=False)
    assert r.returncode == 1 and "Format driver 'raw' does not support option amendment" in r.stderr
    with pytest.raises(qb.UnsupportedError, match="Format driver 'raw' does not support option amendment"):
        qb.amend(str(path), {"size": "2M"}, format=fmt)


def test_no_options(tmp):
    src = make(tmp)
    with pytest.raises(qb.InvalidParamError):
        qb.amend(str(src))


# --- progress ---------------------------------------------------------------------


def test_progress_reaches_the_end(tmp):
    src = make(tmp, writes=WRITES, snapshot="s1")
    seen = []
    qb.amend(str(src), {"compat": "0.10"}, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
    qemu_check(str(src))


def test_progress_exception_stops_with_a_valid_image(tmp):
    src = make(tmp, writes=WRITES)

    class Stop(Exception):
        pass

    def cb(done, total):
        if done > 0:
            raise Stop

    with pytest.raises(Stop):
        qb.amend(str(src), {"compat": "0.10"}, progress=cb)
    qemu_check(str(src))
    assert qemu_img("compare", str(src), str(make(tmp, "same.qcow2", writes=WRITES)), check=False).returncode == 0


# --- the command --------------------------------------------------------------------


def test_cli_amend(tmp):
    src = make(tmp, writes=WRITES)
    cmd = qblock_cmd()
    r = subprocess.run([*cmd, "amend", "-o", "compat=0.10", str(src)], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert specific(src)["compat"] == "0.10"
    r = subprocess.run([*cmd, "amend", "-p", "-f", "qcow2", "-o", "compat=1.1", "-o", "refcount_bits=64", str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "(100.00/100%)" in r.stderr
    assert {k: specific(src)[k] for k in FIELDS} == {"compat": "1.1", "lazy-refcounts": False, "refcount-bits": 64}
    qemu_check(str(src))


@pytest.mark.parametrize("args,piece", [
    (["-o", "cluster_size=4k"], "Invalid parameter 'cluster_size'"),
    (["-o", "compat=0.10,lazy_refcounts=on"], "Lazy refcounts only supported"),
    ([], "Must specify options (-o)"),
    (["-f", "raw", "-o", "size=1M"], "Format driver 'raw' does not support option amendment"),
])
def test_cli_amend_errors(tmp, args, piece):
    src = make(tmp)
    r = subprocess.run([*qblock_cmd(), "amend", *args, str(src)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and piece in r.stderr and "Traceback" not in r.stderr


def test_cli_amend_help(tmp):
    r = subprocess.run([*qblock_cmd(), "amend", "-o", "help", str(tmp / "none.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0 and "refcount_bits=<num>" in r.stdout
