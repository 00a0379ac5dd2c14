"""The seed's C call shapes, for people porting C callers of libqblock.

Every ``qb_*`` function here takes the broker first, as the seed's did, and
reports failure by returning a negative ``QB_ERR_*`` code instead of raising;
the error is recorded in the broker it was handed (``err_ret``, ``err_no``,
``err_msg``), readable with :func:`qb_error_get_human_str` and
:func:`qb_error_get_errno`. (An error raised by the library underneath, a
QBlockError, is also recorded in the calling thread's :meth:`Broker.current`,
as every such error is; refusals made here, such as closing a state that is
not open, go only to the broker handed in.) A broker that is not a live
:class:`~libqblock.errors.Broker` cannot record anything: calls handed one
return ``QB_ERR_INVALID_PARAM`` and leave it untouched.

C's out-parameters become return values: ``qb_broker_new()`` returns the
broker, ``qb_check_allocation`` returns ``(ret, status, length)``.

Lifetimes are checked, because the reviewers of the seed asked for
out-of-order calls to be errors, not undefined behaviour: opening a state
that is open, closing one that is not, using or deleting a deleted state,
deleting a state that is still open and deleting a broker that still has
live states all return ``QB_ERR_INVALID_PARAM``.

Lengths and offsets are Python ints: 64-bit everywhere, as the reviewers also
asked.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar, cast

from . import image as _image
from .errors import (
    QB_ERR_BLOCK_OUT_OF_RANGE,
    QB_ERR_CORRUPT_IMAGE,
    QB_ERR_IMAGE_LOCKED,
    QB_ERR_INTERNAL_ERR,
    QB_ERR_INVALID_PARAM,
    QB_ERR_MEM_ERR,
    QB_ERR_UNSUPPORTED,
    Broker,
    QBlockError,
)
from .flags import (
    O_CACHE_WB,
    O_NO_BACKING,
    O_NO_FLUSH,
    O_NOCACHE,
    O_RDWR,
    O_SNAPSHOT,
    O_VALID_MASK,
)
from .formats import Format, fmttype2str, str2fmttype
from .location import Location
from .options import OPTION_CLASSES, ImageOptions

__all__ = [
    "LIBQBLOCK_O_CACHE_WB",
    "LIBQBLOCK_O_NOCACHE",
    "LIBQBLOCK_O_NO_BACKING",
    "LIBQBLOCK_O_NO_FLUSH",
    "LIBQBLOCK_O_RDWR",
    "LIBQBLOCK_O_SNAPSHOT",
    "LIBQBLOCK_O_VALID_MASK",
    "QB_ERR_BLOCK_OUT_OF_RANGE",
    "QB_ERR_CORRUPT_IMAGE",
    "QB_ERR_IMAGE_LOCKED",
    "QB_ERR_INTERNAL_ERR",
    "QB_ERR_INVALID_PARAM",
    "QB_ERR_MEM_ERR",
    "QB_ERR_UNSUPPORTED",
    "QB_FMT_COW",
    "QB_FMT_NONE",
    "QB_FMT_QCOW",
    "QB_FMT_QCOW2",
    "QB_FMT_QED",
    "QB_FMT_RAW",
    "QB_FMT_RBD",
    "QB_FMT_SHEEPDOG",
    "QB_FMT_VDI",
    "QB_FMT_VHDX",
    "QB_FMT_VMDK",
    "QB_FMT_VPC",
    "QB_PROT_FILE",
    "QB_PROT_HTTP",
    "QB_PROT_NBD",
    "QB_PROT_NONE",
    "QB_PROT_RBD",
    "QBlockFmtOptionsUN",
    "QBlockFormatInfo",
    "QBlockLocationInfo",
    "QBlockState",
    "QBlockStaticInfo",
    "qb_broker_delete",
    "qb_broker_new",
    "qb_check_allocation",
    "qb_close",
    "qb_create",
    "qb_error_get_errno",
    "qb_error_get_human_str",
    "qb_flush",
    "qb_fmt_info_delete",
    "qb_fmt_info_new",
    "qb_fmttype2str",
    "qb_info_image_static_delete",
    "qb_info_image_static_get",
    "qb_loc_info_delete",
    "qb_loc_info_new",
    "qb_open",
    "qb_read",
    "qb_state_delete",
    "qb_state_new",
    "qb_str2fmttype",
    "qb_write",
]

# The seed's LIBQBLOCK_O_* names for the same bits as libqblock.O_*.
LIBQBLOCK_O_RDWR = O_RDWR
LIBQBLOCK_O_SNAPSHOT = O_SNAPSHOT
LIBQBLOCK_O_NOCACHE = O_NOCACHE
LIBQBLOCK_O_CACHE_WB = O_CACHE_WB
LIBQBLOCK_O_NO_BACKING = O_NO_BACKING
LIBQBLOCK_O_NO_FLUSH = O_NO_FLUSH
LIBQBLOCK_O_VALID_MASK = O_VALID_MASK

# Protocol types (the seed's QBlockProtType had NONE and FILE; we add the rest
# of libqblock's protocols, which open and create refuse until they land).
QB_PROT_NONE = 0
QB_PROT_FILE = 1
QB_PROT_NBD = 2
QB_PROT_RBD = 3
QB_PROT_HTTP = 4
_PROT_NAMES = {QB_PROT_FILE: "file", QB_PROT_NBD: "nbd", QB_PROT_RBD: "rbd", QB_PROT_HTTP: "http"}

# The seed's QB_FMT_* names: the Format members themselves.
QB_FMT_NONE = Format.NONE
QB_FMT_COW = Format.COW
QB_FMT_QED = Format.QED
QB_FMT_QCOW = Format.QCOW
QB_FMT_QCOW2 = Format.QCOW2
QB_FMT_RAW = Format.RAW
QB_FMT_RBD = Format.RBD
QB_FMT_SHEEPDOG = Format.SHEEPDOG
QB_FMT_VDI = Format.VDI
QB_FMT_VMDK = Format.VMDK
QB_FMT_VPC = Format.VPC
QB_FMT_VHDX = Format.VHDX


class _Fail(Exception):
    """A capi-level refusal: a code and message to record and return."""

    def __init__(self, code: int, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.errno = code, message, errno


def _invalid(message: str) -> _Fail:
    return _Fail(QB_ERR_INVALID_PARAM, message)


# --- locations ---------------------------------------------------------------------


@dataclass
class QBlockLocationInfo:
    """Where an image is, as the seed's ``QBlockLocationInfo``: a protocol
    type and that protocol's parameters.

    ``QB_PROT_FILE`` uses ``filename``; ``QB_PROT_NBD`` ``host``, ``port`` and
    ``export``; ``QB_PROT_RBD`` ``pool``, ``image``, ``snapshot`` and
    ``conf``; ``QB_PROT_HTTP`` ``url``. ``QB_PROT_NONE`` means "no location"
    (as for an image without a backing file). Mutable, like the C struct.
    """

    prot_type: int = QB_PROT_NONE
    filename: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 10809
    export: str = ""
    pool: str = ""
    image: str = ""
    snapshot: str = ""
    conf: str = ""
    url: str = ""

    def to_location(self) -> Location:
        """The :class:`Location` this describes; InvalidParamError if incomplete."""
        from .errors import InvalidParamError

        if self.prot_type == QB_PROT_FILE:
            if self.filename is None:
                raise InvalidParamError("a QB_PROT_FILE location needs a filename")
            return Location.file(self.filename)
        if self.prot_type == QB_PROT_NBD:
            return Location.nbd(self.host, self.port, self.export)
        if self.prot_type == QB_PROT_RBD:
            return Location.rbd(self.pool, self.image, self.snapshot, self.conf)
        if self.prot_type == QB_PROT_HTTP:
            return Location.http(self.url)
        raise InvalidParamError(f"location has no protocol type (prot_type {self.prot_type!r})")

    @classmethod
    def from_location(cls, loc: Location) -> "QBlockLocationInfo":
        """The seed-shaped description of a :class:`Location`."""
        p = loc.parameters
        if loc.protocol == "file":
            return cls(QB_PROT_FILE, filename=loc.target)
        if loc.protocol == "nbd":
            return cls(QB_PROT_NBD, host=p["host"], port=int(p["port"]), export=p["export"])
        if loc.protocol == "rbd":
            return cls(QB_PROT_RBD, pool=p["pool"], image=p["image"], snapshot=p["snapshot"], conf=p["conf"])
        return cls(QB_PROT_HTTP, url=loc.target)


def _location_of(loc: Any) -> Location:
    if isinstance(loc, QBlockLocationInfo):
        return loc.to_location()
    if isinstance(loc, (Location, str)) or hasattr(loc, "__fspath__"):
        return Location.of(loc)
    raise _invalid(f"loc must be a QBlockLocationInfo (or a Location or path), not {type(loc).__name__}")


# --- formats -----------------------------------------------------------------------


class _FmtOptions(SimpleNamespace):
    """One member of the format option union: the fields of that format's
    options class, mutable, with its defaults. ``backing`` is spelt
    ``backing_loc`` and holds a :class:`QBlockLocationInfo`, as in the seed
    (``QB_PROT_NONE``: no backing file)."""


def _slot_name(fmt: Format) -> str:
    return "o_" + fmt.value


def _new_slot(cls: type) -> _FmtOptions:
    values: Dict[str, Any] = {}
    for f in fields(cls):
        if f.name == "backing":
            values["backing_loc"] = QBlockLocationInfo()
        else:
            values[f.name] = f.default
    return _FmtOptions(**values)


class QBlockFmtOptionsUN:
    """The seed's option union: ``o_cow``, ``o_qed``, ``o_qcow``, ``o_qcow2``,
    ``o_raw``, ``o_rbd``, ``o_sheepdog``, ``o_vdi``, ``o_vmdk``, ``o_vpc`` and
    ``o_vhdx``, one per format (unlike a C union each keeps its own values;
    only the member named by ``fmt_type`` is used)."""

    def __init__(self) -> None:
        for fmt, cls in OPTION_CLASSES.items():
            setattr(self, _slot_name(fmt), _new_slot(cls))

    def __getattr__(self, name: str) -> Any:  # for type checkers: members are dynamic
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"<QBlockFmtOptionsUN {', '.join(sorted(vars(self)))}>"


@dataclass
class QBlockFormatInfo:
    """The seed's ``QBlockFormatInfo``: a format type and its options.

    ``fmt_type`` is a :class:`Format` (``QB_FMT_NONE`` = probe on open);
    ``o_fmt.o_<format>`` holds the options used by :func:`qb_create`, field
    names as in the matching options class (``virt_size``, ``cluster_size``,
    ...), with the backing file as ``backing_loc``.
    """

    fmt_type: Format = Format.NONE
    o_fmt: QBlockFmtOptionsUN = field(default_factory=QBlockFmtOptionsUN)

    def _format(self) -> Format:
        f = self.fmt_type
        return str2fmttype(f) if isinstance(f, str) and not isinstance(f, Format) else f

    def options(self) -> _FmtOptions:
        """The option union member ``fmt_type`` names."""
        f = self._format()
        slot: Optional[_FmtOptions] = getattr(self.o_fmt, _slot_name(f), None) if f in OPTION_CLASSES else None
        if slot is None:
            raise _invalid(f"format {self.fmt_type} has no creation options")
        return slot

    def to_options(self) -> ImageOptions:
        """The validated options object (InvalidParamError with the reason)."""
        cls = OPTION_CLASSES.get(self._format())
        if cls is None:
            raise _invalid(f"cannot create an image of format {self.fmt_type}")
        kw = dict(vars(self.options()))
        bl = kw.pop("backing_loc", None)
        if bl is not None and "backing" in {f.name for f in fields(cls)}:
            kw["backing"] = None if bl.prot_type == QB_PROT_NONE else _location_of(bl)
        return cls(**kw)


def _fmt_arg(fmt: Any) -> Optional[Format]:
    """None to probe, else the Format asked for."""
    if fmt is None:
        return None
    f = fmt.fmt_type if isinstance(fmt, QBlockFormatInfo) else fmt
    if isinstance(f, str) and not isinstance(f, Format):
        f = str2fmttype(f)
        if f is Format.NONE:
            raise _invalid(f"unknown format {fmt!r}")
    if not isinstance(f, Format):
        raise _invalid(f"fmt must be a QBlockFormatInfo or a Format, not {type(fmt).__name__}")
    return None if f is Format.NONE else f


# --- brokers and states ----------------------------------------------------------------


class QBlockState:
    """The seed's ``QBlockState``: an image slot, empty until :func:`qb_open`."""

    __slots__ = ("_image", "_deleted", "__weakref__")

    def __init__(self) -> None:
        self._image: Optional[_image.Image] = None
        self._deleted = False

    @property
    def is_open(self) -> bool:
        return self._image is not None

    @property
    def deleted(self) -> bool:
        return self._deleted

    @property
    def image(self) -> Optional["_image.Image"]:
        """The open :class:`~libqblock.Image` (None when closed), to mix APIs."""
        return self._image

    def __repr__(self) -> str:
        if self._image is not None:
            return f"<libqblock.capi.QBlockState open {self._image!r}>"
        return f"<libqblock.capi.QBlockState {'deleted' if self._deleted else 'closed'}>"


