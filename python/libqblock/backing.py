"""Jobs on a backing chain: ``commit`` and ``rebase`` (``qemu-img commit``, ``qemu-img rebase``).

Both run in the engine with the GIL released and take an optional
``progress(done, total)`` callable, as the jobs of :mod:`libqblock.tools` do.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from . import _native
from .errors import InvalidParamError
from .flags import O_CACHE_WB, O_RDWR
from .formats import Format
from .image import Where, _fmt_name, open as _open
from .location import Location
from .tools import ProgressFn


def commit(
    image: Where,
    *,
    format: Optional[Union[Format, str]] = None,  # noqa: A002 - qemu-img's word
    base: Optional[Where] = None,
    keep: bool = False,
    progress: Optional[ProgressFn] = None,
) -> bool:
    """Write what ``image`` holds over its backing chain into its backing file.

    Only the ranges the layers above the base allocate are copied; ranges
    they hold as zeroes become zeroes there. ``base`` names a deeper layer of
    the chain to commit into (the layers between are left stale, so the top
    image then keeps its data, as ``qemu-img commit -b`` does). Otherwise,
    unless ``keep`` (``-d``), the image is emptied afterwards and reads
    through to its backing file again. A base smaller than the image is grown.

    Returns whether the image was emptied. Raises
    :class:`~libqblock.errors.InvalidParamError` when the image has no backing
    file or ``base`` is not in its chain, and
    :class:`~libqblock.errors.UnsupportedError` when the image's format cannot
    be emptied (commit again with ``keep=True``) or the base cannot grow.
    """
    empty = not keep and base is None
    flags = O_RDWR | O_CACHE_WB if empty else 0
    loc = Location.of(base) if base is not None else None
    with _open(image, format, flags=flags) as img:
        return _native.commit_image(
            img._n,
            (loc.protocol, loc.target) if loc is not None else None,
            empty,
            progress,
        )


def rebase(
    image: Where,
    backing: Optional[Union[str, "os.PathLike[str]"]],
    *,
    format: Optional[Union[Format, str]] = None,  # noqa: A002 - qemu-img's word
    backing_format: Optional[Union[Format, str]] = None,
    unsafe: bool = False,
    progress: Optional[ProgressFn] = None,
) -> None:
    """Put ``image`` on the backing file ``backing`` (``None`` or ``""``: none).

    ``backing`` is recorded as given and, like every recorded name, read
    relative to the image's folder. In the default safe mode the image reads
    the same afterwards: wherever it does not hold data itself and its old
    chain and the new backing file differ, the old bytes are copied into it
    first. ``unsafe`` (``-u``) only changes the recorded name.

    ``backing_format`` must be given with a backing file, as qemu-img
    requires: recording a probed format would let a raw backing file pass
    itself off as another format.
    """
    name = os.fspath(backing) if backing is not None else None
    if name == "":
        name = None
    if name is not None and not isinstance(name, str):
        raise InvalidParamError("the backing file name must be text")
    if name is not None and backing_format is None:
        raise InvalidParamError("a backing file needs its format (backing_format, -F)")
    fmt = _fmt_name(backing_format)
    with _open(image, format, flags=O_RDWR | O_CACHE_WB) as img:
        _native.rebase_image(img._n, name, fmt, unsafe, progress)
