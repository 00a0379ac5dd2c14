"""Option dataclasses: fields, validation, QEMU names, and agreement with qemu-img.

The limits are QEMU's; the `agrees_with_qemu` cases create the same image with
qemu-img and with the dataclass and check both accept or both refuse.
"""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

import libqblock as qb
from libqblock import options as opts

from conftest import qemu_img, qemu_info

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

ALL = [
    qb.CowOptions,
    qb.QedOptions,
    qb.QcowOptions,
    qb.Qcow2Options,
    qb.RawOptions,
    qb.RbdOptions,
    qb.SheepdogOptions,
    qb.VdiOptions,
    qb.VmdkOptions,
    qb.VpcOptions,
    qb.VhdxOptions,
]


def test_one_class_per_format_and_the_class_names_it():
    assert {c.format for c in ALL} == {
        qb.Format.COW, qb.Format.QED, qb.Format.QCOW, qb.Format.QCOW2, qb.Format.RAW, qb.Format.RBD,
        qb.Format.SHEEPDOG, qb.Format.VDI, qb.Format.VMDK, qb.Format.VPC, qb.Format.VHDX,
    }
    for c in ALL:
        assert opts.OPTION_CLASSES[c.format] is c
        assert opts.options_class(c.format.value) is c
        assert opts.options_class(c.format) is c
    with pytest.raises(qb.InvalidParamError):
        opts.options_class("dmg")


@pytest.mark.parametrize("cls", ALL)
def test_frozen_with_virt_size_first_and_size_in_native(cls):
    o = cls(1 * MiB) if cls is not qb.QcowOptions else cls(1 * MiB)
    assert opts.option_fields(cls)[0] == "virt_size"
    assert o.virt_size == MiB and o.to_native()["size"] == MiB
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.virt_size = 2  # type: ignore[misc]
    assert "format" not in opts.option_fields(cls)  # a ClassVar, not a field


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [-1, 1 << 63, 1.5, "1G", True, None])
def test_virt_size_must_be_a_63_bit_integer(cls, bad):
    with pytest.raises(qb.InvalidParamError, match="virt_size"):
        cls(bad)


@pytest.mark.parametrize("cls", [c for c in ALL if c not in (qb.RawOptions, qb.RbdOptions)])
def test_sector_formats_refuse_sizes_qemu_would_round(cls):
    with pytest.raises(qb.InvalidParamError, match="multiple of 512"):
        cls(1000)


def test_raw_takes_any_byte_size():
    assert qb.RawOptions(1000).to_native() == {"size": 1000, "preallocation": "off"}
    for p in ("off", "falloc", "full"):
        qb.RawOptions(1, preallocation=p)
    with pytest.raises(qb.InvalidParamError, match="preallocation"):
        qb.RawOptions(1, preallocation="metadata")


# --- the seed's fields ----------------------------------------------------------


def test_seed_fields_exist():
    f = opts.option_fields
    assert f(qb.CowOptions) == ["virt_size", "backing"]
    assert f(qb.QedOptions)[:5] == ["virt_size", "backing", "backing_fmt", "cluster_size", "table_size"]
    assert f(qb.QcowOptions)[:4] == ["virt_size", "backing", "backing_fmt", "encrypt"]
    assert f(qb.Qcow2Options)[:7] == [
        "virt_size", "backing", "backing_fmt", "encrypt", "cluster_size", "compat", "preallocation",
    ]
    assert f(qb.RbdOptions)[:2] == ["virt_size", "cluster_size"]
    assert f(qb.SheepdogOptions)[:3] == ["virt_size", "backing", "preallocation"]
    assert f(qb.VdiOptions)[:3] == ["virt_size", "static", "cluster_size"]
    assert f(qb.VmdkOptions)[:5] == ["virt_size", "backing", "backing_fmt", "compat6", "subformat"]
    assert f(qb.VpcOptions)[:2] == ["virt_size", "subformat"]


