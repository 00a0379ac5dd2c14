"""The exceptions of libqblock and the per-thread error broker.

Every failure raises a subclass of :class:`QBlockError` carrying ``.code`` (the
seed's negative ``QB_ERR_*`` value), ``.errno`` (non-zero only when an OS call
failed) and ``.message``. Each raised error is also recorded in the
:class:`Broker` of the thread that raised it, as the seed's broker did.
"""

from __future__ import annotations

import threading
from typing import Optional

# The seed's codes (libqblock-error.h) ...
QB_ERR_MEM_ERR = -1
QB_ERR_INTERNAL_ERR = -2
QB_ERR_INVALID_PARAM = -100
QB_ERR_BLOCK_OUT_OF_RANGE = -101
# ... and the ones libqblock adds for failures the seed folded into "internal".
QB_ERR_UNSUPPORTED = -102
QB_ERR_CORRUPT_IMAGE = -103
QB_ERR_IMAGE_LOCKED = -104


class QBlockError(Exception):
    """Base class of every libqblock error."""

    code: int = QB_ERR_INTERNAL_ERR

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.message: str = message
        self.errno: int = errno
        Broker.current()._record(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, errno={self.errno})"

    def __reduce__(self) -> "tuple[type, tuple[str, int]]":
        # Exception's default pickles only args (the message): keep errno too.
        return (type(self), (self.message, self.errno))


class InvalidParamError(QBlockError, ValueError):
    """A parameter is invalid (bad option, closed image, read-only write...)."""

    code = QB_ERR_INVALID_PARAM


class InternalError(QBlockError):
    """An internal failure, or an OS call that failed (see ``.errno``)."""

    code = QB_ERR_INTERNAL_ERR


class NoMemoryError(QBlockError, MemoryError):
    """Memory could not be allocated (also: an image asks for absurd amounts)."""

    code = QB_ERR_MEM_ERR


class OutOfRangeError(QBlockError, IndexError):
    """An offset or length lies outside the image."""

    code = QB_ERR_BLOCK_OUT_OF_RANGE


class UnsupportedError(QBlockError, NotImplementedError):
    """A format, protocol, option or feature that libqblock does not offer (yet)."""

    code = QB_ERR_UNSUPPORTED


class CorruptImageError(QBlockError):
    """The image is damaged or hostile; nothing was trusted from it."""

    code = QB_ERR_CORRUPT_IMAGE


class ImageLockedError(QBlockError):
    """Another process (for example a running VM) holds a lock on the image."""

    code = QB_ERR_IMAGE_LOCKED


ERROR_CLASSES = (
    InvalidParamError,
    InternalError,
    NoMemoryError,
    OutOfRangeError,
    UnsupportedError,
    CorruptImageError,
    ImageLockedError,
)


class Broker:
    """The last error of one thread, in the seed's shape.

    ``err_ret`` is the last error's negative ``QB_ERR_*`` code (0: none yet),
    ``err_no`` its errno (0 unless an OS call failed) and ``err_msg`` its
    message. ``Broker.current()`` is the calling thread's broker; every
    :class:`QBlockError` raised (constructed) in a thread is recorded in it,
    and never in another thread's. A success does not clear it, as in the
    seed; call :meth:`clear`. A broker made with ``Broker()`` (or
    ``capi.qb_broker_new()``) is private: :mod:`libqblock.capi` records into
    the broker it is handed (as well as the thread's).
    """

    _local = threading.local()

    def __init__(self) -> None:
        self.err_ret: int = 0
        self.err_no: int = 0
        self.err_msg: str = ""
        #: Set by capi.qb_broker_delete; a deleted broker is refused by capi.
        self.deleted: bool = False

    @classmethod
    def current(cls) -> "Broker":
        """The calling thread's broker (made on first use)."""
        b: Optional[Broker] = getattr(cls._local, "broker", None)
        if b is None:
            b = cls()
            cls._local.broker = b
        return b

    def _record(self, err: QBlockError) -> None:
        self._set(err.code, err.errno, err.message)

    def _set(self, code: int, errno: int, message: str) -> None:
        self.err_ret = code
        self.err_no = errno
        self.err_msg = message

    def clear(self) -> None:
        """Forget the last error."""
        self.err_ret, self.err_no, self.err_msg = 0, 0, ""

    def __repr__(self) -> str:
        return f"<libqblock.Broker err_ret={self.err_ret} err_no={self.err_no} err_msg={self.err_msg!r}>"

    @property
    def last_error(self) -> str:
        """The seed's human-readable string for the last error."""
        if self.err_ret == 0:
            return "no error"
        if self.err_no:
            return f"{self.err_msg} (errno {self.err_no})"
        return self.err_msg
