"""Real images written by other software (../shared/corpus): every one must
either decode exactly as QEMU decodes it, or fail with a clean
UnsupportedError/CorruptImageError — never a crash or a silently wrong disk.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import lzma
import re
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

import libqblock as qb

from conftest import CORPUS

# Formats with a driver today must decode their images exactly; every other
# format must raise UnsupportedError. A driver that lands flips its images
# from the second expectation to the first.
DRIVERS = {f.value for f in qb.supported_formats()}

# magic_format column prefix -> our format name.
MAGIC_TO_FORMAT = [
    ("qcow2", "qcow2"),
    ("qcow v1", "qcow"),
    ("vpc/vhd", "vpc"),
    ("vmdk SEsparse", "raw"),  # a bare extent without descriptor: QEMU reads it as raw too
    ("vmdk", "vmdk"),
    ("vhdx", "vhdx"),
    ("vdi", "vdi"),
    ("parallels", "parallels"),
    ("dmg", "dmg"),
    ("bochs", "bochs"),
    ("cloop", "cloop"),
    ("luks", "luks"),
    ("raw", "raw"),
    ("asif", "raw"),  # Apple sparse images: neither QEMU nor we know them
    ("empty", "raw"),
]

if not CORPUS.is_dir():  # the corpus lives beside the repo, not in it
    pytest.skip(f"conformance corpus not found at {CORPUS}", allow_module_level=True)


def _rows() -> List[Dict[str, str]]:
    with open(CORPUS / "MANIFEST.tsv", newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r for r in rows if not r["magic_format"].startswith("support file")]


def _format_of(row: Dict[str, str]) -> str:
    for prefix, fmt in MAGIC_TO_FORMAT:
        if row["magic_format"].startswith(prefix):
            return fmt
    raise AssertionError(f"unknown magic_format {row['magic_format']!r}")


def _expected_hash(row: Dict[str, str]) -> str:
    """QEMU's decoded-disk hash: the forced-format column when QEMU's probe is fooled."""
    for col in ("qemu_with_forced_format", "qemu_convert_raw_sha256_or_error"):
        hashes = re.findall(r"\b[0-9a-f]{64}\b", row[col])
        if hashes:
            return hashes[-1]
    return ""


def _decompress_sparse(src: Path, dst: Path) -> None:
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(src.suffix)
    if opener is None:
        shutil.copyfile(src, dst)
        return
    zero = bytes(1 << 16)
    with opener(src, "rb") as fin, open(dst, "wb") as fout:
        while True:
            chunk = fin.read(1 << 16)
            if not chunk:
                break
            if chunk == zero[: len(chunk)]:
                fout.seek(len(chunk), 1)  # keep zero runs as holes
            else:
                fout.write(chunk)
        fout.truncate()


@pytest.fixture(scope="session")
def materialized(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("corpus")
    done: set = set()

    def get(stored: str) -> Path:
        """Decompress one stored file and its directory siblings (backing files,
        data files, extents) into the session's copy; returns the image path."""
        src = CORPUS / "images" / stored
        for sib in src.parent.iterdir():
            if sib.is_file() and sib not in done:
                name = sib.name
                for ext in (".gz", ".bz2", ".xz"):
                    if name.endswith(ext):
                        name = name[: -len(ext)]
                out = root / sib.parent.relative_to(CORPUS / "images") / name
                out.parent.mkdir(parents=True, exist_ok=True)
                _decompress_sparse(sib, out)
                done.add(sib)
        return root / Path(stored).parent / _stem(Path(stored).name)

    return get


def _stem(name: str) -> str:
    for ext in (".gz", ".bz2", ".xz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _stored_name(row: Dict[str, str]) -> str:
    f = row["file"]
    return f if (CORPUS / "images" / f).exists() else next(
        str(p.relative_to(CORPUS / "images")) for p in (CORPUS / "images").glob(f + ".*")
    )


def _hash_disk(img: qb.Image) -> str:
    """sha256 of the whole disk. Ranges map() calls zero are hashed as zeroes
    without reading them, so a wrong map answer also breaks the hash."""
    h = hashlib.sha256()
    chunk = 4 << 20
    buf = bytearray(chunk)
    zeroes = memoryview(bytes(chunk))
    for ext in img.map():
        pos, end = ext.offset, ext.offset + ext.length
        while pos < end:
            n = min(chunk, end - pos)
            if ext.zero and not ext.data:
                h.update(zeroes[:n])
            else:
                view = memoryview(buf)[:n]
                img.readinto(view, pos)
                h.update(view)
            pos += n
    return h.hexdigest()


ROWS = _rows()


def test_the_foundation_formats_have_drivers():
    assert {"raw", "qcow2"} <= DRIVERS
    assert {f.value for f in qb.supported_formats(write=True)} >= {"raw", "qcow2"}


@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_corpus_image(row, materialized):
    fmt = _format_of(row)
    path = materialized(_stored_name(row))
    if fmt not in DRIVERS:
        # No driver yet: a clean refusal naming the format, never raw bytes.
        with pytest.raises((qb.UnsupportedError, qb.CorruptImageError)) as ei:
            qb.open(path, flags=0)
        if isinstance(ei.value, qb.UnsupportedError):
            assert fmt in ei.value.message
        return
    expected = _expected_hash(row)
    if not expected:
        # QEMU rejects it; so must we, cleanly.
        with pytest.raises((qb.CorruptImageError, qb.UnsupportedError)):
            with qb.open(path, flags=0) as img:
                _hash_disk(img)
        return
    with qb.open(path, flags=0) as img:
        assert img.format.value == fmt
        assert _hash_disk(img) == expected