def test_defaults_are_qemus():
    assert qb.QedOptions(MiB).to_native() == {"size": MiB, "cluster_size": 64 * KiB, "table_size": 4}
    q2 = qb.Qcow2Options(MiB)
    assert (q2.cluster_size, q2.compat, q2.preallocation, q2.refcount_bits) == (65536, "1.1", "off", 16)
    assert qb.VmdkOptions(MiB).subformat == "monolithicSparse"
    assert qb.VpcOptions(MiB).subformat == "dynamic"
    assert qb.VdiOptions(MiB).to_native() == {"size": MiB, "static": False, "cluster_size": MiB}
    assert qb.VhdxOptions(MiB).to_native() == {
        "size": MiB, "block_size": 0, "log_size": MiB, "subformat": "dynamic", "block_state_zero": True,
    }


def test_backing_and_backing_fmt_in_native(tmp):
    o = qb.QedOptions(0, backing=tmp / "base.raw", backing_fmt="raw")
    assert o.backing_fmt is qb.Format.RAW  # a name is turned into the Format
    n = o.to_native()
    assert n["backing_file"] == str(tmp / "base.raw") and n["backing_fmt"] == "raw" and n["size"] == 0
    assert qb.Qcow2Options(0, backing=qb.Location.file("b.qcow2")).to_native()["backing_file"] == "b.qcow2"
    assert qb.CowOptions(MiB, backing="base.img").to_native() == {"size": MiB, "backing_file": "base.img"}
    assert qb.SheepdogOptions(MiB, backing="base").to_native()["backing_file"] == "base"
    assert qb.QcowOptions(0, backing="b", backing_fmt=qb.Format.QCOW).to_native() == {
        "size": 0, "backing_file": "b", "backing_fmt": "qcow", "encrypt": False,
    }


@pytest.mark.parametrize("cls", [qb.QedOptions, qb.QcowOptions, qb.Qcow2Options, qb.VmdkOptions])
def test_backing_fmt_rules(cls):
    with pytest.raises(qb.InvalidParamError, match="without a backing file"):
        cls(MiB, backing_fmt=qb.Format.VMDK)
    with pytest.raises(qb.InvalidParamError, match="unknown backing_fmt"):
        cls(MiB, backing="b", backing_fmt="nosuch")
    with pytest.raises(qb.InvalidParamError, match="backing_fmt must be a Format"):
        cls(MiB, backing="b", backing_fmt=qb.Format.NONE)
    with pytest.raises(qb.InvalidParamError, match="backing must be"):
        cls(MiB, backing=42)
    with pytest.raises(qb.InvalidParamError, match="backing must be .*non-empty"):
        cls(MiB, backing="")


def test_qcow_and_qcow2_need_a_size_or_a_backing_file():
    for cls in (qb.QcowOptions, qb.Qcow2Options):
        with pytest.raises(qb.InvalidParamError, match="only with a backing file"):
            cls(0)
        assert cls(0, backing="base").virt_size == 0