# The live states each broker made: deleting a broker that still has some is
# an out-of-order delete. Weak keys so an abandoned broker does not leak.
_STATES: "weakref.WeakKeyDictionary[Broker, weakref.WeakSet[QBlockState]]" = weakref.WeakKeyDictionary()

T = TypeVar("T")


def _live_broker(broker: Any) -> bool:
    return isinstance(broker, Broker) and not broker.deleted


def _call(broker: Any, fail: T, fn: Callable[[], T]) -> T:
    """Run ``fn``; on failure record into ``broker`` and return the code
    (``fail`` shapes it, e.g. a tuple with the code in front)."""
    if not _live_broker(broker):
        return _shape(fail, QB_ERR_INVALID_PARAM)
    try:
        return fn()
    except _Fail as e:
        broker._set(e.code, e.errno, e.message)
        return _shape(fail, e.code)
    except QBlockError as e:
        broker._record(e)
        return _shape(fail, e.code)
    except (TypeError, ValueError, OverflowError, BufferError) as e:
        # Wrong argument types reaching the engine (a negative offset, a
        # read-only buffer for qb_read, ...): the seed's invalid parameter.
        broker._set(QB_ERR_INVALID_PARAM, 0, f"invalid parameter: {e}")
        return _shape(fail, QB_ERR_INVALID_PARAM)
    except MemoryError as e:
        broker._set(QB_ERR_MEM_ERR, 0, f"out of memory: {e}")
        return _shape(fail, QB_ERR_MEM_ERR)


