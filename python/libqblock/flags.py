"""The seed's LIBQBLOCK_O_* open flags (same bit values as QEMU's BDRV_O_*)."""

from __future__ import annotations

import enum


class OpenFlag(enum.IntFlag):
    """The open flags as an IntFlag; combine with ``|``. Any bit outside
    :data:`O_VALID_MASK` makes open and create raise InvalidParamError."""

    RDWR = 0x0002
    SNAPSHOT = 0x0008
    NOCACHE = 0x0020
    CACHE_WB = 0x0040
    NO_BACKING = 0x0100
    NO_FLUSH = 0x0200


O_RDWR = OpenFlag.RDWR
"""Open for reading and writing (read-only without it)."""
O_SNAPSHOT = OpenFlag.SNAPSHOT
"""With O_RDWR: the image is opened read-only and writes go to a temporary
qcow2 overlay (in the temporary folder, unlinked at once), discarded on close.
Without O_RDWR it changes nothing."""
O_NOCACHE = OpenFlag.NOCACHE
"""Bypass the host page cache (O_DIRECT) for every file of the image's chain;
any offset and length still work. UnsupportedError where the file system
has no O_DIRECT (tmpfs before Linux 6.6, some FUSE file systems)."""
O_CACHE_WB = OpenFlag.CACHE_WB
"""Write-back: writes reach the disk on flush/close; without it every write is flushed."""
O_NO_BACKING = OpenFlag.NO_BACKING
"""Do not open the backing file; unallocated ranges read as zeroes."""
O_NO_FLUSH = OpenFlag.NO_FLUSH
"""Never flush to the disk (scratch images)."""
O_VALID_MASK = OpenFlag(O_RDWR | O_SNAPSHOT | O_NOCACHE | O_CACHE_WB | O_NO_BACKING | O_NO_FLUSH)
"""Every flag bit libqblock knows; any other bit is an InvalidParamError."""
