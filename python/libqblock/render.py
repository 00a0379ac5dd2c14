"""A picture of the virtual disk: an SVG allocation map (``Image.render_map``,
``qblock map --output=svg``)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Dict, List

from .errors import InvalidParamError

if TYPE_CHECKING:
    from .image import BlockStatus, Image

#: Colours of the classes a cell can show, in legend order.
COLOURS: Dict[str, str] = {
    "data-0": "#1f77b4",  # data in the top image
    "data-1": "#ff7f0e",  # data in its backing file
    "data-2": "#2ca02c",
    "data-3+": "#9467bd",  # deeper layers
    "zero": "#c8c8c8",  # reads as zeroes, allocated as such
    "unallocated": "#ffffff",  # in no layer: reads as zeroes
}
_LABELS = {
    "data-0": "data (top image)",
    "data-1": "data (backing file)",
    "data-2": "data (2nd backing file)",
    "data-3+": "data (deeper)",
    "zero": "zero",
    "unallocated": "unallocated",
}
CELL = 8  # pixels a side
COLUMNS = 128


def extent_class(e: "BlockStatus") -> str:
    """The class an extent of ``Image.map()`` is drawn as."""
    if not e.present:
        return "unallocated"
    if e.zero and not e.data:
        return "zero"
    return f"data-{e.depth}" if e.depth < 3 else "data-3+"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_map(image: "Image", cells: int = 4096) -> str:
    """The disk as an SVG grid of ``cells`` equal cells (128 a row), with a
    legend of every class's share. A cell takes the colour of the first
    class in :data:`COLOURS` it holds any byte of (data from the shallowest
    layer, then zero, then unallocated), so that a few KiB of data stay
    visible on a terabyte disk; its opacity tells the share of the cell that
    class holds.
    One pass over ``image.map()``: a 1 TiB disk of millions of extents
    costs its extents plus its cells."""
    if not isinstance(cells, int) or isinstance(cells, bool) or not 1 <= cells <= 1 << 20:
        raise InvalidParamError(f"cells must be an int from 1 to {1 << 20}, not {cells!r}")
    size = image.virt_size
    cells = max(1, min(cells, size))
    per = -(-size // cells)  # bytes a cell covers (the last one may cover fewer)
    cells = -(-size // per)
    counts: List[Dict[str, int]] = [{} for _ in range(cells)]
    totals: Dict[str, int] = {}
    for e in image.map():
        cls = extent_class(e)
        totals[cls] = totals.get(cls, 0) + e.length
        pos, end = e.offset, e.offset + e.length
        while pos < end:
            i = pos // per
            n = min(end, (i + 1) * per) - pos
            c = counts[i]
            c[cls] = c.get(cls, 0) + n
            pos += n
    rows = -(-cells // COLUMNS)
    width = COLUMNS * CELL
    legend_top = rows * CELL + 36
    height = legend_top + 18 * len(totals) + 8
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(str(image.location))}: allocation map</title>",
        f'<text x="0" y="14">{escape(str(image.location))} ({image.format}, {_size(size)}; '
        f"one cell is {_size(per)})</text>",
        '<g transform="translate(0,24)" stroke="#e0e0e0" stroke-width="0.5">',
    ]
    for i, c in enumerate(counts):
        cls = next((k for k in COLOURS if k in c), "unallocated")
        share = c.get(cls, 0) / max(1, sum(c.values()))
        x, y = (i % COLUMNS) * CELL, (i // COLUMNS) * CELL
        out.append(f'<rect class="{cls}" x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{COLOURS[cls]}" '
                   f'fill-opacity="{0.3 + 0.7 * share:.3f}"><title>{i * per:#x}: {cls} '
                   f"({100 * share:.3g}%)</title></rect>")
    out.append("</g>")
    for k, cls in enumerate(c for c in COLOURS if c in totals):
        y = legend_top + 18 * k
        share = 100 * totals[cls] / size
        out.append(f'<rect x="0" y="{y - 10}" width="12" height="12" fill="{COLOURS[cls]}" stroke="#808080"/>')
        out.append(f'<text x="18" y="{y}">{_LABELS[cls]}: {_size(totals[cls])} ({share:.3g}%)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
