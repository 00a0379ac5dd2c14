"""libqblock: create, open, read, write and inspect virtual-machine disk images.

The engine is Rust (``libqblock._native``); this package holds the public,
Pythonic API. See the README for the formats and their state.
``libqblock.capi`` offers the seed's ``qb_*`` call shapes for ported C callers.

The library logs through :mod:`logging`, under the ``libqblock`` logger
(``libqblock.qcow2``, ``libqblock.check``, ``libqblock.lock``...): repairs
it makes, dirty images it reads as they are, slow paths it takes. It prints
nothing itself: configure ``logging`` (``logging.basicConfig()``) to see them.
"""

import logging as _logging

from .errors import (
    QB_ERR_BLOCK_OUT_OF_RANGE,
    QB_ERR_CORRUPT_IMAGE,
    QB_ERR_IMAGE_LOCKED,
    QB_ERR_INTERNAL_ERR,
    QB_ERR_INVALID_PARAM,
    QB_ERR_MEM_ERR,
    QB_ERR_UNSUPPORTED,
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
from .image import BlockStatus, Image, StaticInfo, create, open, probe, supported_formats
from .location import Location
from .options import (
    CowOptions,
    ImageOptions,
    Qcow2Options,
    QcowOptions,
    QedOptions,
    RawOptions,
    RbdOptions,
    SheepdogOptions,
    VdiOptions,
    ParallelsOptions,
    VhdxOptions,
    VmdkOptions,
    VpcOptions,
    options_class,
)
from .snapshot import SnapshotInfo
from .tools import CompareResult, checksum, compare, convert, resize
from .backing import commit, rebase
from .amend import amend
from .sizing import MeasureResult, measure
from .check import CheckResult, check
from .safety import Reference, SafetyReport, inspect
from .streams import convert_from_stream, convert_to_stream
from . import capi  # noqa: E402  (imports the names above)

__all__ = [
    "BlockStatus",
    "Broker",
    "CheckResult",
    "CompareResult",
    "CorruptImageError",
    "CowOptions",
    "Format",
    "Image",
    "ImageLockedError",
    "ImageOptions",
    "MeasureResult",
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
    "Reference",
    "SafetyReport",
    "QB_ERR_BLOCK_OUT_OF_RANGE",
    "QB_ERR_CORRUPT_IMAGE",
    "QB_ERR_IMAGE_LOCKED",
    "QB_ERR_INTERNAL_ERR",
    "QB_ERR_INVALID_PARAM",
    "QB_ERR_MEM_ERR",
    "QB_ERR_UNSUPPORTED",
    "QBlockError",
    "Qcow2Options",
    "QcowOptions",
    "QedOptions",
    "RawOptions",
    "RbdOptions",
    "SheepdogOptions",
    "SnapshotInfo",
    "StaticInfo",
    "UnsupportedError",
    "VdiOptions",
    "ParallelsOptions",
    "VhdxOptions",
    "VmdkOptions",
    "VpcOptions",
    "amend",
    "capi",
    "check",
    "checksum",
    "commit",
    "compare",
    "convert",
    "convert_from_stream",
    "convert_to_stream",
    "create",
    "fmttype2str",
    "measure",
    "inspect",
    "open",
    "options_class",
    "probe",
    "rebase",
    "resize",
    "str2fmttype",
    "supported_formats",
]

__version__ = "0.1.0"

# A library leaves output to the application (the logging HOWTO): this
# handler keeps logging.lastResort from printing our warnings on stderr when
# the application configured no logging at all.
_logging.getLogger("libqblock").addHandler(_logging.NullHandler())
