"""Whole-image jobs: convert, checksum, compare (the engine's ``tools``).

Each job runs in the engine with the GIL released, on worker threads where
that pays, and takes an optional ``progress(done, total)`` callable, called
on the calling thread at most every 100 ms and once at the end; an exception
it raises stops the job and propagates unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Type, Union

from . import _native
from .errors import InvalidParamError
from .flags import O_CACHE_WB, O_NO_FLUSH, O_RDWR
from .formats import Format
from .image import Image, Where, create, open as _open
from .location import Location
from .options import ImageOptions, RawOptions, options_class

ProgressFn = Callable[[int, int], object]
Source = Union[Where, Image]

_log = logging.getLogger(__name__)

#: qemu-img convert's default -S: zero runs of at least 4 KiB become holes.
DEFAULT_SPARSE_SIZE = 4096


def _open_sources(sources: Union[Source, Sequence[Source]], fmt: Optional[Union[Format, str]],
                  force_share: bool = False) -> Tuple[List[Image], List[Image]]:
    """(images, the ones opened here and to be closed); ``force_share`` as for open()."""
    if isinstance(sources, (str, bytes, os.PathLike, Location, Image)):
        items: Sequence[Source] = [sources]
    else:
        items = list(sources)
    if not items:
        raise InvalidParamError("convert needs at least one source image")
    images, opened = [], []
    try:
        for s in items:
            if isinstance(s, Image):
                images.append(s)
            else:
                img = _open(s, fmt, flags=0, force_share=force_share)
                images.append(img)
                opened.append(img)
    except BaseException:
        for img in opened:
            img.close()
        raise
    return images, opened


@contextlib.contextmanager
def _opened(source: Source, fmt: Optional[Union[Format, str]], force_share: bool = False) -> Iterator[Image]:
    """One image: an open Image as it is, else opened read-only here and closed after."""
    if isinstance(source, Image):
        yield source
        return
    if not isinstance(source, (str, bytes, os.PathLike, Location)):
        raise InvalidParamError(f"expected one image (a path, Location or Image), not {source!r}")
    with _open(source, fmt, flags=0, force_share=force_share) as img:
        yield img


OptionsArg = Union[ImageOptions, Type[ImageOptions], Format, str, None]


def convert(
    source: Union[Source, Sequence[Source]],
    target: Where,
    options: OptionsArg = None,
    *,
    source_format: Optional[Union[Format, str]] = None,
    sparse_size: int = DEFAULT_SPARSE_SIZE,
    existing: bool = False,
    compress: bool = False,
    start: int = 0,
    length: Optional[int] = None,
    threads: int = 0,
    progress: Optional[ProgressFn] = None,
    sync: bool = False,
    force_share: bool = False,
) -> None:
    """Copy the guest content of ``source`` into a new image at ``target``.

    ``source`` is a path, Location or open :class:`Image`, or a sequence of
    them, concatenated in order (``qemu-img convert a b c``). ``options``
    names the target's format: an options object (a ``virt_size`` of 0
    takes the length copied), an options class, a :class:`Format` or a
    format name for that format's defaults; None means raw. ``start`` and
    ``length`` pick a byte range of the (concatenated) source, which lands
    at offset 0 of the target. Ranges the source reports as zero are not
    read, and zero runs of at least ``sparse_size`` bytes are not written
    (``-S``; 0 writes every byte, allocating the whole target). With
    ``options.backing`` set, only what differs from that backing file is
    written (``-B``). With ``existing`` the target must exist (``-n``;
    ``options`` must then be None): what already reads right there is left
    alone, the rest overwritten. On any error, cancellation included, a
    target created here is removed; an existing one is flushed and stays
    valid. ``threads`` 0 uses one worker per core. ``compress`` stores the
    data compressed (qcow2: zlib or zstd, as its ``compression_type``); other
    target formats raise UnsupportedError.

    A target created here is written as qemu-img writes one (its default
    ``-t unsafe``): without flushes on the way, left to the page cache at the
    end unless ``sync`` (then it is on disk when the call returns). A crash
    meanwhile leaves an incomplete copy. An ``existing`` target is written
    with every barrier and flushed, so it stays valid whatever happens.
    ``force_share`` opens the sources as ``qemu-img convert -U`` does (see
    :func:`libqblock.open`).
    """
    if existing and options is not None:
        raise InvalidParamError("existing=True writes into the image as it is: pass no options")
    _convert(source, target, None if existing else _options_maker(options), source_format=source_format,
             sparse_size=sparse_size, compress=compress, start=start, length=length, threads=threads,
             progress=progress, sync=sync, force_share=force_share)


def _options_maker(options: OptionsArg) -> Callable[[int], ImageOptions]:
    """A function from the copied length to the target's options."""
    if options is None:
        return lambda n: RawOptions(virt_size=n)
    if isinstance(options, ImageOptions):
        if options.format is Format.NONE:
            raise InvalidParamError("options must be one of the format option classes, e.g. Qcow2Options")
        given = options
        return lambda n: given if given.virt_size else _with_size(given, n)
    if isinstance(options, (Format, str)):
        cls = options_class(options)
    elif isinstance(options, type) and issubclass(options, ImageOptions) and options.format is not Format.NONE:
        cls = options
    else:
        raise InvalidParamError(f"options must be an options object or class, a Format or a format name, not {options!r}")
    return lambda n: cls(virt_size=_aligned(cls, n))