# --- per-format validation (messages name the field) ----------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: qb.QedOptions(MiB, cluster_size=2048), "cluster_size must be a power of two between 4 KiB and 64 MiB"),
        (lambda: qb.QedOptions(MiB, cluster_size=6144), "cluster_size"),
        (lambda: qb.QedOptions(MiB, cluster_size=128 * MiB), "cluster_size"),
        (lambda: qb.QedOptions(MiB, table_size=0), "table_size"),
        (lambda: qb.QedOptions(MiB, table_size=3), "table_size"),
        (lambda: qb.QedOptions(MiB, table_size=32), "table_size"),
        (lambda: qb.QedOptions(64 * TiB + 512), "too large for qed"),
        (lambda: qb.QcowOptions(MiB, encrypt=1), "encrypt must be True or False"),
        (lambda: qb.QcowOptions(opts.QCOW_MAX_SIZE + 512), "too large for qcow"),
        (lambda: qb.Qcow2Options(MiB, cluster_size=256), "cluster_size"),
        (lambda: qb.Qcow2Options(MiB, cluster_size=4 * MiB), "cluster_size"),
        (lambda: qb.Qcow2Options(MiB, compat="2"), "compat must be one of 0.10, 1.1"),
        (lambda: qb.Qcow2Options(MiB, preallocation="sparse"), "preallocation"),
        (lambda: qb.Qcow2Options(MiB, refcount_bits=3), "refcount_bits"),
        (lambda: qb.Qcow2Options(MiB, refcount_bits=128), "refcount_bits"),
        (lambda: qb.Qcow2Options(MiB, compat="0.10", lazy_refcounts=True), "needs compat 1.1"),
        (lambda: qb.Qcow2Options(MiB, compat="0.10", refcount_bits=64), "needs compat 1.1"),
        (lambda: qb.Qcow2Options(MiB, compat="0.10", data_file="d"), "needs compat 1.1"),
        (lambda: qb.Qcow2Options(MiB, compression_type="lz4"), "compression_type"),
        (lambda: qb.Qcow2Options(MiB, extended_l2=True, cluster_size=8192), "16 KiB"),
        (lambda: qb.Qcow2Options(MiB, data_file_raw=True), "needs a data_file"),
        (lambda: qb.Qcow2Options(MiB, data_file=3), "data_file must be a Location or a path"),
        (lambda: qb.Qcow2Options(MiB, backing="b", data_file="d", data_file_raw=True), "data_file_raw"),
        (lambda: qb.Qcow2Options(MiB, backing="b", preallocation="metadata"), "extended_l2"),
        (lambda: qb.Qcow2Options(128 * GiB + 512, cluster_size=512), "too large for qcow2"),
        (lambda: qb.RbdOptions(MiB, cluster_size=2048), "cluster_size"),
        (lambda: qb.RbdOptions(MiB, cluster_size=3 * MiB), "cluster_size"),
        (lambda: qb.RbdOptions(MiB, pool="rbd"), "together"),
        (lambda: qb.RbdOptions(MiB, pool="", image="x"), "pool"),
        (lambda: qb.SheepdogOptions(MiB, preallocation="falloc"), "preallocation"),
        (lambda: qb.SheepdogOptions(MiB, object_size=512 * KiB), "object_size"),
        (lambda: qb.SheepdogOptions(MiB, object_size=4 * GiB), "object_size"),
        (lambda: qb.SheepdogOptions(MiB, redundancy="9"), "redundancy"),
        (lambda: qb.SheepdogOptions(MiB, redundancy="3:2"), "redundancy"),
        (lambda: qb.SheepdogOptions(MiB, redundancy="4:16"), "redundancy"),
        (lambda: qb.SheepdogOptions(MiB, redundancy="x"), "redundancy"),
        (lambda: qb.SheepdogOptions(4 * TiB + 512), "too large for sheepdog"),
        (lambda: qb.VdiOptions(MiB, static="yes"), "static"),
        (lambda: qb.VdiOptions(MiB, cluster_size=2 * MiB), "1 MiB"),
        (lambda: qb.VdiOptions(opts.VDI_MAX_SIZE + 512), "too large for vdi"),
        (lambda: qb.VmdkOptions(MiB, subformat="monolithicsparse"), "subformat"),
        (lambda: qb.VmdkOptions(MiB, adapter_type="scsi"), "adapter_type"),
        (lambda: qb.VmdkOptions(MiB, compat6=True, hwversion="7"), "compat6"),
        (lambda: qb.VmdkOptions(MiB, backing="b", backing_fmt="raw"), "must be a vmdk image"),
        (lambda: qb.VmdkOptions(MiB, backing="b", subformat="monolithicFlat"), "cannot have a backing file"),
        (lambda: qb.VmdkOptions(MiB, zeroed_grain=True, subformat="twoGbMaxExtentFlat"), "zeroed_grain"),
        (lambda: qb.VmdkOptions(MiB, hwversion=""), "hwversion"),
        (lambda: qb.VpcOptions(MiB, subformat="sparse"), "subformat"),
        (lambda: qb.VpcOptions(2041 * GiB), "too large for vpc"),
        (lambda: qb.VpcOptions(MiB, force_size=None), "force_size"),
        (lambda: qb.VhdxOptions(MiB, block_size=512 * KiB), "block_size"),
        (lambda: qb.VhdxOptions(MiB, block_size=3 * MiB), "block_size"),
        (lambda: qb.VhdxOptions(MiB, block_size=512 * MiB), "block_size"),
        (lambda: qb.VhdxOptions(MiB, log_size=512 * KiB), "log_size"),
        (lambda: qb.VhdxOptions(MiB, log_size=0), "log_size"),
        (lambda: qb.VhdxOptions(MiB, log_size=4 * GiB), "log_size"),
        (lambda: qb.VhdxOptions(MiB, subformat="differencing"), "subformat"),
        (lambda: qb.VhdxOptions(64 * TiB + 512), "too large for vhdx"),
    ],
)
def test_invalid_options_raise_clear_errors(make, match):
    with pytest.raises(qb.InvalidParamError, match=match) as ei:
        make()
    assert ei.value.code == -100


