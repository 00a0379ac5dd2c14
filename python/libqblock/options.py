"""Creation options: one frozen dataclass per format, validated on construction.

Each class carries the fields of the libqblock seed's ``QBlockFmtOption*``
struct for its format (``virt_size``, the backing location and format, ...)
plus what ``qemu-img create -f FMT -o help`` offers for it today. Limits are
the ones QEMU enforces; where QEMU silently rounds a value (a size to 512
bytes, a VHDX block size to 1 MiB) we refuse it instead, so an image is always
created exactly as asked. ``to_native()`` gives the options under QEMU's
names (``size``, ``backing_file``, ``backing_fmt``, ``cluster_size``, ...),
which is what the engine takes. One exception: the seed's ``encrypt`` flag
(qcow, qcow2) is passed as ``encrypt`` (QEMU spells it ``encrypt.format=aes``),
and the engine refuses it with UnsupportedError until encryption lands.

The class names the format (``Qcow2Options.format is Format.QCOW2``).
:func:`libqblock.create` raises :class:`~libqblock.errors.UnsupportedError`
for the classes of formats the engine cannot create yet (rbd, sheepdog, and
the encrypt flag); ``supported_formats(write=True)`` lists the others.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, Union

from .errors import InvalidParamError
from .formats import Format
from .location import Location, PathLike

Backing = Optional[Union[Location, PathLike]]
NativeOptions = Dict[str, Union[int, str, bool]]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

#: Sizes are 63-bit everywhere (QEMU: "Must be between 0 and 9223372036854775807").
MAX_SIZE = (1 << 63) - 1
#: The sector every format but raw and rbd counts in; QEMU rounds sizes up to it.
SECTOR = 512


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidParamError(f"{name} must be a non-negative integer, not {v!r}")
    if v > MAX_SIZE:
        raise InvalidParamError(f"{name} {v} does not fit in 63 bits")


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise InvalidParamError(f"{name} must be True or False, not {v!r}")


def _check_opt_str(name: str, v: Any) -> None:
    if v is not None and (not isinstance(v, str) or not v or "\0" in v):
        raise InvalidParamError(f"{name} must be a non-empty string without NUL, not {v!r}")


def _choice(name: str, v: Any, allowed: Tuple[Any, ...]) -> None:
    if v not in allowed:
        raise InvalidParamError(f"{name} must be one of {', '.join(map(str, allowed))}; got {v!r}")


def _pow2_between(name: str, v: int, lo: int, hi: int) -> None:
    _check_int(name, v)
    if not _is_pow2(v) or not lo <= v <= hi:
        raise InvalidParamError(f"{name} must be a power of two between {_human(lo)} and {_human(hi)}, not {v}")


def _human(n: int) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _check_max_size(fmt: str, size: int, limit: int, why: str = "") -> None:
    if size > limit:
        extra = f" ({why})" if why else ""
        raise InvalidParamError(f"virt_size {size} is too large for {fmt}: at most {limit} bytes{extra}")


def _backing_name(b: Backing) -> Optional[str]:
    if b is None:
        return None
    loc = Location.of(b)
    return loc.target if loc.protocol == "file" else str(loc)


@dataclass(frozen=True)
class ImageOptions:
    """Fields every format shares: the virtual size in bytes.

    Subclasses set ``format`` and add their own fields; construction validates
    them all and raises :class:`~libqblock.errors.InvalidParamError` with a
    message naming the field and the limit.
    """

    format: ClassVar[Format] = Format.NONE
    #: Sizes must be a multiple of this (QEMU would round them up instead).
    size_alignment: ClassVar[int] = 1
    virt_size: int = 0

    def __post_init__(self) -> None:
        _check_int("virt_size", self.virt_size)
        if self.virt_size % self.size_alignment:
            raise InvalidParamError(
                f"virt_size must be a multiple of {self.size_alignment} for {self.format}, not {self.virt_size}"
            )
        self._validate()

    def _validate(self) -> None:
        """Format-specific checks; raise InvalidParamError."""

    def _validate_backing(self, with_format: bool = True) -> None:
        """Check ``backing`` (a Location or path) and, if present, ``backing_fmt``.

        A ``backing_fmt`` given as a string is turned into a :class:`Format`.
        """
        backing = getattr(self, "backing", None)
        if backing is not None:
            try:
                Location.of(backing)
            except InvalidParamError as e:
                raise InvalidParamError(f"backing must be a Location or a path ({e.message})") from None
        if not with_format:
            return
        bfmt = getattr(self, "backing_fmt", None)
        if bfmt is None:
            return
        if isinstance(bfmt, str) and not isinstance(bfmt, Format):
            f = Format.from_str(bfmt)
            if f is Format.NONE:
                raise InvalidParamError(f"unknown backing_fmt {bfmt!r}")
            object.__setattr__(self, "backing_fmt", f)
        elif not isinstance(bfmt, Format) or bfmt is Format.NONE:
            raise InvalidParamError(f"backing_fmt must be a Format, not {bfmt!r}")
        if backing is None:
            raise InvalidParamError("backing_fmt given without a backing file")

    def _native_backing(self, o: NativeOptions) -> NativeOptions:
        b = _backing_name(getattr(self, "backing", None))
        if b is not None:
            o["backing_file"] = b
        bfmt = getattr(self, "backing_fmt", None)
        if bfmt is not None:
            o["backing_fmt"] = bfmt.value
        return o

    def to_native(self) -> NativeOptions:
        """The options under QEMU's names, for the engine."""
        return {"size": self.virt_size}


