"""The ``qblock`` command: create, info, write, read and map images."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Type

from . import image as _image
from .errors import InvalidParamError, QBlockError
from .flags import O_CACHE_WB, O_RDWR
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


def cmd_create(a: argparse.Namespace) -> int:
    """``qblock create [-f FMT] [-o OPTS] [-b BACKING [-F FMT]] FILE [SIZE]``."""
    fmt = Format.from_str(a.format)
    if fmt is Format.NONE:
        raise InvalidParamError(f"unknown format {a.format!r}")
    cls = options_class(fmt)
    if any(group.split(",")[0] == "help" for group in a.o):
        print(_options_help(cls))
        return 0
    kw: Dict[str, Any] = {k: _coerce(cls, k, v) for k, v in _parse_o(a.o).items()}
    if a.backing:
        kw["backing"] = a.backing
    if a.backing_format:
        kw["backing_fmt"] = _coerce(cls, "backing_fmt", a.backing_format)
    if a.size:
        kw["virt_size"] = parse_size(a.size)
    if "virt_size" not in kw and "backing" not in kw:
        raise InvalidParamError("creating an image needs a size (or a backing file to take it from)")
    _image.create(a.filename, cls(**kw))
    return 0


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


def cmd_read(a: argparse.Namespace) -> int:
    """``qblock read FILE OFFSET LENGTH``: the guest bytes, raw, on stdout."""
    with _image.open(a.filename, a.format, flags=0) as img:
        sys.stdout.buffer.write(img.read(parse_size(a.length), parse_size(a.offset)))
    return 0


def cmd_map(a: argparse.Namespace) -> int:
    """``qblock map FILE``: extents as ``qemu-img map --output=json``."""
    with _image.open(a.filename, a.format, flags=0) as img:
        print(json.dumps([e.to_qemu_map() for e in img.map()], indent=1))
    return 0


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
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``qblock``; returns the exit status (1 with a message on a libqblock error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except QBlockError as e:
        print(f"qblock: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