def test_valid_extremes():
    qb.QedOptions(64 * TiB)
    qb.QedOptions(MiB, cluster_size=4 * KiB, table_size=1)
    qb.QcowOptions(opts.QCOW_MAX_SIZE)
    qb.Qcow2Options(128 * GiB, cluster_size=512)
    qb.Qcow2Options(2 * 1024 * TiB)
    qb.Qcow2Options(MiB, backing="b", preallocation="metadata", extended_l2=True)
    qb.SheepdogOptions(4 * TiB, redundancy="3")
    qb.SheepdogOptions(8 * TiB, object_size=8 * MiB, redundancy="4:2", preallocation="full")
    qb.VdiOptions(opts.VDI_MAX_SIZE, static=True)
    qb.VpcOptions(2040 * GiB, subformat="fixed", force_size=True)
    qb.VhdxOptions(64 * TiB, block_size=256 * MiB, log_size=3 * MiB, subformat="fixed", block_state_zero=False)
    for sub in opts.VMDK_SUBFORMATS:
        qb.VmdkOptions(MiB, subformat=sub, compat6=True)
    for a in opts.VMDK_ADAPTER_TYPES:
        qb.VmdkOptions(MiB, adapter_type=a)
    r = qb.RbdOptions(MiB, cluster_size=4 * MiB, pool="rbd", image="disk", conf="/etc/ceph.conf")
    assert r.location() == qb.Location.rbd("rbd", "disk", conf="/etc/ceph.conf")
    assert r.to_native() == {"size": MiB, "cluster_size": 4 * MiB, "pool": "rbd", "image": "disk", "conf": "/etc/ceph.conf"}
    with pytest.raises(qb.InvalidParamError):
        qb.RbdOptions(MiB).location()


def test_qcow2_compat_takes_qemus_v2_v3_spelling():
    assert qb.Qcow2Options(MiB, compat="v2").compat == "0.10"
    assert qb.Qcow2Options(MiB, compat="v3").to_native()["compat"] == "1.1"
    with pytest.raises(qb.InvalidParamError, match="needs compat 1.1"):
        qb.Qcow2Options(MiB, compat="v2", lazy_refcounts=True)


def test_qed_size_limit_wraps_like_qemu():
    # 2 MiB clusters, 16-cluster tables: the limit is 2^64, which QEMU's
    # 64-bit arithmetic turns into 0; QEMU then refuses every size.
    assert opts.qed_max_image_size(2 * MiB, 16) == 0
    assert opts.qed_max_image_size(2 * MiB, 8) == 1 << 63
    with pytest.raises(qb.InvalidParamError):
        qb.QedOptions(MiB, cluster_size=2 * MiB, table_size=16)


def test_native_names_are_qemus():
    n = qb.VmdkOptions(MiB, backing="b.vmdk", backing_fmt="vmdk", hwversion="6", toolsversion="10").to_native()
    assert n == {
        "size": MiB, "backing_file": "b.vmdk", "backing_fmt": "vmdk", "compat6": False,
        "subformat": "monolithicSparse", "adapter_type": "ide", "zeroed_grain": False,
        "hwversion": "6", "toolsversion": "10",
    }
    assert qb.VpcOptions(MiB, "fixed", True).to_native() == {"size": MiB, "subformat": "fixed", "force_size": True}
    assert qb.SheepdogOptions(MiB, redundancy="2:1", object_size=MiB).to_native() == {
        "size": MiB, "preallocation": "off", "redundancy": "2:1", "object_size": MiB,
    }
    q = qb.Qcow2Options(MiB, data_file="d.raw", data_file_raw=True, extended_l2=True).to_native()
    assert q["data_file"] == "d.raw" and q["data_file_raw"] is True and q["extended_l2"] is True


# --- qemu-img as the oracle for the limits ---------------------------------------