def _convert(
    source: Union[Source, Sequence[Source]],
    target: Where,
    make_options: Optional[Callable[[int], ImageOptions]],
    *,
    source_format: Optional[Union[Format, str]],
    sparse_size: int,
    compress: bool,
    start: int,
    length: Optional[int],
    threads: int,
    progress: Optional[ProgressFn],
    sync: bool = False,
    force_share: bool = False,
) -> None:
    """convert() with the target's options as a function of the copied length (None: the target exists)."""
    if isinstance(sparse_size, bool) or not isinstance(sparse_size, int) or sparse_size < 0 or sparse_size % 512:
        raise InvalidParamError(f"sparse_size must be a non-negative multiple of 512, not {sparse_size!r}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise InvalidParamError(f"threads must be a non-negative integer, not {threads!r}")
    images, opened = _open_sources(source, source_format, force_share)
    try:
        pieces = _pieces(images, start, length)
        total = sum(n for _, _, n in pieces)
        tloc = Location.of(target)
        if make_options is None:
            _run_convert(pieces, tloc, None, sparse_size, threads, progress, compress, fresh=False, sync=True)
            return
        opts = make_options(total)
        create(tloc, opts)
        try:
            _run_convert(pieces, tloc, opts.format, sparse_size, threads, progress, compress, fresh=True,
                         sync=sync)
        except BaseException as e:
            _remove(tloc)
            _log.info("convert stopped (%s): removed the target it had created, %s", type(e).__name__, tloc)
            raise
    finally:
        for img in opened:
            img.close()


def _aligned(cls: Type[ImageOptions], size: int) -> int:
    return -(-size // cls.size_alignment) * cls.size_alignment


def _with_size(opts: ImageOptions, size: int) -> ImageOptions:
    return dataclasses.replace(opts, virt_size=_aligned(type(opts), size))


def _pieces(images: List[Image], start: int, length: Optional[int]) -> List[Tuple[Image, int, int]]:
    total = sum(i.virt_size for i in images)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start > total:
        raise InvalidParamError(f"start must be within the source's {total} bytes, not {start!r}")
    end = total if length is None else start + length
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0 or end > total):
        raise InvalidParamError(f"start + length must be within the source's {total} bytes")
    out, base = [], 0
    for img in images:
        lo, hi = max(start, base), min(end, base + img.virt_size)
        if lo < hi:
            out.append((img, lo - base, hi - lo))
        base += img.virt_size
    return out


def _run_convert(pieces: List[Tuple[Image, int, int]], tloc: Location, fmt: Optional[Format], sparse_size: int,
                 threads: int, progress: Optional[ProgressFn], compress: bool, fresh: bool,
                 sync: bool) -> None:
    # A target made by this call is written as qemu-img writes it (cache=unsafe):
    # no barriers on the way (a crash leaves an incomplete copy either way, and
    # the call removes it on an error), and, with `sync`, one sync at the end.
    # An existing target keeps every barrier: it must stay valid whatever happens.
    flags = O_RDWR | O_CACHE_WB | (O_NO_FLUSH if fresh else 0)
    with _open(tloc, fmt, flags=flags) as tgt:
        _native.convert_images([(img._n, s, n) for img, s, n in pieces], tgt._n, sparse_size, threads, progress,
                               compress)
        tgt.flush()
    if fresh and sync and tloc.protocol == "file":
        fd = os.open(tloc.target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(loc: Location) -> None:
    if loc.protocol == "file":
        try:
            os.unlink(loc.target)
        except FileNotFoundError:
            pass


def checksum(source: Source, fmt: Optional[Union[Format, str]] = None, *, threads: int = 0,
             progress: Optional[ProgressFn] = None, force_share: bool = False) -> str:
    """The format-independent checksum of the guest disk, as 64 hex digits.

    The same guest content gives the same checksum in any format, with any
    allocation. The algorithm (``qblock-checksum-v1``, BLAKE3 over 64 KiB
    blocks grouped in 64 MiB segments; see the README) is fixed: results
    compare across releases. Ranges block status reports as zero are not read.
    """
    with _opened(source, fmt, force_share) as img:
        return str(_native.checksum_image(img._n, threads, progress))


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` found. ``identical`` is what ``qemu-img compare`` exits 0 for."""

    identical: bool
    #: "identical", "content", "size" (strict) or "allocation" (strict).
    reason: str
    #: Where the images first differ (the start of a 512-byte sector), if known.
    offset: Optional[int]
    message: str
    #: The two virtual sizes (qemu-img warns when they differ).
    sizes: Tuple[int, int]


def compare(a: Source, b: Source, *, fmt_a: Optional[Union[Format, str]] = None,
            fmt_b: Optional[Union[Format, str]] = None, strict: bool = False,
            progress: Optional[ProgressFn] = None, force_share: bool = False) -> CompareResult:
    """Compare guest content like ``qemu-img compare`` (``strict`` is ``-s``).

    Without ``strict`` a longer image must read as zeroes past the shorter
    one's end; with it, sizes and allocation must match too.
    """
    with _opened(a, fmt_a, force_share) as x, _opened(b, fmt_b, force_share) as y:
        kind, off = _native.compare_images(x._n, y._n, bool(strict), progress)
        sizes = (x.virt_size, y.virt_size)
    message = {
        "identical": "Images are identical.",
        "content": f"Content mismatch at offset {off}!",
        "size": "Strict mode: Image size mismatch!",
        "allocation": f"Strict mode: Offset {off} block status mismatch!",
    }[kind]
    return CompareResult(kind == "identical", kind, off, message, sizes)


def resize(
    image: Where,
    size: int,
    *,
    format: Optional[Union[Format, str]] = None,  # noqa: A002 - qemu-img's word
    shrink: bool = False,
) -> None:
    """Change the virtual size of ``image`` to ``size`` bytes (``qemu-img resize``).

    Growing adds space that reads as zeroes. Shrinking drops everything past
    the new end, so it must be asked for with ``shrink=True`` (``--shrink``);
    otherwise it raises :class:`~libqblock.errors.InvalidParamError` and the
    image is left alone. A format that cannot change its size, or cannot
    shrink, raises :class:`~libqblock.errors.UnsupportedError`.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidParamError(f"the new size must be a non-negative int, not {size!r}")
    with _open(image, format, flags=O_RDWR | O_CACHE_WB) as img:
        if size < img.virt_size and not shrink:
            raise InvalidParamError(
                f"shrinking from {img.virt_size} to {size} bytes drops data: pass shrink=True (--shrink)"
            )
        if size != img.virt_size:
            img.truncate(size)