def _shape(fail: T, code: int) -> T:
    """``fail`` with the code in the place of its 0: ``0`` or ``(0, ...)``."""
    if isinstance(fail, tuple):
        return cast(T, (code,) + fail[1:])
    return cast(T, code)


def _state(qbs: Any, want_open: Optional[bool] = None) -> QBlockState:
    if not isinstance(qbs, QBlockState):
        raise _invalid(f"qbs must be a QBlockState from qb_state_new, not {type(qbs).__name__}")
    if qbs._deleted:
        raise _invalid("the state was deleted")
    if want_open is True and qbs._image is None:
        raise _invalid("the state is not open")
    if want_open is False and qbs._image is not None:
        raise _invalid("the state is open; close it with qb_close first")
    return qbs


def _open_image(qbs: Any) -> "_image.Image":
    img = _state(qbs, want_open=True)._image
    assert img is not None
    return img


def qb_broker_new() -> Broker:
    """A new, private broker (the seed returned it through ``QBroker **``)."""
    b = Broker()
    _STATES[b] = weakref.WeakSet()
    return b


def qb_broker_delete(broker: Broker) -> int:
    """Delete a broker: 0, or ``QB_ERR_INVALID_PARAM`` if it was already
    deleted, is not a broker, or still has states that were not deleted
    (recorded in it, which stays usable then)."""

    def go() -> int:
        live = [s for s in _STATES.get(broker, ()) if not s._deleted]
        if live:
            raise _invalid(f"the broker still has {len(live)} state(s); delete them first")
        broker.deleted = True
        _STATES.pop(broker, None)
        return 0

    return _call(broker, 0, go)


