"""Conversion to and from pipes: raw bytes that cannot be seeked in.

``qemu-img convert`` needs seekable files on both sides; scripts that feed a
pipe (``curl ... | qblock convert -f raw - disk.qcow2``) or read one
(``qblock convert -O raw disk.qcow2 - | zstd``) use these instead:

- :func:`convert_to_stream` writes an image's guest bytes in order to a
  binary file object (stdout), zeroes included: a pipe has no holes. Ranges
  block status reports as zero are written from a zero buffer, not read.
- :func:`convert_from_stream` reads raw bytes from a binary file object until
  its end into a new image, which grows as the bytes come (the size is not
  known in advance), so the target's format must be able to grow (raw,
  qcow2, qed). Zero runs of ``sparse_size`` bytes are not written.

Memory stays at a few 4 MiB buffers whatever the size.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Optional, Sequence, Union

from .errors import InvalidParamError, UnsupportedError
from .flags import O_CACHE_WB, O_RDWR
from .formats import Format
from .image import Image, Where, create, open as _open
from .location import Location
from .tools import DEFAULT_SPARSE_SIZE, OptionsArg, ProgressFn, Source, _open_sources, _options_maker, _pieces, _remove

#: Bytes moved per read or write.
CHUNK = 4 << 20
_ZEROES = bytes(CHUNK)
#: Formats a stream can go into: they can grow as the bytes arrive.
GROWABLE = (Format.RAW, Format.QCOW2, Format.QED)


def _write_all(out: Any, data: memoryview) -> None:
    while data:  # a pipe may take part of a write
        n = out.write(data)
        data = data[n if n is not None else len(data):]


def convert_to_stream(
    source: Union[Source, Sequence[Source]],
    out: BinaryIO,
    *,
    source_format: Optional[Union[Format, str]] = None,
    start: int = 0,
    length: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
) -> int:
    """Write the guest bytes of ``source`` (one image or several, concatenated;
    ``start``/``length`` pick a range) to ``out`` in order, as raw. Returns the
    bytes written."""
    if not hasattr(out, "write"):
        raise InvalidParamError(f"expected a writable binary file object, not {out!r}")
    images, opened = _open_sources(source, source_format)
    try:
        pieces = _pieces(images, start, length)
        total = sum(n for _, _, n in pieces)
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
    finally:
        for img in opened:
            img.close()


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
    if isinstance(sparse_size, bool) or not isinstance(sparse_size, int) or sparse_size < 0 or sparse_size % 512:
        raise InvalidParamError(f"sparse_size must be a non-negative multiple of 512, not {sparse_size!r}")
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
