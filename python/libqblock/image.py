"""Open images: the :class:`Image` object, :func:`open` and :func:`create`."""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import _native
from .errors import InvalidParamError
from .flags import O_CACHE_WB, O_NO_BACKING, O_NO_FLUSH, O_NOCACHE, O_RDWR, O_SNAPSHOT, O_VALID_MASK
from .formats import Format
from .location import Location, PathLike
from .options import ImageOptions

if TYPE_CHECKING:
    from .fileio import ImageStream
from .snapshot import SnapshotInfo, apply_snapshot, create_snapshot, delete_snapshot, list_snapshots

Where = Union[Location, PathLike]


@dataclass(frozen=True)
class StaticInfo:
    """What an image says about itself (``qemu-img info``)."""

    location: Location
    format: Format
    virt_size: int
    backing_location: Optional[Location]
    backing_format: Optional[Format]
    encrypted: bool
    sector_size: int
    cluster_size: Optional[int]
    dirty: bool = False
    actual_size: Optional[int] = None
    backing_filename: Optional[str] = None
    format_specific: Dict[str, Any] = field(default_factory=dict)
    #: Internal snapshots, oldest first (qcow2), as ``qemu-img info`` lists them.
    snapshots: Tuple[SnapshotInfo, ...] = ()


@dataclass(frozen=True)
class BlockStatus:
    """Allocation of one run of the disk.

    ``allocated`` is the seed's meaning (allocated in the top image);
    ``present``, ``data``, ``zero`` and ``depth`` are ``qemu-img map``'s.
    """

    offset: int
    length: int
    allocated: bool
    present: bool
    data: bool
    zero: bool
    compressed: bool
    depth: int
    file: Optional[str]
    file_offset: Optional[int]

    def to_qemu_map(self) -> Dict[str, Any]:
        """This extent as one entry of ``qemu-img map --output=json``."""
        d: Dict[str, Any] = {
            "start": self.offset,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
            "compressed": self.compressed,
        }
        if self.file_offset is not None:
            d["offset"] = self.file_offset
        return d