QEMU_CASES = [
    ("qed", {"cluster_size": 4 * KiB, "table_size": 1}, MiB),
    ("qed", {"cluster_size": 64 * MiB}, MiB),
    ("qed", {"cluster_size": 2 * MiB, "table_size": 16}, MiB),
    ("qed", {"cluster_size": 2 * MiB, "table_size": 8}, MiB),
    ("qed", {"table_size": 16}, MiB),
    ("qed", {}, 64 * TiB),
    ("qed", {}, 64 * TiB + 512),
    # (the largest size with 512-byte clusters takes qemu-img seconds to create: ours only, below)
    ("qcow2", {"cluster_size": 512}, 128 * GiB + 512),
    ("qcow2", {"extended_l2": True}, 1024 * TiB),
    ("qcow2", {"extended_l2": True}, 1024 * TiB + 512),
    ("qcow2", {"cluster_size": 4096}, 8 * TiB + 512),
    ("qcow2", {"refcount_bits": 64, "lazy_refcounts": True}, MiB),
    ("vdi", {}, TiB),  # (the largest accepted size writes a 2 GiB block map: too slow here)
    ("vdi", {}, opts.VDI_MAX_SIZE + 512),
    ("vdi", {"static": True}, MiB),
    ("vpc", {}, 2040 * GiB),
    ("vpc", {}, 2041 * GiB),
    ("vpc", {"subformat": "fixed"}, 2041 * GiB),
    ("vpc", {"force_size": True}, 2040 * GiB),
    ("vhdx", {}, 64 * TiB),
    ("vhdx", {}, 64 * TiB + 512),
    ("vhdx", {"block_size": 3 * MiB}, MiB),
    ("vhdx", {"block_size": 256 * MiB, "log_size": 2 * MiB}, MiB),
    ("vhdx", {"log_size": 4 * GiB}, MiB),
    ("vmdk", {"compat6": True, "hwversion": "7"}, MiB),
    ("vmdk", {"compat6": True, "subformat": "streamOptimized"}, MiB),
    ("vmdk", {"subformat": "monolithicFlat", "zeroed_grain": True}, MiB),
    ("vmdk", {"adapter_type": "legacyESX", "subformat": "twoGbMaxExtentSparse"}, MiB),
]


def _qemu_value(v):
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


@pytest.mark.parametrize("fmt, kw, size", QEMU_CASES)
def test_limits_agree_with_qemu_img(tmp, fmt, kw, size):
    try:
        opts.options_class(fmt)(size, **kw)
        ours = True
    except qb.InvalidParamError:
        ours = False
    o = ",".join(f"{k}={_qemu_value(v)}" for k, v in kw.items())
    args = ["create", "-f", fmt] + (["-o", o] if o else []) + [str(tmp / f"x.{fmt}"), str(size)]
    theirs = qemu_img(*args, check=False).returncode == 0
    assert ours == theirs, f"qemu-img {' '.join(args)}: qemu {'accepts' if theirs else 'refuses'}"


# --- formats the engine does not create yet --------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        qb.CowOptions(MiB),
        qb.QedOptions(MiB),
        qb.QcowOptions(MiB),
        qb.RbdOptions(MiB),
        qb.SheepdogOptions(MiB),
        qb.VmdkOptions(MiB),
    ],
    ids=lambda o: type(o).__name__,
)
def test_create_is_served_or_cleanly_unsupported(tmp, options):
    """A format the engine creates gives an image of that format; any other
    raises UnsupportedError naming it and leaves nothing behind."""
    path = tmp / "new.img"
    if options.format in qb.supported_formats(write=True):
        qb.create(path, options)
        with qb.open(path, flags=0) as img:
            assert img.format is options.format and img.virt_size == MiB
        return
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.create(path, options)
    assert ei.value.code == -102 and str(options.format) in ei.value.message
    assert not path.exists()


def test_create_refuses_what_is_not_an_options_object(tmp):
    with pytest.raises(qb.InvalidParamError):
        qb.create(tmp / "x", {"size": 1})  # type: ignore[arg-type]
    with pytest.raises(qb.InvalidParamError):
        qb.create(tmp / "x", opts.ImageOptions(1))


