"""``measure``: how big a new image file will be (``qemu-img measure``).

The figures are the ones qemu-img gives for the same target options, so a
script that sizes a volume with one gets the same answer from the other:

- ``fully_allocated``: the file once every guest byte is written;
- ``required``: the file after copying ``source`` into it with ``convert``
  (or, without a source, right after creation): the metadata of the fully
  allocated file (an overestimate QEMU makes too) plus the clusters that
  hold data in the source;
- ``bitmaps``: extra bytes to copy the source's persistent bitmaps, for a
  qcow2 v3 target and a source that can hold bitmaps; otherwise None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from .errors import InvalidParamError, UnsupportedError
from .formats import Format
from .image import Where
from .options import ImageOptions, options_class
from .tools import OptionsArg, _opened

#: QEMU's QCOW_MAX_L1_SIZE: the largest L1 table, 32 MiB.
_MAX_L1_BYTES = 32 << 20


@dataclass(frozen=True)
class MeasureResult:
    """Sizes in bytes, as ``qemu-img measure`` names them."""

    required: int
    fully_allocated: int
    bitmaps: Optional[int] = None

    def to_qemu_json(self) -> Dict[str, int]:
        """``qemu-img measure --output=json``'s object (in its key order)."""
        d: Dict[str, int] = {}
        if self.bitmaps is not None:
            d["bitmaps"] = self.bitmaps
        d["required"] = self.required
        d["fully-allocated"] = self.fully_allocated
        return d


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _refcount_metadata(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """Bytes of refcount blocks and table needed to count ``clusters`` clusters
    and themselves: the fixed point where adding them needs no more."""
    per_block = cluster_size * 8 // refcount_bits
    per_table_cluster = cluster_size // 8
    table = blocks = 0
    last, n = -1, 0
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def _qcow2_full_size(virtual: int, cluster_size: int, refcount_bits: int, extended_l2: bool) -> int:
    """The file of a fully allocated qcow2 image: header cluster, L2 and L1
    tables rounded to whole clusters, refcount metadata and the data."""
    entry = 16 if extended_l2 else 8
    l2_entries = _round_up(virtual // cluster_size, cluster_size // entry)
    meta = cluster_size + l2_entries * entry
    l1_entries = _round_up(l2_entries * entry // cluster_size, cluster_size // 8)
    meta += l1_entries * 8
    meta += _refcount_metadata((meta + virtual) // cluster_size, cluster_size, refcount_bits)
    return meta + virtual


def _bitmaps_size(fs: Dict[str, Any], disk_size: int, cluster_size: int) -> int:
    """Room for the source's bitmaps in a target with ``cluster_size``:
    each bitmap's data and table, then the directory."""
    total, directory = 0, 0
    for b in fs.get("bitmaps", []):
        data = -(-(-(-disk_size // b["granularity"])) // 8)
        clusters = -(-data // cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        directory += _round_up(24 + len(b["name"].encode()), 8)
    return total + _round_up(directory, cluster_size)


def _data_clusters(img: Any, cluster_size: int) -> int:
    """Bytes of whole clusters holding data in ``img``'s guest view (zero and
    unallocated runs need none)."""
    required, pos, size = 0, 0, img.virt_size
    while pos < size:
        st = img.block_status(pos, size - pos)
        if st.zero or not (st.data and st.present):
            pos += st.length
            continue
        end = _round_up(pos + st.length, cluster_size)
        required += end - (pos - pos % cluster_size)
        pos = end
    return required


def _defaults(fmt: Format) -> Dict[str, Any]:
    cls = options_class(fmt)
    return {k: f.default for k, f in cls.__dataclass_fields__.items()}


def _target(options: OptionsArg) -> Tuple[Format, Dict[str, Any]]:
    """The target format and its option fields (defaults where not given)."""
    if isinstance(options, ImageOptions):
        return options.format, {k: getattr(options, k) for k in options.__dataclass_fields__}
    if isinstance(options, type) and issubclass(options, ImageOptions):
        fmt = options.format
    elif isinstance(options, Format):
        fmt = options
    elif isinstance(options, str):
        fmt = Format.from_str(options)
        if fmt is Format.NONE:
            raise InvalidParamError(f"unknown format {options!r}")
    else:
        raise InvalidParamError(f"expected target options, an options class, a Format or a name, not {options!r}")
    return fmt, _defaults(fmt)


def measure(
    options: OptionsArg,
    *,
    size: Optional[int] = None,
    source: Optional[Where] = None,
    source_format: Optional[Union[Format, str]] = None,
    force_share: bool = False,
) -> MeasureResult:
    """Sizes of a new image of ``options`` (an options object, class, Format or
    name), for a disk of ``size`` bytes or for a copy of ``source``.

    Without either, an options object's ``virt_size`` is used. Target formats
    measured: qcow2 (every option that changes the layout: cluster_size,
    refcount_bits, extended_l2, compat, preallocation, backing) and raw;
    others raise :class:`~libqblock.errors.UnsupportedError`, as qemu-img
    does for them. ``force_share`` opens ``source`` as ``qemu-img measure
    -U``: even while another process has it open for writing.
    """
    fmt, o = _target(options)
    return _measure_with(fmt, o, size, source, source_format, force_share)


def _measure_with(fmt: Format, o: Dict[str, Any], size: Optional[int], source: Optional[Where],
                  source_format: Optional[Union[Format, str]], force_share: bool = False) -> MeasureResult:
    """:func:`measure` for target option fields already gathered (the CLI's -o)."""
    if size is not None and source is not None:
        raise InvalidParamError("give a size or a source image, not both")
    if fmt not in (Format.QCOW2, Format.RAW):
        raise UnsupportedError(f"the {fmt.value} format does not support size measurement")
    if fmt is Format.QCOW2 and o.get("encrypt"):
        raise UnsupportedError("measuring encrypted qcow2 images is not supported")
    if source is not None:
        with _opened(source, source_format, force_share) as img:
            return _measure(fmt, o, img.virt_size, img)
    if size is None:
        size = int(o.get("virt_size") or 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidParamError(f"the size must be a non-negative int, not {size!r}")
    return _measure(fmt, o, size, None)


def _measure(fmt: Format, o: Dict[str, Any], size: int, img: Any) -> MeasureResult:
    if fmt is Format.RAW:
        n = _round_up(size, 512) if img is None else size
        return MeasureResult(required=n, fully_allocated=n)
    cs = int(o["cluster_size"])
    extended = bool(o["extended_l2"])
    virtual = _round_up(size, cs)
    entry = 16 if extended else 8
    if -(-(virtual // cs) // (cs // entry)) * 8 > _MAX_L1_BYTES:
        raise InvalidParamError("The image size is too large (try using a larger cluster size)")
    if img is None:
        data = 0
    elif o.get("backing"):
        data = virtual  # the new backing file may share nothing with the source
    else:
        data = _data_clusters(img, cs)
    if o["preallocation"] in ("falloc", "full"):
        data = virtual
    full = _qcow2_full_size(virtual, cs, int(o["refcount_bits"]), extended)
    bitmaps = None
    if o["compat"] != "0.10" and img is not None and _holds_bitmaps(img):
        bitmaps = _bitmaps_size(img.info().format_specific, img.virt_size, cs)
    return MeasureResult(required=full - virtual + data, fully_allocated=full, bitmaps=bitmaps)


def _holds_bitmaps(img: Any) -> bool:
    """Whether the source can hold persistent bitmaps (qcow2 version 3)."""
    return img.format is Format.QCOW2 and img.info().format_specific.get("compat") == "1.1"