@dataclass(frozen=True)
class CowOptions(ImageOptions):
    """cow: the User Mode Linux COW format (seed ``QBlockFmtOptionCow``).

    A sector bitmap in front of the data; a backing file without a recorded
    format. QEMU dropped the format in 2.2; no QEMU today creates it.
    """

    format: ClassVar[Format] = Format.COW
    size_alignment: ClassVar[int] = SECTOR
    backing: Backing = None

    def _validate(self) -> None:
        self._validate_backing(with_format=False)

    def to_native(self) -> NativeOptions:
        return self._native_backing({"size": self.virt_size})


#: QED's limits (QEMU block/qed.h): clusters of 4 KiB to 64 MiB, tables of 1
#: to 16 clusters, all powers of two.
QED_MIN_CLUSTER, QED_MAX_CLUSTER = 4 * KiB, 64 * MiB
QED_MIN_TABLE, QED_MAX_TABLE = 1, 16


def qed_max_image_size(cluster_size: int, table_size: int) -> int:
    """The largest virtual size QEMU accepts for a QED geometry.

    Two levels of tables of ``table_size`` clusters, 8-byte entries. QEMU
    computes this in 64-bit arithmetic, where the largest geometries wrap
    around (64 MiB clusters give 0, so QEMU refuses every size); we keep the
    wrapped value so that QEMU can open every image we create.
    """
    entries = table_size * cluster_size // 8
    return (entries * entries * cluster_size) % (1 << 64)


@dataclass(frozen=True)
class QedOptions(ImageOptions):
    """qed: QEMU Enhanced Disk (seed ``QBlockFmtOptionQed``).

    ``cluster_size`` in bytes (power of two, 4 KiB..64 MiB); ``table_size`` in
    clusters (power of two, 1..16). The largest virtual size follows from
    both (64 TiB with the defaults).
    """

    format: ClassVar[Format] = Format.QED
    size_alignment: ClassVar[int] = SECTOR
    backing: Backing = None
    backing_fmt: Optional[Format] = None
    cluster_size: int = 64 * KiB
    table_size: int = 4

    def _validate(self) -> None:
        self._validate_backing()
        _pow2_between("cluster_size", self.cluster_size, QED_MIN_CLUSTER, QED_MAX_CLUSTER)
        _check_int("table_size", self.table_size)
        if not _is_pow2(self.table_size) or not QED_MIN_TABLE <= self.table_size <= QED_MAX_TABLE:
            raise InvalidParamError(f"table_size must be a power of two between 1 and 16 clusters, not {self.table_size}")
        limit = qed_max_image_size(self.cluster_size, self.table_size)
        _check_max_size("qed", self.virt_size, limit, f"with cluster_size {self.cluster_size} and table_size {self.table_size}")

    def to_native(self) -> NativeOptions:
        return self._native_backing(
            {"size": self.virt_size, "cluster_size": self.cluster_size, "table_size": self.table_size}
        )