def qb_state_new(broker: Broker) -> Optional[QBlockState]:
    """A new, closed image state; None if ``broker`` is not a live broker."""
    if not _live_broker(broker):
        return None
    s = QBlockState()
    _STATES.setdefault(broker, weakref.WeakSet()).add(s)
    return s


def qb_state_delete(broker: Broker, qbs: QBlockState) -> int:
    """Delete a state: 0, or ``QB_ERR_INVALID_PARAM`` if it is still open
    (close it first) or was already deleted."""

    def go() -> int:
        _state(qbs, want_open=False)
        qbs._deleted = True
        return 0

    return _call(broker, 0, go)


def qb_loc_info_new(broker: Broker) -> Optional[QBlockLocationInfo]:
    """A blank location (``QB_PROT_NONE``) to fill in; None for a dead broker."""
    return QBlockLocationInfo() if _live_broker(broker) else None


def qb_loc_info_delete(broker: Broker, info: QBlockLocationInfo) -> int:
    """Nothing to free in Python; 0, or ``QB_ERR_INVALID_PARAM`` for a non-location."""
    return _call(broker, 0, lambda: 0 if isinstance(info, QBlockLocationInfo) else _raise(_invalid("not a location info")))


def qb_fmt_info_new(broker: Broker) -> Optional[QBlockFormatInfo]:
    """A blank format info (``QB_FMT_NONE``, every option at its default);
    None for a dead broker."""
    return QBlockFormatInfo() if _live_broker(broker) else None


