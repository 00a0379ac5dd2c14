"""A file object over an image's virtual disk (:meth:`Image.stream`)."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .image import Image


class ImageStream(io.RawIOBase):
    """A seekable raw binary stream over the virtual disk of an open image.

    It reads and (when the image is open for writing) writes at its own
    position, like a file of the disk's size: a read at the end returns
    ``b""``, a read crossing it is cut short, and a write past the end
    raises OSError (a disk does not grow by writing; ``Image.truncate``
    resizes). Wrap it in :class:`io.BufferedReader` for small reads.
    Closing the stream leaves the image open; each stream has its own
    position, so several may share one image (one per thread).
    """

    def __init__(self, image: "Image") -> None:
        super().__init__()
        self._image = image
        self._pos = 0

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self._pos} of {self._size()}"
        return f"<libqblock.ImageStream {self._image.location} {state}>"

    def _size(self) -> int:
        return self._image.virt_size

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return self._image.writable

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size() + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size() - self._pos))
        if n:
            self._image.readinto(view[:n], self._pos)
            self._pos += n
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        n = max(0, self._size() - self._pos)
        data = self._image.read(n, self._pos) if n else b""
        self._pos += n
        return data

    def write(self, data: Any) -> int:
        self._checkClosed()
        if not self._image.writable:
            raise io.UnsupportedOperation("the image is open read-only")
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self._size():
            raise OSError(f"write of {len(view)} bytes at {self._pos} passes the end of the disk ({self._size()} bytes)")
        n = self._image.write(view, self._pos)
        self._pos += n
        return n

    def truncate(self, size: Any = None) -> int:
        raise io.UnsupportedOperation("a disk stream cannot truncate; use Image.truncate")

    def flush(self) -> None:
        if not self.closed and self._image.writable and not self._image.closed:
            self._image.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an image stream has no file descriptor")
