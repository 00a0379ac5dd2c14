"""Smoke run of an installed libqblock wheel, on its own (see .ci/wheel-test).

Run with the interpreter of a clean venv that has only the wheel installed:
no compiler and no QEMU on PATH, no source tree on sys.path. It creates,
writes, reads, inspects, checks and converts images with nothing but the
standard library and the wheel, and exercises the zero-copy buffer paths
(the part of the stable ABI the engine declares itself, see
rust/qblock-python/src/buffer.rs). Exits non-zero on the first failure.
"""

from __future__ import annotations

import array
import hashlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"wheel smoke failed: {what}")


def _environment() -> None:
    here = Path(__file__).resolve().parent.parent
    import libqblock

    where = Path(libqblock.__file__).resolve()
    _expect(here not in where.parents, f"libqblock imported from the source tree ({where})")
    for tool in ("cc", "gcc", "rustc", "cargo", "qemu-img"):
        _expect(shutil.which(tool) is None, f"{tool} is on PATH: the venv is not clean")


def _round_trip(d: Path) -> None:
    import libqblock as qb

    pattern = bytes(range(256)) * 256  # 64 KiB
    src = d / "a.qcow2"
    qb.create(str(src), qb.Qcow2Options(virt_size=64 << 20, cluster_size=65536))
    with qb.open(os.fsencode(src), flags=qb.O_RDWR) as img:  # bytes location
        _expect(img.write(pattern, 1 << 20) == len(pattern), "write returned a short count")
        img.write(memoryview(bytearray(b"\x5a" * 4096)), 8 << 20)
        img.write(array.array("I", [0xDEADBEEF] * 1024), 12 << 20)
        img.flush()
    with qb.open(src) as img:  # os.PathLike location
        _expect(img.read(len(pattern), 1 << 20) == pattern, "read back differs")
        buf = bytearray(4096)
        _expect(img.readinto(buf, 8 << 20) == 4096 and buf == b"\x5a" * 4096, "readinto(bytearray) differs")
        view = memoryview(bytearray(8192))[4096:]
        img.readinto(view, 12 << 20)
        _expect(bytes(view) == array.array("I", [0xDEADBEEF] * 1024).tobytes(), "readinto(memoryview) differs")
        info = img.info()
        _expect(info.format is qb.Format.QCOW2 and info.virt_size == 64 << 20, f"info is wrong: {info}")
        data = [e for e in img.map() if e.data]
        _expect(sum(e.length for e in data) == 3 * 65536, f"map is wrong: {data}")
        digest = hashlib.sha256()
        with io.BufferedReader(img.stream()) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _expect(repr(img).startswith("<libqblock.Image"), f"repr is {img!r}")
    _expect(qb.check(src).clean, "check found problems")

    dst = d / "b.vmdk"
    qb.convert(src, dst, "vmdk")
    _expect(qb.compare(src, dst).identical, "convert changed the content")
    with qb.open(dst) as img:
        _expect(img.format is qb.Format.VMDK, "the converted image is not vmdk")
        whole = hashlib.sha256(img.read(img.virt_size, 0)).hexdigest()
    _expect(whole == digest.hexdigest(), "the stream's digest differs from the converted image's")

    try:
        qb.open(d / "missing.qcow2")
    except qb.QBlockError as e:
        _expect(e.errno != 0, "an error without a code")
    else:
        raise SystemExit("wheel smoke failed: opening a missing file succeeded")


def main() -> None:
    _environment()
    with tempfile.TemporaryDirectory() as d:
        _round_trip(Path(d))
    print(f"wheel smoke ok on CPython {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
