"""Where the fields are in each format, and how to push them out of range.

Each format's locator parses a generated image (which is known to be valid,
so the parsing can be simple) and lists :class:`Field` values: a header
field or a table entry, where it sits (every copy of it), its width and byte
order, and the interesting values to put there, each with a label
("past the end of the file", "onto the header", ...). Layouts follow the
formats' specifications (QEMU's docs/interop/qcow2.txt and qed_spec.txt, the
VMDK, VHD, VHDX and VDI specifications) and libqblock's drivers. No
Hypothesis here: :mod:`.strategies` draws from these lists.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, Union

from ._model import GeneratedImage

#: Labels shared by every format, so tests and users can pick a kind of damage.
PAST_EOF = "past the end of the file"
FAR_PAST_EOF = "far past the end of the file"
ONTO_HEADER = "onto the header"
ONTO_TABLE = "onto another table"
MISALIGNED = "misaligned"
HUGE = "huge"

#: How many entries of one table are offered (the first allocated ones).
MAX_ENTRIES = 4

Checksum = Callable[[bytearray], List[Tuple[int, int]]]
#: How a field's integer is stored.
ByteOrder = Literal["little", "big"]


@dataclass(frozen=True)
class Field:
    """One field of an image: ``name`` (``header.l1_table_offset``, ``l1[0]``),
    ``offsets`` (file offsets of every copy; all are changed together),
    ``width`` in bytes, ``byteorder`` ("big"/"little"), ``values`` (label,
    new raw value) pairs worth trying, and ``checksum``: a function that
    recomputes the checksums covering the field in a mutated buffer and
    returns the (offset, length) spans it rewrote."""

    name: str
    offsets: Tuple[int, ...]
    width: int
    byteorder: ByteOrder
    values: Tuple[Tuple[str, int], ...] = ()
    checksum: Optional[Checksum] = dc_field(default=None, repr=False)


@dataclass(frozen=True)
class Mutation:
    """One change to an image's bytes.

    ``field`` names what was changed (``byte[N]`` for a plain byte flip);
    ``offsets``/``width``/``byteorder`` say where and how it is stored;
    ``old`` and ``new`` are the raw values before and after; ``label`` the
    kind of value (``PAST_EOF``...); ``description`` one readable line;
    ``data`` the mutated image bytes; ``fixups`` the (offset, length) spans
    rewritten besides the field (recomputed checksums).
    """

    format: str
    field: str
    offsets: Tuple[int, ...]
    width: int
    byteorder: ByteOrder
    old: int
    new: int
    label: str
    description: str
    data: bytes = dc_field(repr=False)
    fixups: Tuple[Tuple[int, int], ...] = ()

    def write_to(self, folder: Union[str, "os.PathLike[str]"], name: str) -> Path:
        """Write the mutated image into ``folder`` as ``name``; returns its path."""
        p = Path(folder) / name
        p.write_bytes(self.data)
        return p

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """Hypothesis prints failing examples with this."""
        p.text(repr(self))

    def __repr__(self) -> str:
        return f"Mutation({self.description!r})"


@dataclass(frozen=True)
class MutatedImage:
    """A generated image and one mutation of it."""

    original: GeneratedImage
    mutation: Mutation

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """Hypothesis prints failing examples with this."""
        p.text(repr(self))

    def __repr__(self) -> str:
        return f"MutatedImage({self.original!r}, {self.mutation!r})"

    @property
    def data(self) -> bytes:
        """The mutated bytes."""
        return self.mutation.data

    def write_to(self, folder: Union[str, "os.PathLike[str]"], name: Optional[str] = None) -> Path:
        """Write the mutated image into ``folder`` (as the original's name by default)."""
        return self.mutation.write_to(folder, name or self.original.name)


# --- helpers -------------------------------------------------------------------


def _u(data: bytes, off: int, width: int, order: ByteOrder) -> int:
    return int.from_bytes(data[off : off + width], order)


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def _limit(values: List[Tuple[str, int]], width: int, old: Optional[int] = None) -> Tuple[Tuple[str, int], ...]:
    """Keep the values that fit the field and differ from the old one, first label wins."""
    out: Dict[int, str] = {}
    top = (1 << (8 * width)) - 1
    for label, v in values:
        if 0 <= v <= top and v != old and v not in out:
            out[v] = label
    return tuple((label, v) for v, label in out.items())


def _field(data: bytes, name: str, off: Union[int, Tuple[int, ...]], width: int, order: ByteOrder,
           values: List[Tuple[str, int]], checksum: Optional[Checksum] = None) -> Field:
    offs = (off,) if isinstance(off, int) else tuple(off)
    old = _u(data, offs[0], width, order)
    return Field(name, offs, width, order, _limit(values, width, old), checksum)


def _pointer(data: bytes, name: str, off: int, width: int, order: ByteOrder, *, unit: int = 1, shift: int = 0,
             mask: Optional[int] = None, align: int = 512, others: Tuple[int, ...] = (), header: bool = True,
             checksum: Optional[Checksum] = None, base: int = 0, reserved: Tuple[int, ...] = ()) -> Field:
    """A field holding a file offset (``(raw & mask) >> shift`` units of ``unit``
    bytes past ``base``); flags outside ``mask`` are kept; ``reserved`` raw
    values mean something else (an unallocated marker) and are never offered."""
    old = _u(data, off, width, order)
    if mask is None:
        mask = (1 << (8 * width)) - 1
    eof = len(data)

    def raw(target: int) -> int:
        units = max(0, target - base) // unit
        return (old & ~mask) | ((units << shift) & mask)

    cur = ((old & mask) >> shift) * unit + base
    step = max(align, unit) // unit << shift
    far = (old & ~mask) | (mask & ~(step - (1 << shift)))
    while far in reserved:
        far -= step
    vals = [(PAST_EOF, raw(_up(eof, max(align, unit)) + 4 * max(align, unit))), (FAR_PAST_EOF, far)]
    if header:
        vals.append((ONTO_HEADER, raw(base)))
    vals += [(ONTO_TABLE, raw(o)) for o in others if o != cur]
    # The smallest step the field can express (qcow2 entries: 512 bytes).
    fine = ((mask & -mask) >> shift) * unit
    if align > fine:
        vals.append((MISALIGNED, raw(cur + fine)))
    vals = [(label, v) for label, v in vals if v not in reserved]
    return Field(name, (off,), width, order, _limit(vals, width, old), checksum)


_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _crc32c_table() -> List[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_CRC32C_POLY if c & 1 else 0)
        table.append(c)
    return table


def _gf2_times(mat: List[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _zero_ops() -> List[List[int]]:
    """Linear maps of the CRC register over 2**k zero bytes, k = 0..31.

    A region table is 64 KiB, nearly all zeroes: stepping the register over
    the zero tail with these maps keeps a pure-Python CRC fast."""
    op = [_CRC32C_POLY] + [1 << (i - 1) for i in range(1, 32)]  # one zero bit
    for _ in range(3):
        op = [_gf2_times(op, col) for col in op]
    ops = [op]
    for _ in range(31):
        ops.append([_gf2_times(ops[-1], col) for col in ops[-1]])
    return ops


_CRC32C = _crc32c_table()
_ZERO_OPS = _zero_ops()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of VHDX headers and region tables."""
    body = bytes(data).rstrip(b"\0")
    c = 0xFFFFFFFF
    t = _CRC32C
    for b in body:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    zeros, k = len(data) - len(body), 0
    while zeros:
        if zeros & 1:
            c = _gf2_times(_ZERO_OPS[k], c)
        zeros >>= 1
        k += 1
    return c ^ 0xFFFFFFFF


def _vhdx_sum(start: int, length: int) -> Checksum:
    def fix(buf: bytearray) -> List[Tuple[int, int]]:
        buf[start + 4 : start + 8] = bytes(4)
        buf[start + 4 : start + 8] = struct.pack("<I", crc32c(bytes(buf[start : start + length])))
        return [(start + 4, 4)]

    return fix


def _vpc_sum(starts: Tuple[int, ...], length: int, at: int) -> Checksum:
    """VHD checksums: the ones' complement of the byte sum, field zeroed."""

    def fix(buf: bytearray) -> List[Tuple[int, int]]:
        spans = []
        for s in starts:
            buf[s + at : s + at + 4] = bytes(4)
            total = sum(buf[s : s + length])
            buf[s + at : s + at + 4] = struct.pack(">I", ~total & 0xFFFFFFFF)
            spans.append((s + at, 4))
        return spans

    return fix


def _sizes(old: int) -> List[Tuple[str, int]]:
    return [(HUGE, 1 << 62), ("maximum", (1 << 64) - 1), ("zero", 0), ("not a sector multiple", old + 1),
            ("doubled", old * 2)]


def _counts(old: int, width: int) -> List[Tuple[str, int]]:
    return [(HUGE, (1 << (8 * width)) - 1), ("large", 1 << (8 * width - 2)), ("zero", 0), ("one more", old + 1)]


# --- formats -------------------------------------------------------------------


def _qcow2(img: GeneratedImage) -> List[Field]:
    d = img.data
    be: ByteOrder = "big"
    version = _u(d, 4, 4, be)
    cbits = _u(d, 20, 4, be)
    cs = 1 << cbits
    l1_size, l1_off = _u(d, 36, 4, be), _u(d, 40, 8, be)
    rt_off, rt_clusters = _u(d, 48, 8, be), _u(d, 56, 4, be)
    nsnap, snap_off = _u(d, 60, 4, be), _u(d, 64, 8, be)
    tables = tuple(o for o in (l1_off, rt_off, snap_off) if o)
    out = [
        _field(d, "header.version", 4, 4, be, [("1", 1), ("4", 4), (HUGE, 0xFFFFFFFF)]),
        _pointer(d, "header.backing_file_offset", 8, 8, be, align=1, header=False),
        _field(d, "header.backing_file_size", 16, 4, be, [("over 1023", 1024), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.cluster_bits", 20, 4, be,
               [("8", 8), ("too small", 0), ("22 (4 MiB)", 22), ("63", 63), (HUGE, 0xFFFFFFFF),
                ("one more", cbits + 1)]),
        _field(d, "header.size", 24, 8, be, _sizes(_u(d, 24, 8, be))),
        _field(d, "header.crypt_method", 32, 4, be, [("aes", 1), ("luks", 2), ("unknown", 3)]),
        _field(d, "header.l1_size", 36, 4, be,
               [("zero", 0), ("one less", l1_size - 1), ("large", 0x10000000), (HUGE, 0xFFFFFFFF)]),
        _pointer(d, "header.l1_table_offset", 40, 8, be, align=cs, others=tables),
        _pointer(d, "header.refcount_table_offset", 48, 8, be, align=cs, others=tables),
        _field(d, "header.refcount_table_clusters", 56, 4, be, _counts(rt_clusters, 4)),
        _field(d, "header.nb_snapshots", 60, 4, be, [("65536", 65536), ("one more", nsnap + 1), (HUGE, 0xFFFFFFFF)]),
        _pointer(d, "header.snapshots_offset", 64, 8, be, align=cs, others=tables),
    ]
    ext_l2 = False
    if version >= 3:
        incompat = _u(d, 72, 8, be)
        ext_l2 = bool(incompat & 16)
        out += [
            _field(d, "header.incompatible_features", 72, 8, be,
                   [("dirty", incompat | 1), ("corrupt", incompat | 2), ("external data file", incompat | 4),
                    ("extended L2 toggled", incompat ^ 16), ("unknown bit", incompat | (1 << 40))]),
            _field(d, "header.refcount_order", 96, 4, be, [("7", 7), (HUGE, 0xFFFFFFFF)]),
            _field(d, "header.header_length", 100, 4, be, [("too short", 71), ("zero", 0), (HUGE, 0xFFFFFFFF),
                                                           ("past the cluster", cs + 8)]),
        ]
    mask = 0x00FFFFFFFFFFFE00
    l1_entries = [(i, _u(d, l1_off + 8 * i, 8, be)) for i in range(min(l1_size, (len(d) - l1_off) // 8))]
    for i, e in [x for x in l1_entries if x[1] & mask][:MAX_ENTRIES]:
        f = _pointer(d, f"l1[{i}]", l1_off + 8 * i, 8, be, mask=mask, align=cs, others=tables, header=False)
        out.append(Field(f.name, f.offsets, 8, be, f.values + _limit([("reserved bits", e | 0x1FF)], 8, e)))
        l2 = e & mask
        esize = 16 if ext_l2 else 8
        shown = 0
        for j in range(cs // esize):
            at = l2 + j * esize
            if at + esize > len(d) or shown >= MAX_ENTRIES:
                break
            le = _u(d, at, 8, be)
            if le & (1 << 62):  # compressed: the host offset is the low bits
                x = 62 - (cbits - 8)
                f2 = _pointer(d, f"l2[{i}][{j}] (compressed)", at, 8, be, mask=(1 << x) - 1, align=1,
                              others=tables, header=False)
                vals = f2.values + _limit([("sector count huge", le | (((1 << 62) - 1) & ~((1 << x) - 1)))], 8, le)
                out.append(Field(f2.name, f2.offsets, 8, be, vals))
                shown += 1
            elif le & mask:
                f2 = _pointer(d, f"l2[{i}][{j}]", at, 8, be, mask=mask, align=cs, others=tables, header=False)
                out.append(Field(f2.name, f2.offsets, 8, be,
                                 f2.values + _limit([("compressed bit set", le | (1 << 62))], 8, le)))
                shown += 1
            if ext_l2 and (le & mask or _u(d, at + 8, 8, be)):
                out.append(_field(d, f"l2[{i}][{j}].bitmap", at + 8, 8, be,
                                  [("allocated and zero", 0xFFFFFFFFFFFFFFFF), ("all zero", 0xFFFFFFFF00000000)]))
    for i in range(min(rt_clusters * cs // 8, MAX_ENTRIES)):
        at = rt_off + 8 * i
        if at + 8 <= len(d) and _u(d, at, 8, be):
            out.append(_pointer(d, f"refcount_table[{i}]", at, 8, be, mask=mask, align=cs, others=tables,
                                header=False))
    if nsnap and snap_off + 40 <= len(d):
        out += [
            _pointer(d, "snapshot[0].l1_table_offset", snap_off, 8, be, align=cs, others=tables),
            _field(d, "snapshot[0].l1_size", snap_off + 8, 4, be, [("large", 0x10000000), (HUGE, 0xFFFFFFFF)]),
            _field(d, "snapshot[0].id_str_size", snap_off + 12, 2, be, [(HUGE, 0xFFFF)]),
            _field(d, "snapshot[0].name_size", snap_off + 14, 2, be, [(HUGE, 0xFFFF)]),
            _field(d, "snapshot[0].extra_data_size", snap_off + 36, 4, be, [("large", 1025), (HUGE, 0xFFFFFFFF)]),
        ]
    return out


def _qcow(img: GeneratedImage) -> List[Field]:
    d = img.data
    be: ByteOrder = "big"
    cbits, l2bits = d[32], d[33]
    l1_off = _u(d, 40, 8, be)
    size = _u(d, 24, 8, be)
    out = [
        _field(d, "header.version", 4, 4, be, [("2", 2), (HUGE, 0xFFFFFFFF)]),
        _pointer(d, "header.backing_file_offset", 8, 8, be, align=1, header=False),
        _field(d, "header.backing_file_size", 16, 4, be, [("over 1023", 1024), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.size", 24, 8, be, _sizes(size)),
        _field(d, "header.cluster_bits", 32, 1, be, [("zero", 0), ("8", 8), ("17", 17), (HUGE, 255)]),
        _field(d, "header.l2_bits", 33, 1, be, [("zero", 0), ("20", 20), (HUGE, 255)]),
        _field(d, "header.crypt_method", 36, 4, be, [("aes", 1), ("unknown", 2)]),
        _pointer(d, "header.l1_table_offset", 40, 8, be, align=8),
    ]
    span = 1 << (cbits + l2bits)
    l1_size = -(-size // span)
    shown = 0
    for i in range(l1_size):
        at = l1_off + 8 * i
        e = _u(d, at, 8, be) if at + 8 <= len(d) else 0
        if not e or shown >= MAX_ENTRIES:
            continue
        shown += 1
        out.append(_pointer(d, f"l1[{i}]", at, 8, be, align=512, others=(l1_off,), header=False))
        for j in range(1 << l2bits):
            at2 = e + 8 * j
            if at2 + 8 > len(d):
                break
            if _u(d, at2, 8, be):
                out.append(_pointer(d, f"l2[{i}][{j}]", at2, 8, be, mask=(1 << 63) - 1, align=1 << cbits,
                                    others=(l1_off, e), header=False))
                break
    return out


def _qed(img: GeneratedImage) -> List[Field]:
    d = img.data
    le: ByteOrder = "little"
    cs, ts = _u(d, 4, 4, le), _u(d, 8, 4, le)
    l1_off = _u(d, 40, 8, le)
    feats = _u(d, 16, 8, le)
    out = [
        _field(d, "header.cluster_size", 4, 4, le, [("zero", 0), ("not a power of two", 3000),
                                                    ("128 MiB", 1 << 27), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.table_size", 8, 4, le, [("zero", 0), ("3", 3), ("32", 32), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.header_size", 12, 4, le, [("zero", 0), ("2", 2), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.features", 16, 8, le, [("need check", feats | 2), ("unknown bit", feats | (1 << 40)),
                                                ("backing file toggled", feats ^ 1)]),
        _pointer(d, "header.l1_table_offset", 40, 8, le, align=cs),
        _field(d, "header.image_size", 48, 8, le, _sizes(_u(d, 48, 8, le))),
        _pointer(d, "header.backing_filename_offset", 56, 4, le, align=1, header=False),
        _field(d, "header.backing_filename_size", 60, 4, le, [("large", 1 << 20), (HUGE, 0xFFFFFFFF)]),
    ]
    entries = ts * cs // 8
    shown = 0
    for i in range(entries):
        at = l1_off + 8 * i
        if at + 8 > len(d) or shown >= MAX_ENTRIES:
            break
        e = _u(d, at, 8, le)
        if not e:
            continue
        shown += 1
        out.append(_pointer(d, f"l1[{i}]", at, 8, le, align=cs, others=(l1_off,), header=False))
        for j in range(entries):
            at2 = e + 8 * j
            if at2 + 8 > len(d):
                break
            if _u(d, at2, 8, le) > 1:  # 1 is QED's zero cluster
                out.append(_pointer(d, f"l2[{i}][{j}]", at2, 8, le, align=cs, others=(l1_off, e), header=False))
                break
    return out


def _cow(img: GeneratedImage) -> List[Field]:
    d = img.data
    be: ByteOrder = "big"
    return [
        _field(d, "header.version", 4, 4, be, [("1", 1), ("3", 3), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.size", 1040, 8, be, _sizes(_u(d, 1040, 8, be))),
        _field(d, "header.sectorsize", 1048, 4, be, [("zero", 0), ("4096", 4096), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.backing_file[0]", 8, 1, be, [("a name", ord("x")), ("empty", 0)]),
        _field(d, "bitmap[0]", 1056, 1, be, [("all sectors here", 0xFF), ("none here", 0)]),
    ]


def _vdi(img: GeneratedImage) -> List[Field]:
    d = img.data
    le: ByteOrder = "little"
    bmap, data_off = _u(d, 0x154, 4, le), _u(d, 0x158, 4, le)
    bsize, nblocks = _u(d, 0x178, 4, le), _u(d, 0x180, 4, le)
    out = [
        _field(d, "header.version", 0x44, 4, le, [("2.0", 0x00020000), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.header_size", 0x48, 4, le, [("zero", 0), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.image_type", 0x4C, 4, le, [("undo", 3), ("diff", 4), ("unknown", 99)]),
        _pointer(d, "header.offset_bmap", 0x154, 4, le, align=512, others=(data_off,)),
        _pointer(d, "header.offset_data", 0x158, 4, le, align=512, others=(bmap,)),
        _field(d, "header.sector_size", 0x168, 4, le, [("zero", 0), ("4096", 4096)]),
        _field(d, "header.disk_size", 0x170, 8, le, _sizes(_u(d, 0x170, 8, le))),
        _field(d, "header.block_size", 0x178, 4, le, [("zero", 0), ("not a power of two", 3),
                                                     ("512 MiB", 1 << 29), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.block_extra", 0x17C, 4, le, [("512", 512), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.blocks_in_image", 0x180, 4, le,
               [("zero", 0), ("one more", nblocks + 1), ("over the limit", 0x1FFFFF81), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.blocks_allocated", 0x184, 4, le, _counts(_u(d, 0x184, 4, le), 4)),
    ]
    entries = [(i, _u(d, bmap + 4 * i, 4, le)) for i in range(min(nblocks, (len(d) - bmap) // 4))]
    used = [e for _, e in entries if e < 0xFFFFFFFE]
    past = max(nblocks, (len(d) - data_off) // max(bsize, 1)) + 4
    for i, e in [x for x in entries if x[1] < 0xFFFFFFFE][:MAX_ENTRIES]:
        vals = [(PAST_EOF, past), (HUGE, 0x7FFFFFFF), ("discarded", 0xFFFFFFFE), ("unallocated", 0xFFFFFFFF)]
        vals += [("another block's", o) for o in used if o != e][:1]
        out.append(_field(d, f"bmap[{i}]", bmap + 4 * i, 4, le, vals))
    if not used and entries:
        out.append(_field(d, "bmap[0]", bmap, 4, le, [(PAST_EOF, past), (HUGE, 0x7FFFFFFF)]))
    return out


def _vmdk(img: GeneratedImage) -> List[Field]:
    d = img.data
    le: ByteOrder = "little"
    cap, grain = _u(d, 12, 8, le), _u(d, 20, 8, le)
    ngte = _u(d, 44, 4, le)
    rgd, gd = _u(d, 48, 8, le), _u(d, 56, 8, le)
    tables = (rgd * 512, gd * 512)
    out = [
        _field(d, "header.version", 4, 4, le, [("zero", 0), ("4", 4), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.capacity", 12, 8, le, [(HUGE, 1 << 60), ("maximum", (1 << 64) - 1), ("zero", 0),
                                                 ("doubled", cap * 2)]),
        _field(d, "header.grain_size", 20, 8, le, [("zero", 0), ("not a power of two", 3), ("1 Mi sectors", 1 << 20),
                                                   (HUGE, (1 << 64) - 1)]),
        _pointer(d, "header.desc_offset", 28, 8, le, unit=512, align=512, header=False),
        _field(d, "header.desc_size", 36, 8, le, [(HUGE, 1 << 40), ("large", 1 << 21)]),
        _field(d, "header.num_gtes_per_gt", 44, 4, le, [("zero", 0), ("one", 1), ("large", 1 << 20),
                                                        (HUGE, 0xFFFFFFFF)]),
        _pointer(d, "header.rgd_offset", 48, 8, le, unit=512, align=512, others=tables),
        _pointer(d, "header.gd_offset", 56, 8, le, unit=512, align=512, others=tables),
        _pointer(d, "header.grain_offset", 64, 8, le, unit=512, align=512),
        _field(d, "header.compress_algorithm", 77, 2, le, [("unknown", 2), (HUGE, 0xFFFF)]),
    ]
    gts = -(-(-(-cap // max(grain, 1))) // max(ngte, 1))
    shown = 0
    for i in range(gts):
        at = gd * 512 + 4 * i
        if at + 4 > len(d):
            break
        gt = _u(d, at, 4, le)
        if i < 2:
            out.append(_pointer(d, f"gd[{i}]", at, 4, le, unit=512, align=512, others=tables))
        if not gt:
            continue
        for j in range(ngte):
            at2 = gt * 512 + 4 * j
            if at2 + 4 > len(d) or shown >= MAX_ENTRIES:
                break
            if _u(d, at2, 4, le) > 1:  # 0 unallocated, 1 zeroed grain
                f = _pointer(d, f"gt[{i}][{j}]", at2, 4, le, unit=512, align=512 * 2, others=tables + (gt * 512,),
                             header=False)
                out.append(Field(f.name, f.offsets, 4, le,
                                 f.values + _limit([("zeroed grain", 1), (ONTO_HEADER, 2)], 4, _u(d, at2, 4, le))))
                shown += 1
    return out


def _vpc(img: GeneratedImage) -> List[Field]:
    d = img.data
    be: ByteOrder = "big"
    n = len(d)
    dynamic = d[:8] == b"conectix"
    foot = (0, n - 512) if dynamic else (n - 512,)
    fsum = _vpc_sum(foot, 512, 64)
    f0 = foot[0]
    out = [
        _field(d, "footer.current_size", tuple(f + 48 for f in foot), 8, be, _sizes(_u(d, f0 + 48, 8, be)), fsum),
        _field(d, "footer.disk_type", tuple(f + 60 for f in foot), 4, be,
               [("none", 0), ("fixed", 2), ("dynamic", 3), ("differencing", 4), ("unknown", 7)], fsum),
        _field(d, "footer.cylinders", tuple(f + 56 for f in foot), 2, be, [("zero", 0), (HUGE, 0xFFFF)], fsum),
        _field(d, "footer.version", tuple(f + 12 for f in foot), 4, be, [("2.0", 0x00020000), ("zero", 0)], fsum),
        _field(d, "footer.creator_app", tuple(f + 28 for f in foot), 4, be,
               [("qem2 (the footer's size counts)", 0x71656D32), ("win (Hyper-V)", 0x77696E20)], fsum),
    ]
    if not dynamic:
        return out
    dyn = _u(d, 16, 8, be)
    out.append(Field("footer.data_offset", (16, n - 512 + 16), 8, be,
                     _pointer(d, "", 16, 8, be, align=512, others=(n - 512,)).values, fsum))
    hsum = _vpc_sum((dyn,), 1024, 36)
    bat, entries, bsize = _u(d, dyn + 16, 8, be), _u(d, dyn + 28, 4, be), _u(d, dyn + 32, 4, be)
    ptr = _pointer(d, "dyn.table_offset", dyn + 16, 8, be, align=512, others=(dyn, n - 512))
    out += [
        Field(ptr.name, ptr.offsets, 8, be, ptr.values + _limit([("unaligned", bat + 1)], 8, bat), hsum),
        _field(d, "dyn.max_table_entries", dyn + 28, 4, be, _counts(entries, 4), hsum),
        _field(d, "dyn.block_size", dyn + 32, 4, be, [("zero", 0), ("not a power of two", 3),
                                                      ("2 GiB", 1 << 31), (HUGE, 0xFFFFFFFF)], hsum),
        _field(d, "dyn.header_version", dyn + 24, 4, be, [("zero", 0), ("2.0", 0x00020000)], hsum),
    ]
    shown = 0
    for i in range(entries):
        at = bat + 4 * i
        if at + 4 > n or shown >= MAX_ENTRIES:
            break
        e = _u(d, at, 4, be)
        if e == 0xFFFFFFFF:
            continue
        shown += 1
        f = _pointer(d, f"bat[{i}]", at, 4, be, unit=512, align=512, others=(bat, dyn), reserved=(0xFFFFFFFF,))
        out.append(Field(f.name, f.offsets, 4, be, f.values + _limit([("overlapping the next block", e + 1)], 4, e)))
    if not shown and entries:
        out.append(_pointer(d, "bat[0]", bat, 4, be, unit=512, align=512, others=(dyn,), reserved=(0xFFFFFFFF,)))
    del bsize
    return out


_BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
_META_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_META_ITEMS = {
    uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le: "file_parameters",
    uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le: "virtual_disk_size",
    uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le: "logical_sector_size",
    uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556").bytes_le: "physical_sector_size",
}
_MB = 1 << 20


def _vhdx(img: GeneratedImage) -> List[Field]:
    d = img.data
    le: ByteOrder = "little"
    h = [64 * 1024, 128 * 1024]
    active = max(h, key=lambda o: _u(d, o + 8, 8, le) if d[o : o + 4] == b"head" else -1)
    hsum = _vhdx_sum(active, 4096)
    out = [
        _field(d, "header.version", active + 66, 2, le, [("zero", 0), ("2", 2)], hsum),
        _field(d, "header.log_version", active + 64, 2, le, [("1", 1)], hsum),
        _field(d, "header.log_length", active + 68, 4, le, [("zero", 0), ("not a MiB multiple", 4096),
                                                            (HUGE, 0xFFF00000)], hsum),
        Field("header.log_offset", (active + 72,), 8, le,
              _pointer(d, "", active + 72, 8, le, align=_MB).values, hsum),
    ]
    regions = (192 * 1024, 256 * 1024)

    def rsum(buf: bytearray) -> List[Tuple[int, int]]:
        return [s for r in regions for s in _vhdx_sum(r, 64 * 1024)(buf)]

    count = _u(d, regions[0] + 8, 4, le)
    out.append(_field(d, "region_table.entry_count", tuple(r + 8 for r in regions), 4, le,
                      [("zero", 0), ("over 2047", 2048), (HUGE, 0xFFFFFFFF)], rsum))
    bat = meta = 0
    bat_len = 0
    offsets = []
    for i in range(min(count, 8)):
        e = regions[0] + 16 + 32 * i
        guid, off, length = d[e : e + 16], _u(d, e + 16, 8, le), _u(d, e + 24, 4, le)
        offsets.append(off)
        what = "bat" if guid == _BAT_GUID else "metadata" if guid == _META_GUID else f"region{i}"
        if what == "bat":
            bat, bat_len = off, length
        elif what == "metadata":
            meta = off
        p = _pointer(d, "", e + 16, 8, le, align=_MB, others=tuple(offsets))
        out.append(Field(f"region_table.{what}.file_offset", tuple(r + 16 + 32 * i + 16 for r in regions), 8, le,
                         p.values, rsum))
        out.append(Field(f"region_table.{what}.length", tuple(r + 16 + 32 * i + 24 for r in regions), 4, le,
                         _limit([("zero", 0), ("past the end of the file", len(d)), (HUGE, 0xFFF00000)], 4, length),
                         rsum))
    block = 0
    if meta:
        n = _u(d, meta + 10, 2, le)
        out.append(_field(d, "metadata.entry_count", meta + 10, 2, le, [("zero", 0), ("over 2047", 2048),
                                                                        (HUGE, 0xFFFF)]))
        for i in range(min(n, 8)):
            e = meta + 32 + 32 * i
            name = _META_ITEMS.get(d[e : e + 16], f"item{i}")
            item = meta + _u(d, e + 16, 4, le)
            out.append(_field(d, f"metadata.{name}.offset", e + 16, 4, le,
                              [("onto the table", 0), ("misaligned", _u(d, e + 16, 4, le) + 1),
                               (PAST_EOF, len(d) + _MB), (HUGE, 0xFFFFFFFF)]))
            if name == "file_parameters":
                block = _u(d, item, 4, le)
                out.append(_field(d, "metadata.file_parameters.block_size", item, 4, le,
                                  [("zero", 0), ("not a power of two", 3 * _MB), ("512 KiB", 512 * 1024),
                                   ("512 MiB", 512 * _MB)]))
            elif name == "virtual_disk_size":
                out.append(_field(d, "metadata.virtual_disk_size", item, 8, le,
                                  [("zero", 0), ("over 64 TiB", (64 << 40) + 4096), ("not a sector multiple",
                                                                                    _u(d, item, 8, le) + 1),
                                   ("maximum", (1 << 64) - 1)]))
            elif name == "logical_sector_size":
                out.append(_field(d, "metadata.logical_sector_size", item, 4, le,
                                  [("zero", 0), ("1024", 1024), ("4096", 4096)]))
    if bat:
        shown = 0
        for i in range(min(bat_len, len(d) - bat) // 8):
            at = bat + 8 * i
            e = _u(d, at, 8, le)
            if e & 7 != 6 or shown >= MAX_ENTRIES:  # fully present blocks only
                continue
            shown += 1
            mb = e >> 20
            vals = [(PAST_EOF, (e & 0xFFFFF) | ((_up(len(d), _MB) // _MB + 4) << 20)),
                    (ONTO_HEADER, e & 0xFFFFF),
                    (ONTO_TABLE, (e & 0xFFFFF) | ((bat // _MB) << 20)),
                    ("state undefined", (e & ~7) | 1), ("state partially present", (e & ~7) | 7),
                    (FAR_PAST_EOF, (e & 0xFFFFF) | (((1 << 44) - 1) << 20))]
            if block:
                vals.append(("overlapping the next block", (e & 0xFFFFF) | ((mb + block // _MB // 2) << 20)))
            out.append(_field(d, f"bat[{i}]", at, 8, le, vals))
        if not shown:
            out.append(_field(d, "bat[0]", bat, 8, le, [("fully present past the end of the file",
                                                         6 | ((_up(len(d), _MB) // _MB + 4) << 20))]))
    return out


def _parallels(img: GeneratedImage) -> List[Field]:
    d = img.data
    le: ByteOrder = "little"
    tracks, nbat = _u(d, 28, 4, le), _u(d, 32, 4, le)
    cs = tracks * 512
    # BAT entries count clusters in "WithouFreSpacExt" images, sectors in the old magic's.
    unit = cs if d[:16] == b"WithouFreSpacExt" else 512
    out = [
        _field(d, "header.version", 16, 4, le, [("1", 1), (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.tracks", 28, 4, le, [("zero", 0), ("over the limit", (2**31 - 1) // 513 + 1),
                                               (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.bat_entries", 32, 4, le, [("zero", 0), ("one more", nbat + 1), ("over the limit", 1 << 30),
                                                    (HUGE, 0xFFFFFFFF)]),
        _field(d, "header.nb_sectors", 36, 8, le, [(HUGE, 1 << 62), ("maximum", (1 << 64) - 1), ("zero", 0),
                                                   ("past the BAT", (nbat + 1) * tracks)]),
        _field(d, "header.inuse", 44, 4, le, [("in use", 0x746F6E59), ("garbage", 0xDEADBEEF)]),
        _field(d, "header.data_off", 48, 4, le, [("one sector", 1), (PAST_EOF, len(d) // 512 + 8),
                                                 (HUGE, 0xFFFFFFFF)]),
        _pointer(d, "header.ext_off", 56, 8, le, unit=512, align=512, header=False),
    ]
    ents = [(i, _u(d, 64 + 4 * i, 4, le)) for i in range(min(nbat, (len(d) - 64) // 4))]
    used = [e for _, e in ents if e]
    for i, e in [x for x in ents if x[1]][:MAX_ENTRIES]:
        f = _pointer(d, f"bat[{i}]", 64 + 4 * i, 4, le, unit=unit, align=cs, header=False)
        # Sector units can point into the header; cluster units only at clusters.
        extra = [(ONTO_HEADER, 1)] if unit == 512 else []
        extra += [("another cluster's", o) for o in used if o != e][:1]
        vals = f.values + _limit(extra, 4, e)
        out.append(Field(f.name, f.offsets, 4, le, vals))
    if not used and ents:
        out.append(_field(d, "bat[0]", 64, 4, le, [(PAST_EOF, (_up(len(d), cs) + 4 * cs) // unit)]))
    return out


_LOCATORS: Dict[str, Callable[[GeneratedImage], List[Field]]] = {
    "qcow2": _qcow2,
    "qcow": _qcow,
    "qed": _qed,
    "cow": _cow,
    "vdi": _vdi,
    "vmdk": _vmdk,
    "vpc": _vpc,
    "vhdx": _vhdx,
    "parallels": _parallels,
    "raw": lambda img: [],  # no metadata: byte flips only
}


def candidate_fields(image: GeneratedImage) -> List[Field]:
    """The fields of ``image`` worth mutating, with their values (empty for raw)."""
    return [f for f in _LOCATORS[image.format](image) if f.values or f.width]


def mutate_field(image: GeneratedImage, field: Field, value: int, label: str) -> Optional[Mutation]:
    """``image`` with ``field`` set to the raw ``value`` (every copy), checksums
    recomputed; None when the value is the one already there."""
    top = (1 << (8 * field.width)) - 1
    value &= top
    old = _u(image.data, field.offsets[0], field.width, field.byteorder)
    if value == old:
        return None
    buf = bytearray(image.data)
    raw = value.to_bytes(field.width, field.byteorder)
    for o in field.offsets:
        buf[o : o + field.width] = raw
    fixups = tuple(field.checksum(buf)) if field.checksum else ()
    w = 2 * field.width
    where = ", ".join(f"{o:#x}" for o in field.offsets)
    desc = f"{image.format} {field.name} at {where}: {old:#0{w + 2}x} -> {value:#0{w + 2}x} ({label})"
    if fixups:
        desc += "; checksum recomputed"
    return Mutation(image.format, field.name, field.offsets, field.width, field.byteorder, old, value, label, desc,
                    bytes(buf), fixups)


def flip_mutation(image: GeneratedImage, offset: int, xor: int) -> Mutation:
    """``image`` with the byte at ``offset`` XORed with ``xor`` (1..255)."""
    buf = bytearray(image.data)
    old = buf[offset]
    buf[offset] ^= xor & 0xFF or 1
    desc = f"{image.format} byte[{offset:#x}]: {old:#04x} -> {buf[offset]:#04x} (byte flip)"
    return Mutation(image.format, f"byte[{offset}]", (offset,), 1, "big", old, buf[offset], "byte flip", desc,
                    bytes(buf))


def iter_mutations(image: GeneratedImage) -> Iterator[Mutation]:
    """Every structured mutation of ``image`` the locators offer, in a fixed
    order, made one at a time (each holds a copy of the image)."""
    for f in candidate_fields(image):
        for label, v in f.values:
            m = mutate_field(image, f, v, label)
            if m is not None:
                yield m


def all_mutations(image: GeneratedImage) -> List[Mutation]:
    """:func:`iter_mutations` as a list."""
    return list(iter_mutations(image))