#: qcow (version 1) has 4 KiB clusters and 512-entry L2 tables, so one L1
#: entry maps 2 MiB. QEMU reads the whole L1 table in one request of at most
#: BDRV_REQUEST_MAX_BYTES (INT_MAX rounded down to 512), so an image with more
#: than that many bytes of L1 cannot be opened: 268435392 entries.
QCOW_MAX_SIZE = ((((1 << 31) - 1) // 512 * 512) // 8) << 21


@dataclass(frozen=True)
class QcowOptions(ImageOptions):
    """qcow: QEMU's first copy-on-write format (seed ``QBlockFmtOptionQcow``).

    ``encrypt`` asks for the legacy AES encryption (QEMU's
    ``encrypt.format=aes``). A ``virt_size`` of 0 takes the backing file's
    size; without a backing file it is an error, as in QEMU.
    """

    format: ClassVar[Format] = Format.QCOW
    size_alignment: ClassVar[int] = SECTOR
    backing: Backing = None
    backing_fmt: Optional[Format] = None
    encrypt: bool = False

    def _validate(self) -> None:
        self._validate_backing()
        _check_bool("encrypt", self.encrypt)
        if self.virt_size == 0 and self.backing is None:
            raise InvalidParamError("virt_size may be 0 only with a backing file (it then takes its size)")
        _check_max_size("qcow", self.virt_size, QCOW_MAX_SIZE, "QEMU reads at most 2 GiB of L1 table")

    def to_native(self) -> NativeOptions:
        return self._native_backing({"size": self.virt_size, "encrypt": self.encrypt})


#: QEMU's cap on the qcow2 L1 table (QCOW_MAX_L1_SIZE, 32 MiB of 8-byte entries).
QCOW2_MAX_L1_ENTRIES = 32 * MiB // 8


def qcow2_max_image_size(cluster_size: int, extended_l2: bool = False) -> int:
    """The largest virtual size a qcow2 geometry can map (QEMU's limit).

    Every L1 entry maps one L2 table, a cluster of 8-byte entries (16 bytes
    with extended L2), each mapping one cluster.
    """
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    return QCOW2_MAX_L1_ENTRIES * l2_entries * cluster_size


@dataclass(frozen=True)
class Qcow2Options(ImageOptions):
    """qcow2 (QEMU's native format), version 2 (compat "0.10") or 3 ("1.1").

    The seed's fields (``backing``, ``backing_fmt``, ``encrypt``,
    ``cluster_size``, ``compat`` "0.10"/"1.1" (QEMU's "v2"/"v3" are taken
    and stored as those), ``preallocation`` off/metadata/falloc/full)
    plus QEMU's ``lazy_refcounts``, ``refcount_bits``, ``extended_l2``,
    ``compression_type``, ``data_file`` and ``data_file_raw``. A
    ``virt_size`` of 0 takes the backing file's size; without a backing file
    it is refused (QEMU would create an empty disk). ``encrypt`` asks for
    QEMU's legacy AES encryption, which libqblock does not write yet.
    """

    format: ClassVar[Format] = Format.QCOW2
    size_alignment: ClassVar[int] = SECTOR
    backing: Backing = None
    backing_fmt: Optional[Format] = None
    encrypt: bool = False
    cluster_size: int = 65536
    compat: str = "1.1"
    preallocation: str = "off"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"
    data_file: Optional[Union[Location, PathLike]] = None
    data_file_raw: bool = False

    def _validate(self) -> None:
        self._validate_backing()
        for name in ("encrypt", "lazy_refcounts", "extended_l2", "data_file_raw"):
            _check_bool(name, getattr(self, name))
        _check_int("cluster_size", self.cluster_size)
        if not _is_pow2(self.cluster_size) or not 512 <= self.cluster_size <= 2 * 1024 * 1024:
            raise InvalidParamError(
                f"cluster_size must be a power of two between 512 and 2 MiB, not {self.cluster_size}"
            )
        # QEMU also spells the versions v2 and v3; keep the seed's names.
        if self.compat in ("v2", "v3"):
            object.__setattr__(self, "compat", {"v2": "0.10", "v3": "1.1"}[self.compat])
        _choice("compat", self.compat, ("0.10", "1.1"))
        _choice("preallocation", self.preallocation, ("off", "metadata", "falloc", "full"))
        _check_int("refcount_bits", self.refcount_bits)
        if not _is_pow2(self.refcount_bits) or self.refcount_bits > 64:
            raise InvalidParamError(f"refcount_bits must be a power of two up to 64, not {self.refcount_bits}")
        _choice("compression_type", self.compression_type, ("zlib", "zstd"))
        if self.compat == "0.10":
            for name, bad in (
                ("lazy_refcounts", self.lazy_refcounts),
                ("extended_l2", self.extended_l2),
                ("refcount_bits other than 16", self.refcount_bits != 16),
                ("compression_type zstd", self.compression_type != "zlib"),
                ("data_file", self.data_file is not None),
            ):
                if bad:
                    raise InvalidParamError(f"{name} needs compat 1.1 (qcow2 version 3)")
        if self.extended_l2 and self.cluster_size < 16384:
            raise InvalidParamError("extended_l2 needs a cluster_size of at least 16 KiB")
        if self.backing is None and self.virt_size == 0:
            raise InvalidParamError("virt_size may be 0 only with a backing file (it then takes its size)")
        if self.data_file_raw and self.data_file is None:
            raise InvalidParamError("data_file_raw needs a data_file")
        if self.data_file is not None:
            try:
                Location.of(self.data_file)
            except InvalidParamError as e:
                raise InvalidParamError(f"data_file must be a Location or a path ({e.message})") from None
        if self.backing is not None and self.data_file_raw:
            raise InvalidParamError("a backing file and data_file_raw cannot be used together")
        if self.backing is not None and self.preallocation != "off" and not self.extended_l2:
            raise InvalidParamError("a backing file and preallocation can be used together only with extended_l2")
        _check_max_size(
            "qcow2",
            self.virt_size,
            qcow2_max_image_size(self.cluster_size, self.extended_l2),
            f"with cluster_size {self.cluster_size}; try a larger cluster size",
        )

    def to_native(self) -> NativeOptions:
        o: NativeOptions = {
            "size": self.virt_size,
            "cluster_size": self.cluster_size,
            "compat": self.compat,
            "preallocation": self.preallocation,
            "lazy_refcounts": self.lazy_refcounts,
            "refcount_bits": self.refcount_bits,
            "extended_l2": self.extended_l2,
            "compression_type": self.compression_type,
            "encrypt": self.encrypt,
        }
        self._native_backing(o)
        d = _backing_name(self.data_file)
        if d is not None:
            o["data_file"] = d
            o["data_file_raw"] = self.data_file_raw
        return o


@dataclass(frozen=True)
class RawOptions(ImageOptions):
    """raw: the guest disk byte for byte (seed ``QBlockFmtOptionRaw``).

    Any byte size. ``preallocation``: ``off`` (sparse), ``falloc`` (reserve
    the blocks with fallocate) or ``full`` (write zeroes).
    """

    format: ClassVar[Format] = Format.RAW
    preallocation: str = "off"

    def _validate(self) -> None:
        _choice("preallocation", self.preallocation, ("off", "falloc", "full"))

    def to_native(self) -> NativeOptions:
        return {"size": self.virt_size, "preallocation": self.preallocation}


#: librbd takes object orders 12 to 25 (4 KiB to 32 MiB); QEMU itself
#: refuses objects under 4 KiB and sizes that are not powers of two.
RBD_MIN_OBJECT, RBD_MAX_OBJECT = 4 * KiB, 32 * MiB


@dataclass(frozen=True)
class RbdOptions(ImageOptions):
    """rbd: a Ceph RADOS block device image (seed ``QBlockFmtOptionRbd``).

    ``cluster_size`` is the RBD object size (None: the cluster's default,
    4 MiB). ``pool``, ``image``, ``namespace``, ``conf`` and ``user`` are
    QEMU's rbd creation parameters; when ``pool`` and ``image`` are given,
    :meth:`location` builds the matching :class:`Location`.
    """

    format: ClassVar[Format] = Format.RBD
    cluster_size: Optional[int] = None
    pool: Optional[str] = None
    image: Optional[str] = None
    namespace: Optional[str] = None
    conf: Optional[str] = None
    user: Optional[str] = None

    def _validate(self) -> None:
        if self.cluster_size is not None:
            _pow2_between("cluster_size", self.cluster_size, RBD_MIN_OBJECT, RBD_MAX_OBJECT)
        for name in ("pool", "image", "namespace", "conf", "user"):
            _check_opt_str(name, getattr(self, name))
        if (self.pool is None) != (self.image is None):
            raise InvalidParamError("pool and image must be given together")

    def location(self) -> Location:
        """The RBD location named by ``pool``/``image`` (and ``conf``)."""
        if self.pool is None or self.image is None:
            raise InvalidParamError("these RbdOptions name no pool and image")
        return Location.rbd(self.pool, self.image, conf=self.conf or "")

    def to_native(self) -> NativeOptions:
        o: NativeOptions = {"size": self.virt_size}
        if self.cluster_size is not None:
            o["cluster_size"] = self.cluster_size
        for name in ("pool", "image", "namespace", "conf", "user"):
            v = getattr(self, name)
            if v is not None:
                o[name] = v
        return o


#: Sheepdog: at most 2^20 data objects per image (MAX_DATA_OBJS), objects of
#: 2^20 to 2^31 bytes; at most 8 full copies, erasure coding x:y with x in
#: {2, 4, 8, 16} data strips and 1 <= y < 16 parity strips.
SHEEPDOG_MAX_OBJECTS = 1 << 20
SHEEPDOG_MIN_OBJECT, SHEEPDOG_MAX_OBJECT = 1 << 20, 1 << 31
SHEEPDOG_DEFAULT_OBJECT = 4 * MiB
SHEEPDOG_MAX_COPIES, SHEEPDOG_EC_MAX_STRIP = 8, 16


@dataclass(frozen=True)
class SheepdogOptions(ImageOptions):
    """sheepdog: a Sheepdog cluster VDI (seed ``QBlockFmtOptionSheepdog``).

    ``backing`` must be a Sheepdog snapshot; ``preallocation`` ``off`` or
    ``full``; ``redundancy`` ``"N"`` full copies or ``"x:y"`` erasure coding;
    ``object_size`` None for the cluster's default (4 MiB). The largest
    virtual size is 2^20 objects.
    """

    format: ClassVar[Format] = Format.SHEEPDOG
    size_alignment: ClassVar[int] = SECTOR
    backing: Backing = None
    preallocation: str = "off"
    redundancy: Optional[str] = None
    object_size: Optional[int] = None

    def _validate(self) -> None:
        self._validate_backing(with_format=False)
        _choice("preallocation", self.preallocation, ("off", "full"))
        if self.object_size is not None:
            _pow2_between("object_size", self.object_size, SHEEPDOG_MIN_OBJECT, SHEEPDOG_MAX_OBJECT)
        if self.redundancy is not None:
            self._check_redundancy(self.redundancy)
        obj = self.object_size or SHEEPDOG_DEFAULT_OBJECT
        _check_max_size("sheepdog", self.virt_size, obj * SHEEPDOG_MAX_OBJECTS, f"2^20 objects of {_human(obj)}")

    @staticmethod
    def _check_redundancy(r: Any) -> None:
        bad = InvalidParamError(
            f"redundancy must be 'N' (1..{SHEEPDOG_MAX_COPIES} copies) or 'x:y' "
            f"(x in 2, 4, 8, 16 data strips; 1..{SHEEPDOG_EC_MAX_STRIP - 1} parity strips), not {r!r}"
        )
        if not isinstance(r, str):
            raise bad
        parts = r.split(":")
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            raise bad
        n = int(parts[0])
        if len(parts) == 1:
            if not 1 <= n <= SHEEPDOG_MAX_COPIES:
                raise bad
        elif n not in (2, 4, 8, 16) or not 1 <= int(parts[1]) < SHEEPDOG_EC_MAX_STRIP:
            raise bad

    def to_native(self) -> NativeOptions:
        o = self._native_backing({"size": self.virt_size, "preallocation": self.preallocation})
        if self.redundancy is not None:
            o["redundancy"] = self.redundancy
        if self.object_size is not None:
            o["object_size"] = self.object_size
        return o


#: VDI: blocks of 1 MiB (the only size QEMU creates); the block map holds at
#: most 0x1fffff80 entries (QEMU's VDI_BLOCKS_IN_IMAGE_MAX, keeping the map
#: under 2 GiB).
VDI_BLOCK_SIZE = 1 * MiB
VDI_MAX_SIZE = 0x1FFFFF80 * VDI_BLOCK_SIZE


@dataclass(frozen=True)
class VdiOptions(ImageOptions):
    """vdi: VirtualBox disk image (seed ``QBlockFmtOptionVdi``).

    ``static`` preallocates every block (the seed's pre_mode); ``cluster_size``
    is the VDI block size, which QEMU fixes at 1 MiB.
    """

    format: ClassVar[Format] = Format.VDI
    size_alignment: ClassVar[int] = SECTOR
    static: bool = False
    cluster_size: int = VDI_BLOCK_SIZE

    def _validate(self) -> None:
        _check_bool("static", self.static)
        _check_int("cluster_size", self.cluster_size)
        if self.cluster_size != VDI_BLOCK_SIZE:
            raise InvalidParamError(f"VDI cluster_size (block size) must be 1 MiB, not {self.cluster_size}")
        _check_max_size("vdi", self.virt_size, VDI_MAX_SIZE, "the block map holds 0x1fffff80 blocks of 1 MiB")

    def to_native(self) -> NativeOptions:
        return {"size": self.virt_size, "static": self.static, "cluster_size": self.cluster_size}


#: Parallels keeps the cluster size in sectors in a 32-bit field, and QEMU
#: refuses clusters whose sector count times 513 overflows an int.
PARALLELS_MAX_CLUSTER = ((2**31 - 1) // 513) * SECTOR


@dataclass(frozen=True)
class ParallelsOptions(ImageOptions):
    """parallels: Parallels / Virtuozzo expanding image (QEMU's ``parallels``).

    ``cluster_size`` (1 MiB by default) must be a multiple of 512 up to about
    1 GiB; the virtual size may be at most 2^32 clusters.
    """

    format: ClassVar[Format] = Format.PARALLELS
    size_alignment: ClassVar[int] = SECTOR
    cluster_size: int = MiB

    def _validate(self) -> None:
        _check_int("cluster_size", self.cluster_size)
        if self.cluster_size == 0 or self.cluster_size % SECTOR:
            raise InvalidParamError(f"parallels cluster_size must be a positive multiple of 512, not {self.cluster_size}")
        if self.cluster_size > PARALLELS_MAX_CLUSTER:
            raise InvalidParamError(
                f"parallels cluster_size {self.cluster_size} is too large (at most {PARALLELS_MAX_CLUSTER})"
            )
        _check_max_size("parallels", self.virt_size, (1 << 32) * self.cluster_size - 1, "2^32 clusters")

    def to_native(self) -> NativeOptions:
        return {"size": self.virt_size, "cluster_size": self.cluster_size}


VMDK_SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
VMDK_ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")


@dataclass(frozen=True)
class VmdkOptions(ImageOptions):
    """vmdk: VMware disk (seed ``QBlockFmtOptionVmdk``).

    ``compat6`` writes VMDK version 6; ``subformat`` is one of the seed's five
    (``monolithicSparse`` by default, ``monolithicFlat``,
    ``twoGbMaxExtentSparse``, ``twoGbMaxExtentFlat``, ``streamOptimized``).
    QEMU adds ``adapter_type``, ``hwversion`` (not with ``compat6``),
    ``toolsversion`` and ``zeroed_grain`` (sparse subformats only). A backing
    file must be a vmdk image, and flat subformats cannot have one.
    """

    format: ClassVar[Format] = Format.VMDK
    size_alignment: ClassVar[int] = SECTOR
    backing: Backing = None
    backing_fmt: Optional[Format] = None
    compat6: bool = False
    subformat: str = "monolithicSparse"
    adapter_type: str = "ide"
    hwversion: Optional[str] = None
    toolsversion: Optional[str] = None
    zeroed_grain: bool = False

    def _validate(self) -> None:
        self._validate_backing()
        _check_bool("compat6", self.compat6)
        _check_bool("zeroed_grain", self.zeroed_grain)
        _choice("subformat", self.subformat, VMDK_SUBFORMATS)
        _choice("adapter_type", self.adapter_type, VMDK_ADAPTER_TYPES)
        _check_opt_str("hwversion", self.hwversion)
        _check_opt_str("toolsversion", self.toolsversion)
        if self.backing_fmt is not None and self.backing_fmt is not Format.VMDK:
            raise InvalidParamError(f"a vmdk backing file must be a vmdk image, not {self.backing_fmt}")
        flat = self.subformat.endswith("Flat")
        if flat and self.backing is not None:
            raise InvalidParamError(f"a {self.subformat} vmdk cannot have a backing file")
        if flat and self.zeroed_grain:
            raise InvalidParamError(f"a {self.subformat} vmdk cannot use zeroed_grain")
        if self.compat6 and self.hwversion is not None:
            raise InvalidParamError("compat6 cannot be combined with hwversion")

    def to_native(self) -> NativeOptions:
        o = self._native_backing(
            {
                "size": self.virt_size,
                "compat6": self.compat6,
                "subformat": self.subformat,
                "adapter_type": self.adapter_type,
                "zeroed_grain": self.zeroed_grain,
            }
        )
        if self.hwversion is not None:
            o["hwversion"] = self.hwversion
        if self.toolsversion is not None:
            o["toolsversion"] = self.toolsversion
        return o


#: VHD: at most 0xff000000 sectors (2040 GiB), QEMU's VHD_MAX_SECTORS.
VPC_MAX_SIZE = 0xFF000000 * SECTOR


@dataclass(frozen=True)
class VpcOptions(ImageOptions):
    """vpc: Virtual PC / VHD (seed ``QBlockFmtOptionVpc``).

    ``subformat`` ``dynamic`` (default) or ``fixed``. Without ``force_size``
    the size is rounded to the nearest CHS geometry as Virtual PC does;
    with it, the size is kept exactly. At most 2040 GiB.
    """

    format: ClassVar[Format] = Format.VPC
    size_alignment: ClassVar[int] = SECTOR
    subformat: str = "dynamic"
    force_size: bool = False

    def _validate(self) -> None:
        _choice("subformat", self.subformat, ("dynamic", "fixed"))
        _check_bool("force_size", self.force_size)
        _check_max_size("vpc", self.virt_size, VPC_MAX_SIZE, "2040 GiB")

    def to_native(self) -> NativeOptions:
        return {"size": self.virt_size, "subformat": self.subformat, "force_size": self.force_size}


#: VHDX limits (QEMU block/vhdx.h): 64 TiB of virtual disk; payload blocks of
#: 1 MiB to 256 MiB, powers of two; a log of whole MiB, below 4 GiB.
VHDX_MAX_SIZE = 64 * TiB
VHDX_MIN_BLOCK, VHDX_MAX_BLOCK = 1 * MiB, 256 * MiB
VHDX_LOG_UNIT, VHDX_MAX_LOG = 1 * MiB, 4 * GiB


@dataclass(frozen=True)
class VhdxOptions(ImageOptions):
    """vhdx: Hyper-V disk (not in the seed; QEMU's options).

    ``block_size`` 0 lets the size pick it, else a power of two from 1 MiB to
    256 MiB; ``log_size`` a multiple of 1 MiB below 4 GiB; ``subformat``
    ``dynamic`` or ``fixed``; ``block_state_zero`` marks unwritten blocks
    ZERO (QEMU's default). QEMU would round other block and log sizes; we
    refuse them. At most 64 TiB.
    """

    format: ClassVar[Format] = Format.VHDX
    size_alignment: ClassVar[int] = SECTOR
    block_size: int = 0
    log_size: int = 1 * MiB
    subformat: str = "dynamic"
    block_state_zero: bool = True

    def _validate(self) -> None:
        if self.block_size != 0:
            _pow2_between("block_size", self.block_size, VHDX_MIN_BLOCK, VHDX_MAX_BLOCK)
        _check_int("log_size", self.log_size)
        if self.log_size == 0 or self.log_size % VHDX_LOG_UNIT or self.log_size >= VHDX_MAX_LOG:
            raise InvalidParamError(f"log_size must be a multiple of 1 MiB below 4 GiB, not {self.log_size}")
        _choice("subformat", self.subformat, ("dynamic", "fixed"))
        _check_bool("block_state_zero", self.block_state_zero)
        _check_max_size("vhdx", self.virt_size, VHDX_MAX_SIZE, "64 TiB")

    def to_native(self) -> NativeOptions:
        return {
            "size": self.virt_size,
            "block_size": self.block_size,
            "log_size": self.log_size,
            "subformat": self.subformat,
            "block_state_zero": self.block_state_zero,
        }


#: One options class per format that can be created, by format.
OPTION_CLASSES: Dict[Format, Type[ImageOptions]] = {
    cls.format: cls
    for cls in (
        CowOptions,
        QedOptions,
        QcowOptions,
        Qcow2Options,
        RawOptions,
        RbdOptions,
        SheepdogOptions,
        VdiOptions,
        VmdkOptions,
        VpcOptions,
        VhdxOptions,
        ParallelsOptions,
    )
}


def options_class(fmt: Union[Format, str]) -> Type[ImageOptions]:
    """The options class for a format (or its name); InvalidParamError if it has none."""
    f = fmt if isinstance(fmt, Format) else Format.from_str(fmt)
    cls = OPTION_CLASSES.get(f)
    if cls is None:
        raise InvalidParamError(f"no options class for format {fmt!r}: libqblock cannot create such images")
    return cls


def option_fields(cls: type) -> List[str]:
    """Names of a dataclass's fields (for docs and the CLI)."""
    return [f.name for f in fields(cls)]
