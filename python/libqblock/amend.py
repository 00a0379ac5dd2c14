"""``amend``: change the creation options of an existing image in place
(``qemu-img amend``).

Only qcow2 has options that can change after creation, as in QEMU: the
compatibility level (``compat``, ``"0.10"``/``"v2"`` or ``"1.1"``/``"v3"``),
``lazy_refcounts``, ``refcount_bits`` and the virtual ``size``. The other
options QEMU's amend accepts (``backing_file``, ``backing_fmt``,
``data_file``, ``data_file_raw``) may only repeat what the image has, or turn
``data_file_raw`` off; options only meant for creation (``cluster_size``,
``extended_l2``, ``preallocation``, ``compression_type``, encryption) are
refused.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

from . import _native
from .errors import InvalidParamError
from .formats import Format
from .image import Where
from .location import Location
from .tools import ProgressFn

OptionValue = Union[str, int, bool, Format]

#: What ``qemu-img amend -o`` takes for qcow2, by kind of value.
_TEXT = ("compat", "backing_file", "backing_fmt", "data_file")
_BOOL = ("lazy_refcounts", "data_file_raw")
_INT = ("refcount_bits", "size")
#: qcow2 options only a new image can take.
_CREATE_ONLY = ("cluster_size", "extended_l2", "preallocation", "compression_type", "encrypt", "encryption")

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def _bool(key: str, v: OptionValue) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    raise InvalidParamError(f"Parameter '{key}' expects 'on' or 'off'")


def _int(key: str, v: OptionValue) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        from .cli import parse_size  # the size grammar of every -o (1G, 512M, ...)

        try:
            return parse_size(v) if key == "size" else int(v, 10)
        except (ValueError, InvalidParamError):
            pass
    raise InvalidParamError(f"Parameter '{key}' expects a {'size' if key == 'size' else 'number'}")


def _native_args(options: Mapping[str, OptionValue]) -> Dict[str, object]:
    """The options as the engine's keywords, each checked for its name and type."""
    out: Dict[str, object] = {}
    for raw_key, v in options.items():
        key = raw_key.replace("-", "_")
        if key in _CREATE_ONLY or key.startswith("encrypt."):
            raise InvalidParamError(f"Invalid parameter '{raw_key}': this option is only supported for image creation")
        if key in _BOOL:
            out[key] = _bool(key, v)
        elif key in _INT:
            n = _int(key, v)
            if n < 0:
                raise InvalidParamError(f"Parameter '{key}' expects a non-negative value, not {n}")
            out[key] = n
        elif key in _TEXT:
            out[key] = str(v)
        else:
            raise InvalidParamError(f"Invalid parameter '{raw_key}'")
    return out


def amend(
    location: Where,
    options: Optional[Mapping[str, OptionValue]] = None,
    *,
    format: Optional[Union[Format, str]] = None,  # noqa: A002 - qemu-img's word
    progress: Optional[ProgressFn] = None,
    **kwargs: OptionValue,
) -> None:
    """Change the options of the image at ``location`` in place, as ``qemu-img amend``.

    Options come as a dict (``{"compat": "0.10"}``), as keywords
    (``lazy_refcounts=True``), or both; names are qemu-img's (``-`` and ``_``
    alike), values typed or as text (``"on"``, ``"16"``, ``"1G"``). Only what
    is given changes. ``format`` None probes the image; a format other than
    qcow2 raises :class:`~libqblock.errors.UnsupportedError`.

    For qcow2: ``compat="1.1"`` upgrades a version 2 image (snapshot entries
    get complete version 3 extra data); ``compat="0.10"`` downgrades a
    version 3 one, as QEMU does: zero clusters become unallocated (no
    backing file) or allocated clusters of zeroes, feature bits are dropped
    and bitmaps with them (their clusters are freed); it is refused for
    refcount widths other than 16, external data files, incompatible
    features, snapshots of another size and zstd-compressed clusters.
    ``refcount_bits`` (1 to 64, a power of two, version 3 only) rewrites the
    refcount structure at that width (refused when a cluster's refcount does
    not fit). ``lazy_refcounts`` (version 3 only) sets the compatible bit;
    a dirty image is recounted first. ``size`` resizes, shrinking included,
    like :func:`~libqblock.resize` with ``shrink=True``.

    Every option is checked before the image is touched: a refusal
    (:class:`~libqblock.errors.InvalidParamError` for a value this image
    cannot take, :class:`~libqblock.errors.UnsupportedError` for a change
    QEMU cannot make either) leaves it as it was. ``progress(done, total)``
    is called as in :func:`~libqblock.convert`; an exception it raises stops
    the amend between two steps with the image valid.
    """
    merged: Dict[str, OptionValue] = dict(options or {})
    merged.update(kwargs)
    if not merged:
        raise InvalidParamError("amend needs at least one option")
    args = _native_args(merged)
    loc = Location.of(location)
    fmt = str(format) if isinstance(format, Format) else format
    _native.amend_image(loc.protocol, loc.target, format=fmt, progress=progress, **args)  # type: ignore[arg-type]
