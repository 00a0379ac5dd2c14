"""libqblock: create, open, read, write and inspect virtual-machine disk images.

The engine is Rust (``libqblock._native``); this package holds the public,
Pythonic API. See the README for the formats and their state.
"""

from .errors import (
    Broker,
    CorruptImageError,
    ImageLockedError,
    InternalError,
    InvalidParamError,
    NoMemoryError,
    OutOfRangeError,
    QBlockError,
    UnsupportedError,
)
from .flags import O_CACHE_WB, O_NO_BACKING, O_NO_FLUSH, O_NOCACHE, O_RDWR, O_SNAPSHOT, O_VALID_MASK, OpenFlag
from .formats import Format, fmttype2str, str2fmttype
from .image import BlockStatus, Image, StaticInfo, create, open, probe
from .location import Location
from .options import ImageOptions, Qcow2Options, RawOptions

__all__ = [
    "BlockStatus",
    "Broker",
    "CorruptImageError",
    "Format",
    "Image",
    "ImageLockedError",
    "ImageOptions",
    "InternalError",
    "InvalidParamError",
    "Location",
    "NoMemoryError",
    "O_CACHE_WB",
    "O_NOCACHE",
    "O_NO_BACKING",
    "O_NO_FLUSH",
    "O_RDWR",
    "O_SNAPSHOT",
    "O_VALID_MASK",
    "OpenFlag",
    "OutOfRangeError",
    "QBlockError",
    "Qcow2Options",
    "RawOptions",
    "StaticInfo",
    "UnsupportedError",
    "create",
    "fmttype2str",
    "open",
    "probe",
    "str2fmttype",
]

__version__ = "0.1.0"
