"""Drive libqblock's parser over one (possibly damaged) image file."""

from __future__ import annotations

import os
from typing import Optional, Union

from ..check import check
from ..errors import QBlockError, UnsupportedError
from ..image import open as _open

MiB = 1 << 20


def exercise(path: Union[str, "os.PathLike[str]"], fmt: str, *, max_read: int = 16 * MiB,
             max_extents: int = 4096) -> Optional[QBlockError]:
    """Open ``path`` read-only as ``fmt`` and use it as a reader would: info,
    snapshots, the allocation map (at most ``max_extents`` extents), a read of
    the whole disk (of its first ``max_read`` bytes and its last MiB when it
    is larger: a damaged header may claim exabytes), then ``check``.

    Returns None when all of it works, or the :class:`libqblock.QBlockError`
    raised first (check's UnsupportedError for formats that cannot be
    checked does not count). Any other exception propagates: for libqblock
    that is a bug, and so is a crash or a hang.
    """
    try:
        with _open(os.fspath(path), fmt, 0) as img:
            img.info()
            img.snapshots()
            size = img.virt_size
            for n, _ in enumerate(img.map()):
                if n + 1 >= max_extents:
                    break
            ranges = [(0, size)] if size <= max_read else [(0, max_read), (size - MiB, MiB)]
            for start, length in ranges:
                for off in range(start, start + length, MiB):
                    img.read(min(MiB, start + length - off), off)
        try:
            check(os.fspath(path), format=fmt)
        except UnsupportedError:
            if fmt in ("qcow2", "qed", "vdi", "vmdk", "vhdx", "parallels"):
                raise
    except QBlockError as e:
        return e
    return None
