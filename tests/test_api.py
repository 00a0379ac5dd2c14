"""The public API: exports, the format table, flags, the Image object on raw
images, and the type stubs of the native module."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import libqblock as qb
from libqblock import _native

PKG = Path(qb.__file__).resolve().parent
MiB = 1 << 20


# --- exports -------------------------------------------------------------------------


def test_all_exports_every_public_name():
    for name in qb.__all__:
        assert hasattr(qb, name), name
    assert len(set(qb.__all__)) == len(qb.__all__)
    public = {
        n
        for n, v in vars(qb).items()
        if not n.startswith("_") and (not inspect.ismodule(v) or n == "capi")
    }
    assert public - {"annotations"} == set(qb.__all__)


def test_design_names_exist():
    for name in (
        "Format", "Location", "Qcow2Options", "QcowOptions", "QedOptions", "CowOptions", "RawOptions",
        "VdiOptions", "VmdkOptions", "VpcOptions", "VhdxOptions", "RbdOptions", "SheepdogOptions",
        "create", "open", "str2fmttype", "fmttype2str", "Broker", "QBlockError", "InvalidParamError",
        "InternalError", "NoMemoryError", "OutOfRangeError", "UnsupportedError", "CorruptImageError",
        "ImageLockedError", "O_RDWR", "O_NOCACHE", "O_SNAPSHOT", "O_NO_BACKING", "O_CACHE_WB", "O_NO_FLUSH",
        "O_VALID_MASK", "StaticInfo", "BlockStatus", "Image",
    ):
        assert name in qb.__all__, name
    for name in ("qb_broker_new", "qb_open", "qb_read", "qb_write", "qb_close", "qb_state_delete"):
        assert name in qb.capi.__all__ and callable(getattr(qb.capi, name))


def test_every_public_function_has_a_docstring_and_type_hints():
    for modname in ("options", "capi", "errors", "flags", "location", "formats", "cli", "image"):
        mod = importlib.import_module(f"libqblock.{modname}")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                assert obj.__doc__, f"{modname}.{name} has no docstring"
                sig = inspect.signature(obj)
                assert sig.return_annotation is not inspect.Signature.empty, f"{modname}.{name}"
            elif inspect.isclass(obj):
                assert obj.__doc__, f"{modname}.{name} has no docstring"


# --- the format table ------------------------------------------------------------------


def test_format_table_has_all_sixteen_names_both_ways():
    names = ["cow", "qed", "qcow", "qcow2", "raw", "rbd", "sheepdog", "vdi", "vmdk", "vpc",
             "vhdx", "luks", "parallels", "dmg", "bochs", "cloop"]
    assert [f.value for f in qb.Format if f is not qb.Format.NONE] == names
    for n in names:
        f = qb.Format.from_str(n)
        assert str(f) == n and qb.fmttype2str(f) == n and qb.str2fmttype(n) is f
        assert qb.Format.from_str(n.upper()) is f
    assert qb.Format.from_str("nosuch") is qb.Format.NONE and qb.str2fmttype("") is qb.Format.NONE
    assert qb.Format.from_str(None) is qb.Format.NONE  # type: ignore[arg-type]
    assert qb.fmttype2str(qb.Format.NONE) == "none"


# --- flags -----------------------------------------------------------------------------


def test_flags_are_the_seeds_bits():
    assert issubclass(qb.OpenFlag, int)
    assert (qb.O_RDWR, qb.O_SNAPSHOT, qb.O_NOCACHE, qb.O_CACHE_WB, qb.O_NO_BACKING, qb.O_NO_FLUSH) == (
        0x2, 0x8, 0x20, 0x40, 0x100, 0x200,
    )
    assert qb.O_VALID_MASK == 0x36A
    assert isinstance(qb.O_RDWR | qb.O_CACHE_WB, qb.OpenFlag)


@pytest.mark.parametrize("bad", [0x1, 0x4, 0x400, 1 << 40, -1])
def test_unknown_flag_bits_are_invalid(tmp, bad):
    p = tmp / "f.raw"
    qb.create(p, qb.RawOptions(MiB))
    with pytest.raises(qb.InvalidParamError, match="unknown flag bits"):
        qb.open(p, flags=bad)
    with pytest.raises(qb.InvalidParamError, match="unknown flag bits"):
        qb.create(tmp / "g.raw", qb.RawOptions(MiB), flags=bad)
    assert not (tmp / "g.raw").exists()


@pytest.mark.parametrize("bad", [True, "2", 2.0, None])
def test_flags_must_be_ints(tmp, bad):
    with pytest.raises(qb.InvalidParamError):
        qb.open(tmp / "x.raw", flags=bad)  # type: ignore[arg-type]


def test_flag_docstrings_are_true():
    src = (PKG / "flags.py").read_text()
    for name in ("O_SNAPSHOT", "O_NOCACHE"):
        after = src.split(f"{name} = ")[1].split('"""')[1]
        assert "not supported yet" not in after.lower(), name