RULE_CASES = [
    ("qcow2", {"backing_file": "{raw}", "backing_fmt": "raw", "preallocation": "metadata"}, None),
    ("qcow2", {"backing_file": "{raw}", "backing_fmt": "raw", "preallocation": "metadata", "extended_l2": True}, None),
    ("qcow2", {"backing_file": "{raw}", "backing_fmt": "raw", "data_file": "{tmp}/d.raw", "data_file_raw": True}, None),
    ("qcow2", {"backing_file": "{raw}", "backing_fmt": "raw", "data_file": "{tmp}/d.raw"}, None),
    ("qcow2", {"backing_fmt": "raw"}, MiB),
    ("qcow2", {"compat": "0.10", "refcount_bits": 64}, MiB),
    ("qcow2", {"compat": "0.10", "compression_type": "zstd"}, MiB),
    ("qcow2", {"compat": "0.10", "data_file": "{tmp}/d.raw"}, MiB),
    ("qcow2", {"compat": "0.10", "extended_l2": True}, MiB),
    ("qcow2", {"compat": "0.10", "lazy_refcounts": True}, MiB),
    ("qcow2", {"extended_l2": True, "cluster_size": 8192}, MiB),
    ("qcow2", {"extended_l2": True, "cluster_size": 16384}, MiB),
    ("qcow2", {"data_file_raw": True}, MiB),
    ("qcow2", {"refcount_bits": 1, "cluster_size": 512}, MiB),
    ("qcow", {}, 0),
    ("qcow", {"backing_file": "{raw}", "backing_fmt": "raw"}, None),
    ("qed", {"backing_file": "{raw}", "backing_fmt": "raw"}, None),
    ("vmdk", {"backing_file": "{raw}", "backing_fmt": "raw"}, MiB),
    ("vmdk", {"backing_file": "{vmdk}", "backing_fmt": "vmdk", "subformat": "monolithicFlat"}, None),
    ("vmdk", {"backing_file": "{vmdk}", "backing_fmt": "vmdk"}, None),
    ("vmdk", {"subformat": "streamOptimized", "zeroed_grain": True}, MiB),
]


@pytest.mark.parametrize("fmt, kw, size", RULE_CASES)
def test_rules_agree_with_qemu_img(tmp, fmt, kw, size):
    qemu_img("create", "-f", "raw", str(tmp / "base.raw"), "1M")
    qemu_img("create", "-f", "vmdk", str(tmp / "base.vmdk"), "1M")
    kw = {k: v.format(raw=tmp / "base.raw", vmdk=tmp / "base.vmdk", tmp=tmp) if isinstance(v, str) else v for k, v in kw.items()}
    ours_kw = {("backing" if k == "backing_file" else k): v for k, v in kw.items()}
    try:
        opts.options_class(fmt)(size or 0, **ours_kw)
        ours = True
    except qb.InvalidParamError:
        ours = False
    o = ",".join(f"{k}={_qemu_value(v)}" for k, v in kw.items())
    args = ["create", "-f", fmt] + (["-o", o] if o else []) + [str(tmp / f"x.{fmt}")] + ([str(size)] if size is not None else [])
    r = qemu_img(*args, check=False)
    theirs = r.returncode == 0
    assert ours == theirs, f"qemu-img {' '.join(args)}: qemu {'accepts' if theirs else 'refuses'}: {r.stderr}"


def test_parallels_options_match_qemu_and_create(tmp):
    with pytest.raises(qb.InvalidParamError, match="multiple of 512"):
        qb.ParallelsOptions(MiB, cluster_size=1000)
    with pytest.raises(qb.InvalidParamError, match="too large"):
        qb.ParallelsOptions(MiB, cluster_size=2 * 1024 * MiB)  # qemu-img: "Cluster size is too large"
    ours, theirs = tmp / "ours.hdd", tmp / "theirs.hdd"
    qb.create(ours, qb.ParallelsOptions(64 * MiB, cluster_size=4096))
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=4096", str(theirs), str(64 * MiB))
    assert qemu_info(str(ours))["format"] == "parallels"
    assert qemu_info(str(ours))["virtual-size"] == qemu_info(str(theirs))["virtual-size"]
    assert qb.options_class("parallels") is qb.ParallelsOptions