def qb_fmt_info_delete(broker: Broker, info: QBlockFormatInfo) -> int:
    """Nothing to free in Python; 0, or ``QB_ERR_INVALID_PARAM`` for a non-format info."""
    return _call(broker, 0, lambda: 0 if isinstance(info, QBlockFormatInfo) else _raise(_invalid("not a format info")))


def _raise(e: Exception) -> Any:
    raise e


# --- the image calls -------------------------------------------------------------------


def qb_create(broker: Broker, qbs: QBlockState, loc: QBlockLocationInfo, fmt: QBlockFormatInfo, flag: int = 0) -> int:
    """Create an image at ``loc`` from ``fmt.fmt_type`` and its option member
    (it is not opened, and ``qbs`` is left as it is). Returns 0 or a negative
    code: ``QB_ERR_INVALID_PARAM`` for bad options, ``QB_ERR_UNSUPPORTED`` for
    a format or protocol the engine does not create yet, ..."""

    def go() -> int:
        _state(qbs)
        if not isinstance(fmt, QBlockFormatInfo):
            raise _invalid("fmt must be a QBlockFormatInfo")
        _image.create(_location_of(loc), fmt.to_options(), flag)
        return 0

    return _call(broker, 0, go)


def qb_open(broker: Broker, qbs: QBlockState, loc: QBlockLocationInfo, fmt: Optional[QBlockFormatInfo], flag: int) -> int:
    """Open the image at ``loc`` into ``qbs``; ``fmt`` None or of type
    ``QB_FMT_NONE`` probes the format. ``flag`` is ``LIBQBLOCK_O_*`` bits
    (read-only without ``LIBQBLOCK_O_RDWR``). Returns 0, or a negative code
    (``QB_ERR_INVALID_PARAM`` also when ``qbs`` is already open)."""

    def go() -> int:
        st = _state(qbs, want_open=False)
        f = _fmt_arg(fmt)
        st._image = _image.open(_location_of(loc), f, flag)
        return 0

    return _call(broker, 0, go)


def qb_close(broker: Broker, qbs: QBlockState) -> int:
    """Flush and close the image of ``qbs`` (the state stays, closed, for
    reuse or :func:`qb_state_delete`). Returns 0, or a negative code:
    ``QB_ERR_INVALID_PARAM`` if it is not open; if the final flush fails the
    code says why and the state is closed all the same."""

    def go() -> int:
        img = _open_image(qbs)
        qbs._image = None
        img.close()
        return 0

    return _call(broker, 0, go)


def _byte_view(buf: Any, writable: bool) -> memoryview:
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise _invalid("buf must be C-contiguous")
    if writable and mv.readonly:
        raise _invalid("buf must be writable")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _length(length: Any, mv: memoryview) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise _invalid(f"len must be a non-negative integer, not {length!r}")
    if length > mv.nbytes:
        raise _invalid(f"len {length} is larger than buf ({mv.nbytes} bytes)")
    return length


def qb_read(broker: Broker, qbs: QBlockState, buf: Any, len: int, offset: int) -> int:  # noqa: A002 - the seed's name
    """Read ``len`` bytes at ``offset`` into the start of ``buf`` (any
    writable C-contiguous buffer: bytearray, memoryview, numpy array, mmap),
    without an intermediate copy. Returns the bytes read (``len``), or a
    negative code: ``QB_ERR_BLOCK_OUT_OF_RANGE`` past the end of the image,
    ``QB_ERR_INVALID_PARAM`` for a read-only or too small buffer, ..."""

    def go() -> int:
        img = _open_image(qbs)
        with _byte_view(buf, writable=True) as mv:
            n = _length(len, mv)
            with mv[:n] as part:
                img.readinto(part, offset)
        return n

    return _call(broker, 0, go)


def qb_write(broker: Broker, qbs: QBlockState, buf: Any, len: int, offset: int) -> int:  # noqa: A002
    """Write the first ``len`` bytes of ``buf`` (any bytes-like object) at
    ``offset``. Returns the bytes written (``len``) or a negative code
    (``QB_ERR_INVALID_PARAM`` also for an image opened read-only)."""

    def go() -> int:
        img = _open_image(qbs)
        with _byte_view(buf, writable=False) as mv:
            n = _length(len, mv)
            with mv[:n] as part:
                img.write(part, offset)
        return n

    return _call(broker, 0, go)