def test_read_only_and_write_through_flags(tmp):
    p = tmp / "ro.raw"
    qb.create(p, qb.RawOptions(MiB))
    with qb.open(p, flags=0) as img:
        with pytest.raises(qb.InvalidParamError):
            img.write(b"x", 0)
    with qb.open(p, flags=qb.O_RDWR) as img:  # write-through: each write reaches the disk
        img.write(b"x", 0)
    with qb.open(p, flags=qb.O_RDWR | qb.O_NO_FLUSH | qb.O_NO_BACKING | qb.O_CACHE_WB) as img:
        img.write(b"y", 1)
        img.flush()
    assert p.read_bytes()[:2] == b"xy"


# --- Image on a raw image -----------------------------------------------------------------


def test_image_api_on_raw(tmp):
    p = tmp / "api.raw"
    qb.create(p, qb.RawOptions(2 * MiB))
    assert qb.probe(p) is qb.Format.RAW
    img = qb.open(p, fmt=qb.Format.RAW)
    assert isinstance(img, qb.Image) and img.format is qb.Format.RAW and img.virt_size == 2 * MiB
    assert not img.closed and "raw" in repr(img) and img.flags == qb.O_RDWR | qb.O_CACHE_WB
    assert img.write(b"abc", MiB - 1) == 3
    assert img.write(bytearray(b"de"), 10) == 2
    assert img.read(5, MiB - 2) == b"\0abc\0"
    buf = bytearray(4)
    assert img.readinto(buf, 9) == 4 and buf == b"\0de\0"
    img.write_zeroes(MiB, 1)
    assert img.read(3, MiB - 1) == b"a\0c"
    img.discard(MiB + 1, 1)
    assert img.read(3, MiB - 1) == b"a\0\0"
    img.flush()
    st = img.block_status(0, 2 * MiB)
    assert isinstance(st, qb.BlockStatus) and st.offset == 0 and 0 < st.length <= 2 * MiB
    assert img.check_allocation(0, 2 * MiB) == (True, 2 * MiB)
    extents = list(img.map())
    assert sum(e.length for e in extents) == 2 * MiB and extents[0].offset == 0
    assert all(isinstance(e.to_qemu_map(), dict) for e in extents)
    i = img.info()
    assert isinstance(i, qb.StaticInfo)
    assert (i.format, i.virt_size, i.location, i.sector_size, i.encrypted) == (qb.Format.RAW, 2 * MiB, qb.Location.file(p), 512, False)
    assert i.backing_location is None and i.backing_format is None
    img.truncate(3 * MiB)
    assert img.virt_size == 3 * MiB
    img.close()
    assert img.closed and "closed" in repr(img)
    img.close()  # closing twice is harmless, as for Python's files
    with pytest.raises(qb.InvalidParamError):
        img.read(1, 0)


def test_open_with_a_format_name_and_unknown_names(tmp):
    p = tmp / "n.raw"
    qb.create(p, qb.RawOptions(MiB))
    with qb.open(p, "raw", flags=0) as img:
        assert img.format is qb.Format.RAW
    with pytest.raises(qb.InvalidParamError, match="unknown format"):
        qb.open(p, "nosuch", flags=0)
    with pytest.raises(qb.UnsupportedError):
        qb.open(p, "sheepdog", flags=0)  # known by name, no driver
    with pytest.raises(qb.CorruptImageError):
        qb.open(p, "vmdk", flags=0)  # forced format, but the bytes are not a vmdk


def test_64_bit_offsets_and_lengths(tmp):
    p = tmp / "big.raw"
    qb.create(p, qb.RawOptions(1 << 43))  # 8 TiB, sparse (ext4 files stop at 16 TiB)
    with qb.open(p) as img:
        off = (1 << 43) - 3
        assert img.write(b"end", off) == 3 and img.read(3, off) == b"end"
        assert img.check_allocation(1 << 33, (1 << 43) - (1 << 33)) == (True, (1 << 43) - (1 << 33))
        with pytest.raises(qb.OutOfRangeError):
            img.read(4, off)
        with pytest.raises((qb.OutOfRangeError, OverflowError)):
            img.read(1, 1 << 64)


# --- the native module and its stubs ----------------------------------------------------------


def _stub_names():
    tree = ast.parse((PKG / "_native.pyi").read_text())
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Image")
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    return funcs, methods


def test_stub_names_match_the_native_module():
    funcs, methods = _stub_names()
    assert funcs == {n for n in _native.__all__ if n != "Image"}
    assert methods == {n for n in dir(_native.Image) if not n.startswith("_")}
    assert (PKG / "py.typed").exists()


def test_stubtest(tmp):
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp / "mypy-cache"))
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "libqblock._native"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_package_passes_mypy_strict(tmp):
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp / "mypy-cache"))
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", str(PKG)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_fmttype2str_takes_names_and_refuses_the_rest():
    assert qb.fmttype2str("vmdk") == "vmdk"  # type: ignore[arg-type]
    with pytest.raises(qb.InvalidParamError):
        qb.fmttype2str("nosuch")  # type: ignore[arg-type]
