"""``Image.render_map()`` / ``qblock map --output=svg``: known images drawn,
the drawn cells checked one by one, and a 1 TiB image of many extents."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List

import pytest

import libqblock as qb

from conftest import qblock_cmd

MiB = 1 << 20
SVG = "{http://www.w3.org/2000/svg}"


def _cells(svg: str) -> List[str]:
    root = ET.fromstring(svg)
    return [r.get("class") or "" for r in root.iter(SVG + "rect") if r.get("class")]


def _legend(svg: str) -> List[str]:
    root = ET.fromstring(svg)
    return [t.text or "" for t in root.iter(SVG + "text")][1:]


def test_each_cell_shows_what_holds_it_and_which_layer(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qb.create(base, qb.Qcow2Options(8 * MiB))
    with qb.open(base) as img:
        img.write(b"b" * MiB, 2 * MiB)  # cell 2: the backing file's data
        img.write(b"c" * MiB, 5 * MiB)  # cell 5: hidden below the top's zeroes
    qb.create(top, qb.Qcow2Options(8 * MiB, backing=base.name, backing_fmt=qb.Format.QCOW2))
    with qb.open(top) as img:
        img.write(b"t" * MiB, 0)  # cell 0: the top's data
        img.write(b"t" * (MiB // 4), 3 * MiB)  # cell 3: a quarter data, the rest unallocated
        img.write_zeroes(5 * MiB, MiB)  # cell 5: zero in the top
    with qb.open(top, flags=0) as img:
        svg = img.render_map(8)
    assert _cells(svg) == ["data-0", "unallocated", "data-1", "data-0", "unallocated", "zero",
                           "unallocated", "unallocated"]
    # Cell 3 shows its quarter of data, faintly.
    opacity = [float(r.get("fill-opacity") or 0) for r in ET.fromstring(svg).iter(SVG + "rect") if r.get("class")]
    assert opacity[0] == 1.0 and opacity[3] == pytest.approx(0.3 + 0.7 * 0.25, abs=1e-3)
    legend = _legend(svg)
    assert legend == ["data (top image): 1.25 MiB (15.6%)", "data (backing file): 1 MiB (12.5%)",
                      "zero: 1 MiB (12.5%)", "unallocated: 4.75 MiB (59.4%)"]
    # The same picture from the command line.
    r = subprocess.run([*qblock_cmd(), "map", "--output=svg", "--cells=8", str(top)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == svg


def test_a_terabyte_of_many_extents_is_binned(tmp_path: Path) -> None:
    p = tmp_path / "big.qcow2"
    size = 1 << 40
    qb.create(p, qb.Qcow2Options(size))
    with qb.open(p) as img:
        for i in range(2000):  # 2,000 separate extents, every 512 MiB
            img.write(b"x" * 65536, i * (size // 2000) // 65536 * 65536)
    with qb.open(p, flags=0) as img:
        svg = img.render_map()
    cells = _cells(svg)
    # 4,096 cells of 256 MiB: each 64 KiB extent stays visible in its own cell.
    assert len(cells) == 4096 and cells.count("data-0") == 2000
    assert set(cells) == {"data-0", "unallocated"}
    assert _legend(svg)[0].startswith("data (top image): 125 MiB")


def test_bad_cell_counts_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.raw"
    qb.create(p, qb.RawOptions(4096))
    with qb.open(p, flags=0) as img:
        for bad in (0, -1, 1 << 21, True, 2.5):
            with pytest.raises(qb.InvalidParamError):
                img.render_map(bad)  # type: ignore[arg-type]
        assert len(_cells(img.render_map(100000))) == 4096  # never more cells than bytes