class Image:
    """An open image. Thread-safe: share one object between threads freely.

    Use as a context manager, or call :meth:`close` (which flushes).
    """

    def __init__(self, native: "_native.Image", location: Location, flags: int) -> None:
        self._n = native
        self.location = location
        self.flags = flags
        # The hot calls go straight to the native methods: a Python frame in
        # between costs ~0.1 us, a tenth of a cached 4 KiB read. The methods
        # below document them (and are what help() and the stubs show).
        self.read = native.read  # type: ignore[method-assign]
        self.readinto = native.readinto  # type: ignore[method-assign]
        self.write = native.write  # type: ignore[method-assign]

    # C-file-like I/O -----------------------------------------------------
    def read(self, length: int, offset: int) -> bytes:
        """``length`` bytes from ``offset``; OutOfRangeError past the end."""
        return self._n.read(length, offset)

    def readinto(self, buffer: Any, offset: int) -> int:
        """Fill any writable C-contiguous buffer in place; returns its size in bytes."""
        return self._n.readinto(buffer, offset)

    def write(self, data: Any, offset: int) -> int:
        """Write any bytes-like object at ``offset``; returns the bytes written."""
        return self._n.write(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeroes (cheaply where the format allows)."""
        self._n.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._n.discard(offset, length)

    def flush(self) -> None:
        self._n.flush()

    def truncate(self, size: int) -> None:
        self._n.truncate(size)

    def close(self) -> None:
        """Flush, write the image's metadata back and release its locks.

        Closing a closed image does nothing; any other call on it raises
        InvalidParamError. An image dropped without ``close()`` is closed the
        same way when it is collected (errors then go unreported)."""
        self._n.close()

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing (``O_RDWR``)."""
        return bool(self.flags & O_RDWR)

    def stream(self) -> "ImageStream":
        """A seekable :class:`io.RawIOBase` over the virtual disk, for code
        that takes a file object (``tarfile``, ``hashlib.file_digest``,
        partition and filesystem parsers); writable when the image is. See
        :class:`libqblock.fileio.ImageStream`."""
        from .fileio import ImageStream

        return ImageStream(self)

    @property
    def closed(self) -> bool:
        return self._n.closed

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._n.closed:
            self._n.close()

    # Allocation --------------------------------------------------------
    def check_allocation(self, start: int, length: int) -> Tuple[bool, int]:
        """The seed's query: (allocated in the top image, bytes sharing that answer)."""
        return self._n.check_allocation(start, length)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(*self._n.block_status(offset, length))

    def map(self, start: int = 0, length: Optional[int] = None) -> Iterator[BlockStatus]:
        """Merged extents like ``qemu-img map``, for the whole disk by default."""
        return (BlockStatus(*t) for t in self._n.map(start, length))

    def render_map(self, cells: int = 4096) -> str:
        """The disk as an SVG allocation map: ``cells`` cells, each coloured
        by what holds most of its bytes (data and the backing layer it comes
        from, zero, unallocated), and a legend. See :mod:`libqblock.render`."""
        from .render import render_map

        return render_map(self, cells)

    # Information -------------------------------------------------------
    @property
    def virt_size(self) -> int:
        return self._n.virtual_size

    @property
    def format(self) -> Format:
        return Format.from_str(self._n.format)

    def info(self) -> StaticInfo:
        d = self._n.info()
        bfmt = d["backing_format"]
        return StaticInfo(
            location=self.location,
            format=Format.from_str(d["format"]),
            virt_size=d["virtual_size"],
            backing_location=Location.file(d["full_backing_filename"]) if d["full_backing_filename"] else None,
            backing_format=Format.from_str(bfmt) if bfmt else None,
            encrypted=d["encrypted"],
            sector_size=512,
            cluster_size=d["cluster_size"],
            dirty=d["dirty"],
            actual_size=d["actual_size"],
            backing_filename=d["backing_filename"],
            format_specific=d["format_specific"],
            snapshots=tuple(list_snapshots(self)),
        )

    # Internal snapshots (see libqblock.snapshot) ------------------------
    def snapshots(self) -> List[SnapshotInfo]:
        """The internal snapshots, oldest first; empty for formats without them."""
        return list_snapshots(self)

    def snapshot_create(self, name: str) -> SnapshotInfo:
        """Record the current content as a new snapshot called ``name``; returns it."""
        return create_snapshot(self, name)

    def snapshot_apply(self, id_or_name: str) -> None:
        """Make the image read as this snapshot again (id tried first, then name)."""
        apply_snapshot(self, id_or_name)

    def snapshot_delete(self, id_or_name: str) -> None:
        """Delete this snapshot (id tried first, then name)."""
        delete_snapshot(self, id_or_name)

    def __repr__(self) -> str:
        if self.closed:
            return f"<libqblock.Image {self.location} closed>"
        mode = "read-write" if self.flags & O_RDWR else "read-only"
        return f"<libqblock.Image {self.location} {self._n.format} {self._n.virtual_size} bytes {mode}>"


def _check_flags(flags: int) -> None:
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise InvalidParamError(f"flags must be an int of O_* bits, not {flags!r}")
    if flags & ~int(O_VALID_MASK):
        raise InvalidParamError(f"unknown flag bits {flags & ~int(O_VALID_MASK):#x}")


def _fmt_name(fmt: Optional[Union[Format, str]]) -> Optional[str]:
    if fmt is None:
        return None
    f = fmt if isinstance(fmt, Format) else Format.from_str(fmt)
    if f is Format.NONE:
        raise InvalidParamError(f"unknown format {fmt!r}")
    return str(f)


def open(  # noqa: A001 - the seed's name
    location: Where,
    fmt: Optional[Union[Format, str]] = None,
    flags: int = O_RDWR | O_CACHE_WB,
    *,
    force_share: bool = False,
    references: str = "any",
    allowed_dirs: Sequence[PathLike] = (),
    allow_protocols: bool = False,
) -> Image:
    """Open an image; ``fmt`` None probes its format (see the README on raw probing).

    ``flags`` are ``O_*`` bits: read-only without ``O_RDWR``; an unknown bit
    raises InvalidParamError. With ``O_SNAPSHOT | O_RDWR`` the image is
    opened read-only and writes go to a temporary qcow2 overlay in the
    temporary folder, discarded at close (QEMU's ``-snapshot``); queries
    (``info``, ``map``, ``check_allocation``) answer for the image as if the
    session's writes were in it. ``O_NOCACHE`` opens every file of the
    chain with O_DIRECT (any offset and length still work: unaligned I/O
    goes through aligned bounce buffers); a file system without O_DIRECT
    (tmpfs before Linux 6.6, some FUSE file systems) raises
    UnsupportedError. A location whose protocol is not served yet (anything
    but ``file``) raises UnsupportedError.

    Every file of the image is locked as QEMU locks it (OFD byte locks):
    while ``qemu-io``, ``qemu-img`` or a VM has the image open for writing,
    opening it raises ImageLockedError, and while it is open here for
    writing, QEMU refuses to write it (and, as for QEMU, a read-only open
    keeps writers out). ``force_share`` (``qemu-img -U``), read-only only,
    takes the image whatever others do: what it reads may then be changing.
    ``close()`` releases the locks; so does dropping the image.

    ``references`` decides which files named by the images of the chain
    (backing files, qcow2 data files, vmdk extents, parallels bundle
    images, VHD/VHDX parents) may be opened: ``"any"`` (the default, as
    QEMU), ``"confined"`` (each must resolve, after symlinks, inside the
    top image's folder or one of ``allowed_dirs``; a refused one raises
    InvalidParamError naming it) or ``"none"`` (an image naming any file
    raises InvalidParamError). Names with a protocol prefix (``nbd://``,
    ``json:{...}``; ``file:`` is dropped) raise UnsupportedError unless
    ``allow_protocols`` (and no protocol is served yet). Use
    :func:`libqblock.inspect` to see what an image names without opening it.
    """
    if references not in ("any", "confined", "none"):
        raise InvalidParamError(f"references must be 'any', 'confined' or 'none', not {references!r}")
    if allowed_dirs and references != "confined":
        raise InvalidParamError("allowed_dirs needs references='confined'")
    if force_share and flags & O_RDWR:
        raise InvalidParamError("force_share needs a read-only open (flags without O_RDWR), as QEMU's -U")
    _check_flags(flags)
    loc = Location.of(location)
    native = _native.open(
        loc.protocol,
        loc.target,
        _fmt_name(fmt),
        read_only=not (flags & O_RDWR),
        no_backing=bool(flags & O_NO_BACKING),
        write_through=not (flags & O_CACHE_WB),
        no_flush=bool(flags & O_NO_FLUSH),
        snapshot=bool(flags & O_SNAPSHOT),
        direct=bool(flags & O_NOCACHE),
        force_share=force_share,
        references=references,
        allowed_dirs=[os.fsdecode(d) for d in allowed_dirs],
        allow_protocols=allow_protocols,
    )
    return Image(native, loc, flags)


def create(location: Where, options: ImageOptions, flags: int = 0) -> None:
    """Create an image (without opening it). The options' class names the format.

    Raises UnsupportedError for a format the engine cannot create yet (see
    ``supported_formats(write=True)``) or a location that is not a ``file``.
    """
    _check_flags(flags)
    if not isinstance(options, ImageOptions) or options.format is Format.NONE:
        raise InvalidParamError("options must be one of the format option classes, e.g. Qcow2Options")
    loc = Location.of(location)
    _native.create(loc.protocol, loc.target, options.format.value, options.to_native())


def probe(location: Where) -> Format:
    """The format libqblock would pick for an image when none is given."""
    loc = Location.of(location)
    return Format.from_str(_native.probe(loc.protocol, loc.target))


def supported_formats(write: bool = False) -> "frozenset[Format]":
    """Formats libqblock can open (with ``write=True``: can create) today.

    Every other :class:`Format` raises :class:`UnsupportedError` when opened
    or created.
    """
    return frozenset(Format.from_str(name) for name, can_open, can_create in _native.formats()
                     if (can_create if write else can_open))