def qb_flush(broker: Broker, qbs: QBlockState) -> int:
    """Flush the image to the disk: 0 or a negative code."""

    def go() -> int:
        _open_image(qbs).flush()
        return 0

    return _call(broker, 0, go)


def qb_check_allocation(broker: Broker, qbs: QBlockState, start: int, length: int) -> Tuple[int, int, int]:
    """The seed's allocation query: ``(ret, status, plength)``. ``ret`` is 0
    or a negative code; ``status`` 1 if the range starting at ``start`` is
    allocated in the top image, 0 if not; ``plength`` how many bytes from
    ``start`` share that status (at most ``length``). On failure ``(code, 0, 0)``."""

    def go() -> Tuple[int, int, int]:
        allocated, n = _open_image(qbs).check_allocation(start, length)
        return (0, 1 if allocated else 0, n)

    return _call(broker, (0, 0, 0), go)


@dataclass
class QBlockStaticInfo:
    """The seed's ``QBlockStaticInfo``: what an image says about itself.

    ``loc`` and ``fmt`` describe the image as :func:`qb_open` would take them
    (``fmt.options()`` holds ``virt_size``, ``backing_loc``, ``backing_fmt``,
    ``encrypt`` and ``cluster_size`` where the format has them);
    ``backing_loc`` is None without a backing file; ``info`` is the full
    :class:`~libqblock.StaticInfo`.
    """

    loc: QBlockLocationInfo
    fmt: QBlockFormatInfo
    virt_size: int
    backing_loc: Optional[QBlockLocationInfo]
    encrypt: bool
    sector_size: int
    info: "_image.StaticInfo"


def _static_info(i: "_image.StaticInfo") -> QBlockStaticInfo:
    fmt = QBlockFormatInfo(i.format)
    backing = QBlockLocationInfo.from_location(i.backing_location) if i.backing_location else None
    slot = getattr(fmt.o_fmt, _slot_name(i.format), None) if i.format in OPTION_CLASSES else None
    if slot is not None:
        slot.virt_size = i.virt_size
        if hasattr(slot, "backing_loc") and backing is not None:
            slot.backing_loc = backing
        if hasattr(slot, "backing_fmt"):
            slot.backing_fmt = i.backing_format
        if hasattr(slot, "encrypt"):
            slot.encrypt = i.encrypted
        if hasattr(slot, "cluster_size") and i.cluster_size is not None:
            slot.cluster_size = i.cluster_size
    return QBlockStaticInfo(
        loc=QBlockLocationInfo.from_location(i.location),
        fmt=fmt,
        virt_size=i.virt_size,
        backing_loc=backing,
        encrypt=i.encrypted,
        sector_size=i.sector_size,
        info=i,
    )


def qb_info_image_static_get(broker: Broker, qbs: QBlockState) -> Tuple[int, Optional[QBlockStaticInfo]]:
    """``(0, QBlockStaticInfo)`` for an open state, or ``(code, None)``."""

    def go() -> Tuple[int, Optional[QBlockStaticInfo]]:
        return (0, _static_info(_open_image(qbs).info()))

    fail: Tuple[int, Optional[QBlockStaticInfo]] = (0, None)
    return _call(broker, fail, go)


def qb_info_image_static_delete(broker: Broker, info: QBlockStaticInfo) -> int:
    """Nothing to free in Python; 0, or ``QB_ERR_INVALID_PARAM`` for a non-info."""
    return _call(broker, 0, lambda: 0 if isinstance(info, QBlockStaticInfo) else _raise(_invalid("not a static info")))


# --- errors and names ------------------------------------------------------------------


def qb_error_get_human_str(broker: Broker) -> str:
    """The broker's last error as text (with the errno when an OS call
    failed); ``"no error"`` if none was recorded."""
    if not isinstance(broker, Broker):
        return "invalid broker"
    return broker.last_error


def qb_error_get_errno(broker: Broker) -> int:
    """The errno of the broker's last error: 0 unless an OS call failed."""
    return broker.err_no if isinstance(broker, Broker) else 0


def qb_fmttype2str(fmt_type: Format) -> str:
    """A format's name (``"qcow2"``); ``"none"`` for ``QB_FMT_NONE``."""
    return fmttype2str(fmt_type)


def qb_str2fmttype(fmt_str: str) -> Format:
    """The format called ``fmt_str`` (case-insensitive); ``QB_FMT_NONE`` if unknown."""
    return str2fmttype(fmt_str)


