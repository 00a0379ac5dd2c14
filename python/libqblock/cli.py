"""The ``qblock`` command: create, info, write, read, map, convert, compare, checksum and check images."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from . import image as _image
from . import tools as _tools
from .errors import InvalidParamError, OutOfRangeError, QBlockError, UnsupportedError
from .flags import O_CACHE_WB, O_RDWR
from .check import check as _check
from .formats import Format
from .options import ImageOptions, option_fields, options_class

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
#: qemu-img's -o names that differ from the option classes' field names.
_QEMU_NAMES = {"size": "virt_size", "backing_file": "backing"}


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``4096``, ``64k`` -> bytes (binary units, as qemu-img)."""
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgtpeBKMGTPE]?)(?:i?[bB])?\s*", text)
    if not m:
        raise InvalidParamError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _parse_o(opts: List[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise InvalidParamError(f"option {item!r} needs key=value")
            key = key.replace("-", "_")
            out[_QEMU_NAMES.get(key, key)] = val
    return out


def _coerce(cls: Type[ImageOptions], key: str, val: str) -> object:
    """A -o value as the type of the options field it sets."""
    if key not in option_fields(cls):
        raise InvalidParamError(f"{cls.__name__} has no option {key!r} (see -o help)")
    # The annotations are strings (postponed evaluation): "bool", "int",
    # "Optional[int]", ... Everything else is taken as text.
    t = str(cls.__dataclass_fields__[key].type).replace(" ", "")  # type: ignore[attr-defined]
    if key == "backing_fmt":
        f = Format.from_str(val)
        if f is Format.NONE:
            raise InvalidParamError(f"unknown backing format {val!r}")
        return f
    if t == "bool":
        if val not in ("on", "off", "true", "false"):
            raise InvalidParamError(f"option {key} takes on or off, not {val!r}")
        return val in ("on", "true")
    if t in ("int", "Optional[int]"):
        return parse_size(val)
    return val


def _options_help(cls: Type[ImageOptions]) -> str:
    lines = [f"Supported {cls.format} options ({cls.__name__}):"]
    defaults = cls.__dataclass_fields__  # type: ignore[attr-defined]
    for name in option_fields(cls):
        qemu = {v: k for k, v in _QEMU_NAMES.items()}.get(name, name)
        lines.append(f"  {qemu:<18} default {defaults[name].default!r}")
    return "\n".join(lines)


def _option_args(fmt_name: str, o: List[str], backing: Optional[str], backing_format: Optional[str],
                 size: Optional[int]) -> Tuple[Type[ImageOptions], Dict[str, Any]]:
    """The options class and its arguments from qemu-img style ``-f``, ``-o``, ``-b``, ``-F`` and size."""
    cls = options_class(_known_format(fmt_name))
    kw: Dict[str, Any] = {k: _coerce(cls, k, v) for k, v in _parse_o(o).items()}
    if backing and "backing" not in option_fields(cls):
        raise InvalidParamError(f"{cls.format} images have no backing file")
    if backing:
        kw["backing"] = backing
    if backing_format:
        kw["backing_fmt"] = _coerce(cls, "backing_fmt", backing_format)
    if size is not None:
        kw["virt_size"] = size
    return cls, kw


def _wants_help(o: List[str]) -> bool:
    return any(group.split(",")[0] == "help" for group in o)


def cmd_create(a: argparse.Namespace) -> int:
    """``qblock create [-f FMT] [-o OPTS] [-b BACKING [-F FMT]] FILE [SIZE]``."""
    if _wants_help(a.o):
        print(_options_help(options_class(_known_format(a.format))))
        return 0
    cls, kw = _option_args(a.format, a.o, a.backing, a.backing_format, parse_size(a.size) if a.size else None)
    if "virt_size" not in kw and "backing" not in kw:
        raise InvalidParamError("creating an image needs a size (or a backing file to take it from)")
    _image.create(a.filename, cls(**kw))
    return 0


def _known_format(name: str) -> Format:
    fmt = Format.from_str(name)
    if fmt is Format.NONE:
        raise InvalidParamError(f"unknown format {name!r}")
    return fmt


def _info_dict(a: argparse.Namespace) -> Dict[str, Any]:
    with _image.open(a.filename, a.format, flags=0) as img:
        i = img.info()
    d: Dict[str, Any] = {
        "filename": str(i.location),
        "format": i.format.value,
        "virtual-size": i.virt_size,
        "encrypted": i.encrypted,
        "dirty-flag": i.dirty,
    }
    if i.cluster_size is not None:
        d["cluster-size"] = i.cluster_size
    if i.actual_size is not None:
        d["actual-size"] = i.actual_size
    if i.backing_filename:
        d["backing-filename"] = i.backing_filename
        d["full-backing-filename"] = str(i.backing_location)
    if i.backing_format:
        d["backing-filename-format"] = i.backing_format.value
    if i.format_specific:
        d["format-specific"] = {"type": i.format.value, "data": i.format_specific}
    return d


def cmd_info(a: argparse.Namespace) -> int:
    """``qblock info [--output json] FILE``: what ``qemu-img info`` prints."""
    d = _info_dict(a)
    if a.output == "json":
        print(json.dumps(d, indent=4))
    else:
        for k, v in d.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}")
    return 0


def cmd_write(a: argparse.Namespace) -> int:
    """``qblock write [-P BYTE | -z] FILE OFFSET LENGTH``."""
    length = parse_size(a.length)
    with _image.open(a.filename, a.format, flags=O_RDWR | O_CACHE_WB) as img:
        if a.zero:
            img.write_zeroes(parse_size(a.offset), length)
        else:
            img.write(bytes([a.pattern & 0xFF]) * length, parse_size(a.offset))
    return 0


#: ``qblock read`` streams in pieces this big: a 10 GiB read needs 4 MiB of memory.
_READ_CHUNK = 4 << 20


def cmd_read(a: argparse.Namespace) -> int:
    """``qblock read FILE OFFSET LENGTH``: the guest bytes, raw, on stdout."""
    offset, length = parse_size(a.offset), parse_size(a.length)
    # Unbuffered, so that each write's count is the pipe's own answer.
    out = getattr(sys.stdout.buffer, "raw", sys.stdout.buffer)
    with _image.open(a.filename, a.format, flags=0) as img:
        if offset + length > img.virt_size:  # checked before anything is written
            raise OutOfRangeError(f"range at {offset} of {length} bytes is beyond the virtual size {img.virt_size}")
        buf = bytearray(min(length, _READ_CHUNK))
        done = 0
        while done < length:
            n = min(len(buf), length - done)
            view = memoryview(buf)[:n]
            img.readinto(view, offset + done)
            while view:  # a pipe may take part of a write; the rest then raises BrokenPipeError
                view = view[out.write(view) or 0 :]
            done += n
    return 0


def cmd_map(a: argparse.Namespace) -> int:
    """``qblock map FILE``: extents as ``qemu-img map --output=json``."""
    with _image.open(a.filename, a.format, flags=0) as img:
        print(json.dumps([e.to_qemu_map() for e in img.map()], indent=1))
    return 0


def _bar(done: int, total: int) -> None:
    """``-p``: a progress line on stderr, redrawn in place, like qemu-img's."""
    pct = 100.0 * done / total if total else 100.0
    sys.stderr.write(f"\r    ({pct:.2f}/100%)")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_convert(a: argparse.Namespace) -> int:
    """``qblock convert [-f FMT] [-O FMT] [-o OPTS] [-B BACKING [-F FMT]] [-n] [-S SIZE] [-p] SRC... DST``."""
    if _wants_help(a.o):
        print(_options_help(options_class(_known_format(a.output_format))))
        return 0
    *sources, target = a.filenames
    if not sources:
        raise InvalidParamError("convert needs a source and a target")
    make: Optional[Callable[[int], ImageOptions]] = None
    if not a.existing:
        cls, kw = _option_args(a.output_format, a.o, a.backing, a.backing_format, None)
        make = (lambda n: cls(**kw)) if "virt_size" in kw else (lambda n: cls(**kw, virt_size=_tools._aligned(cls, n)))
    elif a.o or a.backing:
        raise InvalidParamError("-n writes into the existing target: -o and -B do not apply")
    _tools._convert(sources, target, make, source_format=a.format, sparse_size=parse_size(a.sparse_size),
                    compress=a.compress, start=0, length=None, threads=a.threads,
                    progress=_bar if a.progress else None)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """``qblock compare [-f FMT] [-F FMT] [-s] [-q] [-p] A B``: exit 0 identical, 1 different, 2 error."""
    r = _tools.compare(a.a, a.b, fmt_a=a.format, fmt_b=a.b_format, strict=a.strict,
                       progress=_bar if a.progress else None)
    if not a.quiet:
        if not a.strict and r.sizes[0] != r.sizes[1]:
            print("Warning: Image size mismatch!")
        print(r.message)
    return 0 if r.identical else 1


def cmd_checksum(a: argparse.Namespace) -> int:
    """``qblock checksum [-f FMT] [-p] FILE``: the format-independent content hash, then the file name."""
    print(f"{_tools.checksum(a.filename, a.format, progress=_bar if a.progress else None)}  {a.filename}")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    """``qblock check [-f FMT] [-r leaks|all] [--output human|json] [-q] FILE``.

    Exits as qemu-img check: 0 clean, 1 the check could not complete, 2
    corruptions, 3 leaks only, 63 the format cannot be checked. The findings
    go to stderr, the summary to stdout.
    """
    try:
        r = _check(a.filename, format=a.format, repair=a.repair)
    except UnsupportedError as e:
        if e.message.startswith("This image format does not support checks"):
            print("qblock: This image format does not support checks", file=sys.stderr)
            return 63
        raise
    except QBlockError as e:
        print(f"qblock: Check failed: {e.message}", file=sys.stderr)
        return 1
    for line in r.repair_messages:
        print(line, file=sys.stderr)
    if not a.quiet and a.output == "human":
        sys.stdout.write(r.repair_text())
        sys.stdout.flush()
    for line in r.messages:
        print(line, file=sys.stderr)
    if not a.quiet:
        if a.output == "json":
            print(json.dumps(r.to_qemu_json(), indent=4))
        else:
            sys.stdout.write(r.summary_text())
    if r.check_errors:
        print("qblock: Check failed", file=sys.stderr)
        return 1
    return 2 if r.corruptions else 3 if r.leaks else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qblock`` command."""
    p = argparse.ArgumentParser(prog="qblock", description="Create, inspect and edit disk images.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create an image")
    c.add_argument("-f", "--format", default="qcow2")
    c.add_argument("-o", action="append", default=[], help="key=value[,key=value...] format options; -o help lists them")
    c.add_argument("-b", "--backing")
    c.add_argument("-F", "--backing-format")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    c.set_defaults(func=cmd_create)
    i = sub.add_parser("info", help="print what an image says about itself")
    i.add_argument("-f", "--format")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("filename")
    i.set_defaults(func=cmd_info)
    w = sub.add_parser("write", help="write a byte pattern (or zeroes) into an image")
    w.add_argument("-f", "--format")
    w.add_argument("-P", "--pattern", type=lambda s: int(s, 0), default=0xCD)
    w.add_argument("-z", "--zero", action="store_true")
    w.add_argument("filename")
    w.add_argument("offset")
    w.add_argument("length")
    w.set_defaults(func=cmd_write)
    r = sub.add_parser("read", help="copy guest bytes to stdout")
    r.add_argument("-f", "--format")
    r.add_argument("filename")
    r.add_argument("offset")
    r.add_argument("length")
    r.set_defaults(func=cmd_read)
    m = sub.add_parser("map", help="print allocation like qemu-img map --output=json")
    m.add_argument("-f", "--format")
    m.add_argument("filename")
    m.set_defaults(func=cmd_map)
    cv = sub.add_parser("convert", help="copy an image (or several, concatenated) into a new one of any format")
    cv.add_argument("-f", "--format", help="format of the sources (default: probe)")
    cv.add_argument("-O", dest="output_format", default="raw", help="format of the target (default raw)")
    cv.add_argument("-o", action="append", default=[], help="target options key=value[,...]; -o help lists them")
    cv.add_argument("-B", dest="backing", help="make the target an overlay of this file; write only what differs")
    cv.add_argument("-F", dest="backing_format", help="format of the -B file")
    cv.add_argument("-n", dest="existing", action="store_true", help="the target exists: write into it")
    cv.add_argument("-S", dest="sparse_size", default="4k", help="zero runs this long become holes (default 4k; 0: none)")
    cv.add_argument("-c", dest="compress", action="store_true", help="compress the target (not built yet)")
    cv.add_argument("-m", dest="threads", type=int, default=0, help="worker threads (default: one per core)")
    cv.add_argument("-W", action="store_true", help="accepted for qemu-img compatibility; writes stay in order")
    cv.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    cv.add_argument("filenames", nargs="+", metavar="FILE", help="sources, then the target")
    cv.set_defaults(func=cmd_convert)
    cp = sub.add_parser("compare", help="compare guest content; exit 0 identical, 1 different, 2 error")
    cp.add_argument("-f", "--format", help="format of the first image")
    cp.add_argument("-F", dest="b_format", help="format of the second image")
    cp.add_argument("-s", dest="strict", action="store_true", help="strict: sizes and allocation must match too")
    cp.add_argument("-q", dest="quiet", action="store_true", help="print nothing; only the exit status tells")
    cp.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    cp.add_argument("a")
    cp.add_argument("b")
    cp.set_defaults(func=cmd_compare, error_status=2)
    ck = sub.add_parser("checksum", help="print the format-independent checksum of the guest content")
    ck.add_argument("-f", "--format")
    ck.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    ck.add_argument("filename")
    ck.set_defaults(func=cmd_checksum)
    cc = sub.add_parser("check", help="check an image's metadata (and repair it); exit 0 clean, 2 corrupt, 3 leaks")
    cc.add_argument("-f", "--format")
    cc.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair leaks, or all that can be repaired")
    cc.add_argument("--output", choices=("human", "json"), default="human")
    cc.add_argument("-q", dest="quiet", action="store_true", help="print no summary; only the exit status tells")
    cc.add_argument("filename")
    cc.set_defaults(func=cmd_check)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``qblock``; returns the exit status (1 with a message on a libqblock error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except QBlockError as e:
        print(f"qblock: {e.message}", file=sys.stderr)
        return int(getattr(args, "error_status", 1))
    except KeyboardInterrupt:
        print("qblock: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`qblock read ... | head`): stop quietly, as a
        # tool killed by SIGPIPE would (the shell reports 128 + 13). Point
        # stdout at /dev/null so the interpreter's final flush stays silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
