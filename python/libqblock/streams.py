"""Conversion to and from pipes, which cannot be seeked in.

``qemu-img convert`` needs seekable files on both sides; scripts that feed a
pipe (``curl ... | qblock convert -f raw - disk.qcow2``) or read one
(``qblock convert -O qcow2 disk.vmdk - | ssh host 'cat > disk.qcow2'``) use
these instead:

- :func:`convert_to_stream` writes an image front to back to a binary file
  object (stdout): raw guest bytes, zeroes included (a pipe has no holes;
  ranges block status reports as zero are written from a zero buffer, not
  read), or a qcow2 or streamOptimized vmdk image laid out for one pass.
- :func:`convert_from_stream` reads raw bytes from a binary file object until
  its end into a new image, which grows as the bytes come (the size is not
  known in advance), so the target's format must be able to grow (raw,
  qcow2, qed). Zero runs of ``sparse_size`` bytes are not written.

Memory stays at a few 4 MiB buffers whatever the size.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Callable, List, Optional, Sequence, Tuple, Union

from . import _native
from .errors import InvalidParamError, UnsupportedError
from .flags import O_CACHE_WB, O_RDWR
from .formats import Format
from .image import Image, Where, create, open as _open
from .location import Location
from .options import ImageOptions, VmdkOptions
from .tools import DEFAULT_SPARSE_SIZE, OptionsArg, ProgressFn, Source, _open_sources, _options_maker, _pieces, _remove

#: Bytes moved per read or write.
CHUNK = 4 << 20
_ZEROES = bytes(CHUNK)
#: Formats a stream can go into: they can grow as the bytes arrive.
GROWABLE = (Format.RAW, Format.QCOW2, Format.QED)
#: Image formats (besides raw) that can be written to a stream.
STREAMABLE = (Format.QCOW2, Format.VMDK)


def _write_all(out: Any, data: memoryview) -> None:
    while data:  # a pipe may take part of a write
        n = out.write(data)
        data = data[n if n is not None else len(data):]


def convert_to_stream(
    source: Union[Source, Sequence[Source]],
    out: BinaryIO,
    options: OptionsArg = None,
    *,
    source_format: Optional[Union[Format, str]] = None,
    start: int = 0,
    length: Optional[int] = None,
    sparse_size: int = DEFAULT_SPARSE_SIZE,
    compress: bool = False,
    threads: int = 0,
    progress: Optional[ProgressFn] = None,
    force_share: bool = False,
) -> int:
    """Write ``source`` (one image or several, concatenated; ``start``/``length``
    pick a range) to ``out`` front to back, never seeking, as a new image.
    Returns the bytes written.

    ``options`` names the stream's format as for :func:`libqblock.convert`:
    None or raw gives the guest bytes themselves; qcow2 (``Qcow2Options``:
    cluster size, compat, refcount bits, compression type) and
    streamOptimized vmdk (``VmdkOptions``; a vmdk named by format or class
    means streamOptimized here) give an image file's bytes. A qcow2 stream's
    layout is planned from the source's block status, then the data follows,
    so every cluster block status calls data takes room even if it holds
    zeroes; vmdk grains are always compressed, on ``threads`` workers
    (``compress`` asks for it, as ``-c``). Options that
    need a file beside the image (backing, data file, preallocation) raise
    UnsupportedError, and so does a compressed qcow2 stream. An exception
    (from ``out`` or ``progress``) stops the stream where it is. ``force_share``
    opens the sources as ``qemu-img -U`` (see :func:`libqblock.open`)."""
    return _to_stream(source, out, _stream_options(options), source_format=source_format, start=start,
                      length=length, sparse_size=sparse_size, compress=compress, threads=threads, progress=progress,
                      force_share=force_share)


def _to_stream(
    source: Union[Source, Sequence[Source]],
    out: BinaryIO,
    make_options: Callable[[int], ImageOptions],
    *,
    source_format: Optional[Union[Format, str]],
    start: int,
    length: Optional[int],
    sparse_size: int,
    compress: bool,
    threads: int,
    progress: Optional[ProgressFn],
    force_share: bool = False,
) -> int:
    """convert_to_stream() with the options as a function of the copied length."""
    if not hasattr(out, "write"):
        raise InvalidParamError(f"expected a writable binary file object, not {out!r}")
    images, opened = _open_sources(source, source_format, force_share)
    try:
        pieces = _pieces(images, start, length)
        total = sum(n for _, _, n in pieces)
        opts = make_options(total)
        if opts.format is Format.RAW:
            if compress:
                raise UnsupportedError("raw images cannot store compressed data")
            return _raw_to_stream(pieces, out, total, progress)
        if opts.format not in STREAMABLE:
            raise UnsupportedError(
                f"{opts.format.value} images cannot be written to a stream "
                "(raw, qcow2 and streamOptimized vmdk can)"
            )
        _check_sparse(sparse_size)
        return _native.convert_stream([(img._n, s, n) for img, s, n in pieces], opts.format.value, opts.to_native(),
                                      out, sparse_size, threads, progress, compress)
    finally:
        for img in opened:
            img.close()


def _stream_options(options: OptionsArg) -> Callable[[int], ImageOptions]:
    """As for convert, but a vmdk stream is streamOptimized unless said otherwise."""
    if isinstance(options, (Format, str, type)) and _options_maker(options)(512).format is Format.VMDK:
        return lambda n: VmdkOptions(virt_size=-(-n // 512) * 512, subformat="streamOptimized")
    return _options_maker(options)


def _check_sparse(sparse_size: int) -> None:
    if isinstance(sparse_size, bool) or not isinstance(sparse_size, int) or sparse_size < 0 or sparse_size % 512:
        raise InvalidParamError(f"sparse_size must be a non-negative multiple of 512, not {sparse_size!r}")


def _raw_to_stream(pieces: List[Tuple[Image, int, int]], out: Any, total: int,
                   progress: Optional[ProgressFn]) -> int:
    done = 0
    buf = bytearray(CHUNK)
    for img, at, n in pieces:
        pos, end = at, at + n
        while pos < end:
            st = img.block_status(pos, min(end - pos, CHUNK))
            k = st.length
            if st.zero and not st.data:
                _write_all(out, memoryview(_ZEROES)[:k])
            else:
                view = memoryview(buf)[:k]
                img.readinto(view, pos)
                _write_all(out, view)
            pos += k
            done += k
            if progress is not None:
                progress(done, total)
    out.flush()
    return done


def _read_some(inp: Any, view: memoryview) -> int:
    """Fill ``view`` as far as the stream goes; fewer bytes only at its end."""
    got = 0
    while got < len(view):
        n = inp.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def convert_from_stream(
    inp: BinaryIO,
    target: Where,
    options: OptionsArg = None,
    *,
    sparse_size: int = DEFAULT_SPARSE_SIZE,
    progress: Optional[ProgressFn] = None,
) -> int:
    """Read raw guest bytes from ``inp`` until its end into a new image at
    ``target`` (``options`` as for :func:`libqblock.convert`; the size comes from
    the stream, rounded up to the format's unit). Returns the bytes read. On an
    error the half-made target is removed."""
    if not hasattr(inp, "readinto"):
        raise InvalidParamError(f"expected a readable binary file object, not {inp!r}")
    _check_sparse(sparse_size)
    opts = _options_maker(options)(1)  # the smallest disk the format takes; it grows as bytes come
    if opts.format not in GROWABLE:
        raise UnsupportedError(
            f"reading a stream needs a target format that can grow ({', '.join(f.value for f in GROWABLE)}), "
            f"not {opts.format.value}"
        )
    align = type(opts).size_alignment
    loc = Location.of(target)
    create(loc, opts)
    try:
        with _open(loc, opts.format, flags=O_RDWR | O_CACHE_WB) as img:
            total = _copy_in(inp, img, align, sparse_size, progress)
        return total
    except BaseException:
        _remove(loc)
        raise


def _copy_in(inp: Any, img: Image, align: int, sparse_size: int, progress: Optional[ProgressFn]) -> int:
    buf = bytearray(CHUNK)
    unit = sparse_size or CHUNK
    pos = 0
    while True:
        n = _read_some(inp, memoryview(buf))
        if n == 0:
            break
        need = -(-(pos + n) // align) * align
        if need > img.virt_size:
            img.truncate(need)  # grows only (qed cannot shrink): a size field to rewrite
        off = 0
        while off < n:
            k = min(unit, n - off)
            if not sparse_size or buf.count(0, off, off + k) != k:
                img.write(memoryview(buf)[off:off + k], pos + off)
            off += k
        pos += n
        if progress is not None:
            progress(pos, pos)
    return pos
