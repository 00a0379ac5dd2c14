"""The ``qblock`` command: qemu-img's jobs (create, info, map, convert, compare, check, commit, rebase,
resize, snapshot, measure, amend, dd) plus inspect, write, read and checksum, with its options and outputs."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from .amend import amend as _amend
from . import backing as _backing
from . import image as _image
from . import sizing as _sizing
from . import streams as _streams
from . import tools as _tools
from ._qemu_order import qemu_order
from .errors import InvalidParamError, OutOfRangeError, QBlockError, UnsupportedError
from .flags import O_CACHE_WB, O_RDWR
from .check import check as _check
from .formats import Format
from .options import ImageOptions, option_fields, options_class
from .safety import SafetyReport, inspect as _inspect
from .snapshot import SnapshotInfo

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
    t = str(cls.__dataclass_fields__[key].type).replace(" ", "")
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
    defaults = cls.__dataclass_fields__
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


def _info_dict(filename: str, fmt: Optional[str], force_share: bool = False) -> Dict[str, Any]:
    with _image.open(filename, fmt, flags=0, force_share=force_share) as img:
        i = img.info()
    d: Dict[str, Any] = {
        "filename": str(i.location),
        "format": i.format.value,
        "virtual-size": i.virt_size,
        "dirty-flag": i.dirty,
    }
    if i.encrypted:  # qemu-img leaves the key out for plain images
        d["encrypted"] = True
    if i.cluster_size is not None:
        d["cluster-size"] = i.cluster_size
    if i.actual_size is not None:
        d["actual-size"] = i.actual_size
    if i.backing_filename:
        d["backing-filename"] = i.backing_filename
        d["full-backing-filename"] = str(i.backing_location)
    if i.backing_format:
        d["backing-filename-format"] = i.backing_format.value
    if i.snapshots:
        d["snapshots"] = [s.to_qemu_info() for s in i.snapshots]
    if i.format_specific:
        d["format-specific"] = {"type": i.format.value, "data": i.format_specific}
    return d


def human_size(n: int) -> str:
    """A byte count as ``qemu-img info`` words it: three significant digits
    of the largest binary unit that keeps the number under about 1000."""
    exp = math.frexp(n * 1.024)[1] - 1 if n else 0  # floor(log2(n * 1.024))
    i = min(max(exp, 0) // 10, 6)
    return f"{n / (1 << (10 * i)):0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[i]}B"


def _human_value(key: str, v: Any, indent: str, out: List[str]) -> None:
    """One format-specific item as qemu-img's human output nests it."""
    name = key.replace("-", " ")
    if isinstance(v, dict):
        out.append(f"{indent}{name}:")
        for k, x in v.items():
            _human_value(k, x, indent + "    ", out)
    elif isinstance(v, list):
        out.append(f"{indent}{name}:")
        for n, x in enumerate(v):
            _human_value(f"[{n}]", x, indent + "    ", out)
    elif isinstance(v, bool):
        out.append(f"{indent}{name}: {'true' if v else 'false'}")
    else:
        out.append(f"{indent}{name}: {v}")


def human_info(d: Dict[str, Any]) -> str:
    """``qemu-img info``'s human text for one image's JSON dict (without the
    child-node section: the protocol layer is not a node here)."""
    out = [
        f"image: {d['filename']}",
        f"file format: {d['format']}",
        f"virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)",
        f"disk size: {human_size(d['actual-size']) if 'actual-size' in d else 'unavailable'}",
    ]
    if d.get("encrypted"):
        out.append("encrypted: yes")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no")
    if "backing-filename" in d:
        line = f"backing file: {d['backing-filename']}"
        if d.get("full-backing-filename", d["backing-filename"]) != d["backing-filename"]:
            line += f" (actual path: {d['full-backing-filename']})"
        out.append(line)
        if "backing-filename-format" in d:
            out.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        out.append(snapshot_table([SnapshotInfo.from_qemu_info(x) for x in d["snapshots"]]))
    fs = d.get("format-specific", {}).get("data")
    if fs:
        out.append("Format specific information:")
        for k, v in qemu_order(fs).items():
            _human_value(k, v, "    ", out)
    return "\n".join(out)


def _chain_dicts(a: argparse.Namespace) -> List[Dict[str, Any]]:
    """The info of the image and, with --backing-chain, of every image below it."""
    out = [_info_dict(a.filename, a.format, a.force_share)]
    while a.backing_chain and "full-backing-filename" in out[-1]:
        if len(out) > 64:
            raise InvalidParamError("the backing chain is deeper than 64 images")
        out.append(_info_dict(out[-1]["full-backing-filename"], out[-1].get("backing-filename-format"),
                              a.force_share))
    return out


def cmd_info(a: argparse.Namespace) -> int:
    """``qblock info [--output json] [--backing-chain] FILE``: what ``qemu-img info`` prints."""
    chain = _chain_dicts(a)
    if a.output == "json":
        print(json.dumps(qemu_order(chain if a.backing_chain else chain[0]), indent=4))
    else:
        print("\n\n".join(human_info(d) for d in chain))
    return 0


def human_inspect(r: SafetyReport) -> str:
    """The text ``qblock inspect`` prints: the image, then one line per reference."""
    lines = [f"image: {r.location.path if r.location.protocol == 'file' else r.location}",
             f"file format: {r.format}", f"virtual size: {r.virtual_size}"]
    feats = ", ".join(f"{k}={v}" for k, v in r.features.items() if not isinstance(v, (list, dict)))
    lines.append(f"features: {feats}")
    if not r.references:
        lines.append("references: none")
    for ref in r.references:
        facts = [
            "protocol " + ref.protocol if ref.protocol else ("absolute" if ref.absolute else "relative"),
            "inside" if ref.inside else "OUTSIDE",
            "exists" if ref.exists else "missing",
        ]
        where = ref.real_path or ref.location
        lines.append(f"{ref.kind}: {ref.name!r} -> {where} ({', '.join(facts)})")
    return "\n".join(lines) + "\n"


def cmd_inspect(a: argparse.Namespace) -> int:
    """``qblock inspect [-f FMT] [--allowed DIR]... [--output human|json] FILE``: exit 0 when every
    reference stays inside the image's folder (or an allowed one), 2 when one escapes."""
    r = _inspect(a.filename, allowed=a.allowed, fmt=a.format)
    if a.output == "json":
        print(json.dumps(r.to_json(), indent=4))
    else:
        sys.stdout.write(human_inspect(r))
    return 0 if r.confined else 2


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
    with _image.open(a.filename, a.format, flags=0, force_share=a.force_share) as img:
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


def _hex(n: int) -> str:
    """C's ``%#x``: no prefix on zero."""
    return f"{n:#x}" if n else "0"


def cmd_map(a: argparse.Namespace) -> int:
    """``qblock map [--output human|json|svg] FILE``: extents as ``qemu-img map``
    prints them, or (svg) a picture of the disk's allocation."""
    with _image.open(a.filename, a.format, flags=0, force_share=a.force_share) as img:
        if a.output == "svg":
            sys.stdout.write(img.render_map(a.cells))
            return 0
        extents = list(img.map())
    if a.output == "json":
        print(json.dumps([e.to_qemu_map() for e in extents], indent=1))
        return 0
    # The human table lists where data lies in which file, as qemu-img's.
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in extents:
        if not e.data:
            continue
        if e.file_offset is None or e.file is None:
            raise UnsupportedError("File contains external, encrypted or compressed clusters.")
        lines.append(f"{_hex(e.offset):<16}{_hex(e.length):<16}{_hex(e.file_offset):<16}{e.file}")
    print("\n".join(lines))
    return 0


def cmd_commit(a: argparse.Namespace) -> int:
    """``qblock commit [-f FMT] [-b BASE] [-d] [-p] FILE``."""
    _backing.commit(a.filename, format=a.format, base=a.base, keep=a.keep,
                    progress=_bar if a.progress else None)
    print("Image committed.")
    return 0


def cmd_rebase(a: argparse.Namespace) -> int:
    """``qblock rebase [-f FMT] -b BACKING [-F FMT] [-u] [-p] FILE``."""
    _backing.rebase(a.filename, a.backing, format=a.format, backing_format=a.backing_format,
                    unsafe=a.unsafe, progress=_bar if a.progress else None)
    return 0


def cmd_resize(a: argparse.Namespace) -> int:
    """``qblock resize [-f FMT] [--shrink] FILE [+|-]SIZE``."""
    text = a.size
    with _image.open(a.filename, a.format, flags=0) as img:
        old = img.virt_size
    if text[:1] in "+-":
        delta = parse_size(text[1:])
        new = old + delta if text[0] == "+" else old - delta
        if new < 0:
            raise InvalidParamError(f"the image is {old} bytes: it cannot shrink by {delta}")
    else:
        new = parse_size(text)
    if new < old:
        if not a.shrink:
            raise InvalidParamError("Use the --shrink option to perform a shrink operation.")
        print("qblock: warning: Shrinking an image will delete all data beyond the shrunken image's end.",
              file=sys.stderr)
    _tools.resize(a.filename, new, format=a.format, shrink=a.shrink)
    print("Image resized.")
    return 0


_FORCE_SHARE = "open even while another process (a VM) has the image open for writing, as qemu-img -U"


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
    if "-" in sources or target == "-":
        return _convert_stream(a, sources, target)
    make: Optional[Callable[[int], ImageOptions]] = None
    if not a.existing:
        cls, kw = _option_args(a.output_format, a.o, a.backing, a.backing_format, None)
        make = (lambda n: cls(**kw)) if "virt_size" in kw else (lambda n: cls(**kw, virt_size=_tools._aligned(cls, n)))
    elif a.o or a.backing:
        raise InvalidParamError("-n writes into the existing target: -o and -B do not apply")
    _tools._convert(sources, target, make, source_format=a.format, sparse_size=parse_size(a.sparse_size),
                    compress=a.compress, start=0, length=None, threads=a.threads,
                    progress=_bar if a.progress else None, sync=a.cache != "unsafe", force_share=a.force_share)
    return 0


def _convert_stream(a: argparse.Namespace, sources: List[str], target: str) -> int:
    """``-`` as the source (raw bytes on stdin) or the target (raw, qcow2 or streamOptimized vmdk to stdout)."""
    if target == "-":
        if a.existing:
            raise InvalidParamError("-n writes into an existing image: stdout is none")
        if "-" in sources:
            raise InvalidParamError("stdin and stdout cannot both be streams here; one side must be a file")
        cls, kw = _option_args(a.output_format, a.o, a.backing, a.backing_format, None)
        if cls.format is Format.VMDK:
            kw.setdefault("subformat", "streamOptimized")
        make = (lambda n: cls(**kw)) if "virt_size" in kw else (lambda n: cls(**kw, virt_size=_tools._aligned(cls, n)))
        out = getattr(sys.stdout.buffer, "raw", sys.stdout.buffer)
        _streams._to_stream(sources, out, make, source_format=a.format, start=0, length=None,
                            sparse_size=parse_size(a.sparse_size), compress=a.compress, threads=a.threads,
                            progress=_bar if a.progress else None, force_share=a.force_share)
        return 0
    if sources != ["-"] or (a.format or "raw") != "raw":
        raise InvalidParamError("reading stdin takes one source, -, of raw bytes (-f raw)")
    if a.existing or a.backing or a.compress:
        raise InvalidParamError("reading stdin makes a new image: -n, -B and -c do not apply")
    cls, kw = _option_args(a.output_format, a.o, None, None, None)
    kw.setdefault("virt_size", cls.size_alignment)  # the stream's length decides the size; -o size= a minimum
    _streams.convert_from_stream(sys.stdin.buffer, target, cls(**kw), sparse_size=parse_size(a.sparse_size),
                                 progress=None)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """``qblock compare [-f FMT] [-F FMT] [-s] [-q] [-p] A B``: exit 0 identical, 1 different, 2 error."""
    r = _tools.compare(a.a, a.b, fmt_a=a.format, fmt_b=a.b_format, strict=a.strict,
                       progress=_bar if a.progress else None, force_share=a.force_share)
    if not a.quiet:
        if not a.strict and r.sizes[0] != r.sizes[1]:
            print("Warning: Image size mismatch!")
        print(r.message)
    return 0 if r.identical else 1


def cmd_checksum(a: argparse.Namespace) -> int:
    """``qblock checksum [-f FMT] [-p] FILE``: the format-independent content hash, then the file name."""
    print(f"{_tools.checksum(a.filename, a.format, progress=_bar if a.progress else None, force_share=a.force_share)}"
          f"  {a.filename}")
    return 0


_SNAP_NS = 1_000_000_000


def _clock(nsec: int) -> str:
    """The VM clock as qemu-img prints it: hours (at least four digits), minutes, seconds, milliseconds."""
    secs = nsec // _SNAP_NS
    return f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{nsec // 1_000_000 % 1000:03d}"


#: qemu-img's columns: ID, TAG, VM_SIZE, DATE, VM_CLOCK, ICOUNT (printf widths -7, -16, 8, 19, 15, 10).
_ROW = "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}"


def snapshot_table(snapshots: Sequence[SnapshotInfo]) -> str:
    """The lines ``qemu-img snapshot -l`` prints for these snapshots (dates in local time)."""
    lines = ["Snapshot list:", _ROW.format("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        icount = "" if s.icount is None else str(s.icount)
        lines.append(_ROW.format(s.id, s.name, human_size(s.vm_state_size), date, _clock(s.vm_clock_nsec), icount))
    return "\n".join(lines)


def cmd_snapshot(a: argparse.Namespace) -> int:
    """``qblock snapshot [-f FMT] [-q] (-l | -c NAME | -a NAME | -d NAME) FILE``, as ``qemu-img snapshot``."""
    if a.list:
        with _image.open(a.filename, a.format, flags=0, force_share=a.force_share) as img:
            snaps = img.snapshots()
        if snaps:  # qemu-img prints nothing at all for an image without snapshots
            print(snapshot_table(snaps))
        return 0
    if a.force_share:
        raise InvalidParamError("-U (force share) only goes with -l: the other operations write the image")
    with _image.open(a.filename, a.format, flags=O_RDWR | O_CACHE_WB) as img:
        if a.create is not None:
            img.snapshot_create(a.create)
        elif a.apply is not None:
            img.snapshot_apply(a.apply)
        else:
            # qemu-img deletes by name only (an id does not name a snapshot here).
            match = next((s for s in img.snapshots() if s.name == a.delete), None)
            if match is None:
                raise InvalidParamError(f"Could not delete snapshot '{a.delete}': snapshot not found")
            img.snapshot_delete(match.id)
    return 0


def _dd_operands(words: List[str]) -> Dict[str, str]:
    """``key=value`` operands of ``qblock dd``, as dd(1) spells them."""
    out: Dict[str, str] = {}
    it = iter(words)
    for w in it:
        if w == "-U":
            out[w] = "on"
            continue
        if w in ("-f", "-O"):  # options may come between the operands, as in qemu-img
            out[w] = next(it, "")
            if not out[w]:
                raise InvalidParamError(f"option {w} needs a format")
            continue
        key, sep, val = w.partition("=")
        if not sep or key not in ("if", "of", "bs", "count", "skip"):
            raise InvalidParamError(f"unrecognized operand {w!r} (if=, of=, bs=, count=, skip=)")
        out[key] = val
    for key in ("if", "of"):
        if not out.get(key):
            raise InvalidParamError(f"dd needs {key}=FILE")
    return out


def cmd_dd(a: argparse.Namespace) -> int:
    """``qblock dd [-f FMT] [-O FMT] [bs=SIZE] [count=N] [skip=N] if=IN of=OUT``, as qemu-img dd.

    As qemu-img's, ``count`` ends the copy at ``count x bs`` bytes of the input
    from its start, and ``skip`` then drops ``skip x bs`` of them.
    """
    ops = _dd_operands(a.operands)
    a.format = ops.get("-f", a.format)
    a.output_format = ops.get("-O", a.output_format)
    a.force_share = a.force_share or "-U" in ops
    bs = parse_size(ops.get("bs", "512"))
    if bs <= 0:
        raise InvalidParamError("bs must be at least 1 byte")
    with _image.open(ops["if"], a.format, flags=0, force_share=a.force_share) as img:
        end = img.virt_size
    if "count" in ops:
        end = min(end, int(ops["count"]) * bs)
    skip = int(ops.get("skip", "0")) * bs
    if skip > end:
        raise InvalidParamError(f"{ops['if']}: cannot skip to specified offset")
    cls, kw = _option_args(a.output_format, [], None, None, None)
    _tools._convert([ops["if"]], ops["of"], lambda n: cls(**kw, virt_size=_tools._aligned(cls, n)),
                    source_format=a.format, sparse_size=4096, compress=False, start=skip,
                    length=end - skip, threads=0, progress=None, force_share=a.force_share)
    return 0


_AMEND_HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image (only the one recorded)
  backing_fmt=<str>      - Image format of the base image (only the one recorded)
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file (only the one recorded)
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image (off only)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size"""


def cmd_amend(a: argparse.Namespace) -> int:
    """``qblock amend [-f FMT] -o OPTS [-p] [-q] FILE``: change a qcow2 image's options in place."""
    if not a.o:
        raise InvalidParamError("Must specify options (-o)")
    if _wants_help(a.o):
        print(_AMEND_HELP)
        return 0
    back = {v: k for k, v in _QEMU_NAMES.items()}  # _parse_o's names back to qemu-img's
    opts = {back.get(k, k): v for k, v in _parse_o(a.o).items()}
    _amend(a.filename, opts, format=a.format, progress=_bar if a.progress and not a.quiet else None)
    return 0


def cmd_measure(a: argparse.Namespace) -> int:
    """``qblock measure [--output human|json] [-O FMT] [-o OPTS] (--size SIZE | [-f FMT] FILE)``."""
    if (a.size is None) == (a.filename is None):
        raise InvalidParamError("measure needs either --size or an image file, not both")
    fmt = _known_format(a.output_format)
    cls, kw = _option_args(a.output_format, a.o, None, None, None)
    fields = {**_sizing._defaults(fmt), **kw}
    r = _sizing._measure_with(fmt, fields, parse_size(a.size) if a.size is not None else None,
                               a.filename, a.format, a.force_share)
    if a.output == "json":
        print(json.dumps(r.to_qemu_json(), indent=4))
    else:
        print(f"required size: {r.required}\nfully allocated size: {r.fully_allocated}")
        if r.bitmaps is not None:
            print(f"bitmaps size: {r.bitmaps}")
    return 0
def cmd_check(a: argparse.Namespace) -> int:
    """``qblock check [-f FMT] [-r leaks|all] [--output human|json] [-q] FILE``.

    Exits as qemu-img check: 0 clean, 1 the check could not complete, 2
    corruptions, 3 leaks only, 63 the format cannot be checked. The findings
    go to stderr, the summary to stdout.
    """
    try:
        r = _check(a.filename, format=a.format, repair=a.repair, force_share=a.force_share)
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
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="print the library's log on stderr: warnings always, -v adds info, -vv debug")
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
    i.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("--backing-chain", action="store_true", help="also every image of the backing chain")
    i.add_argument("filename")
    i.set_defaults(func=cmd_info)
    ins = sub.add_parser("inspect", help="report the files an image names, opening none; exit 2 if one escapes")
    ins.add_argument("-f", "--format")
    ins.add_argument("--allowed", action="append", default=[], metavar="DIR",
                     help="a folder references may also resolve into (repeatable)")
    ins.add_argument("--output", choices=("human", "json"), default="human")
    ins.add_argument("filename")
    ins.set_defaults(func=cmd_inspect)
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
    r.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    r.add_argument("filename")
    r.add_argument("offset")
    r.add_argument("length")
    r.set_defaults(func=cmd_read)
    m = sub.add_parser("map", help="print allocation like qemu-img map")
    m.add_argument("-f", "--format")
    m.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    m.add_argument("--output", choices=("human", "json", "svg"), default="human")
    m.add_argument("--cells", type=int, default=4096, help="cells of the svg map (default 4096, 128 a row)")
    m.add_argument("filename")
    m.set_defaults(func=cmd_map)
    cv = sub.add_parser("convert", help="copy an image (or several, concatenated) into a new one of any format")
    cv.add_argument("-f", "--format", help="format of the sources (default: probe)")
    cv.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    cv.add_argument("-O", dest="output_format", default="raw", help="format of the target (default raw)")
    cv.add_argument("-o", action="append", default=[], help="target options key=value[,...]; -o help lists them")
    cv.add_argument("-B", dest="backing", help="make the target an overlay of this file; write only what differs")
    cv.add_argument("-F", dest="backing_format", help="format of the -B file")
    cv.add_argument("-n", dest="existing", action="store_true", help="the target exists: write into it")
    cv.add_argument("-S", dest="sparse_size", default="4k", help="zero runs this long become holes (default 4k; 0: none)")
    cv.add_argument("-c", dest="compress", action="store_true", help="store the data compressed (qcow2: zlib or zstd)")
    cv.add_argument("-m", dest="threads", type=int, default=0, help="worker threads (default: one per core)")
    cv.add_argument("-t", dest="cache", default="unsafe", choices=("unsafe", "writeback", "writethrough", "none", "directsync"),
                    help="target cache mode: unsafe (default, as qemu-img) leaves the copy to the page cache;"
                         " the others sync it before exiting")
    cv.add_argument("-W", action="store_true", help="accepted for qemu-img compatibility; writes stay in order")
    cv.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    cv.add_argument("filenames", nargs="+", metavar="FILE", help="sources, then the target")
    cv.set_defaults(func=cmd_convert)
    cp = sub.add_parser("compare", help="compare guest content; exit 0 identical, 1 different, 2 error")
    cp.add_argument("-f", "--format", help="format of the first image")
    cp.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    cp.add_argument("-F", dest="b_format", help="format of the second image")
    cp.add_argument("-s", dest="strict", action="store_true", help="strict: sizes and allocation must match too")
    cp.add_argument("-q", dest="quiet", action="store_true", help="print nothing; only the exit status tells")
    cp.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    cp.add_argument("a")
    cp.add_argument("b")
    cp.set_defaults(func=cmd_compare, error_status=2)
    ck = sub.add_parser("checksum", help="print the format-independent checksum of the guest content")
    ck.add_argument("-f", "--format")
    ck.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    ck.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    ck.add_argument("filename")
    ck.set_defaults(func=cmd_checksum)
    sn = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots (qcow2)")
    sn.add_argument("-f", "--format")
    sn.add_argument("-q", dest="quiet", action="store_true", help="accepted for qemu-img compatibility")
    op = sn.add_mutually_exclusive_group(required=True)
    op.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    op.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot of the current content")
    op.add_argument("-a", dest="apply", metavar="NAME", help="make the image read as this snapshot (id or name)")
    op.add_argument("-d", dest="delete", metavar="NAME", help="delete the snapshot with this name")
    sn.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE + " (with -l)")
    sn.add_argument("filename")
    sn.set_defaults(func=cmd_snapshot)
    cm = sub.add_parser("commit", help="write an overlay's data into its backing file, then empty it")
    cm.add_argument("-f", "--format")
    cm.add_argument("-b", dest="base", help="commit into this deeper image of the chain (implies -d)")
    cm.add_argument("-d", dest="keep", action="store_true", help="keep the overlay's data (do not empty it)")
    cm.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    cm.add_argument("filename")
    cm.set_defaults(func=cmd_commit)
    rb = sub.add_parser("rebase", help="put an image on another backing file (or none), keeping its content")
    rb.add_argument("-f", "--format")
    rb.add_argument("-b", dest="backing", required=True, help='the new backing file; "" for none')
    rb.add_argument("-F", dest="backing_format", help="its format (needed with a backing file)")
    rb.add_argument("-u", dest="unsafe", action="store_true", help="only change the recorded name; copy nothing")
    rb.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    rb.add_argument("filename")
    rb.set_defaults(func=cmd_rebase)
    rs = sub.add_parser("resize", help="change the virtual size")
    rs.add_argument("-f", "--format")
    rs.add_argument("--shrink", action="store_true", help="allow the image to get smaller (drops its end)")
    rs.add_argument("filename")
    rs.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    rs.set_defaults(func=cmd_resize)
    me = sub.add_parser("measure", help="the file size an image of a format and options would need")
    me.add_argument("-f", "--format", help="format of the source image")
    me.add_argument("-O", dest="output_format", default="raw", help="target format (default raw)")
    me.add_argument("-o", action="append", default=[], help="target options key=value[,...]")
    me.add_argument("--size", help="measure a new, empty disk of this size instead of an image")
    me.add_argument("--output", choices=("human", "json"), default="human")
    me.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    me.add_argument("filename", nargs="?")
    me.set_defaults(func=cmd_measure)
    am = sub.add_parser("amend", help="change a qcow2 image's compat level, lazy refcounts or refcount width in place")
    am.add_argument("-f", "--format", help="format of the image (default: probe)")
    am.add_argument("-o", action="append", default=[], help="key=value[,...] options to change; -o help lists them")
    am.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    am.add_argument("-q", dest="quiet", action="store_true", help="quiet: no progress")
    am.add_argument("filename")
    am.set_defaults(func=cmd_amend)
    dd = sub.add_parser("dd", help="copy part of an image into a new one, dd style (bs=, count=, skip=, if=, of=)")
    dd.add_argument("-f", "--format", help="format of the input")
    dd.add_argument("-O", dest="output_format", default="raw", help="format of the output (default raw)")
    dd.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    dd.add_argument("operands", nargs=argparse.REMAINDER, metavar="KEY=VALUE")
    dd.set_defaults(func=cmd_dd)
    cc = sub.add_parser("check", help="check an image's metadata (and repair it); exit 0 clean, 2 corrupt, 3 leaks")
    cc.add_argument("-f", "--format")
    cc.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair leaks, or all that can be repaired")
    cc.add_argument("--output", choices=("human", "json"), default="human")
    cc.add_argument("-q", dest="quiet", action="store_true", help="print no summary; only the exit status tells")
    cc.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE + " (not with -r)")
    cc.add_argument("filename")
    cc.set_defaults(func=cmd_check)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``qblock``; returns the exit status (1 with a message on a libqblock error)."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("libqblock")
    level = logger.level
    handler = _log_to_stderr(args.verbose)
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
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _log_to_stderr(verbosity: int) -> logging.Handler:
    """Show the ``libqblock`` log on stderr for this run, as qemu-img shows its warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qblock: %(levelname)s: %(message)s"))
    handler.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
    if verbosity <= 0:
        # `check` prints what it repaired in qemu-img's words already.
        handler.addFilter(lambda r: not r.name.startswith("libqblock.check"))
    logger = logging.getLogger("libqblock")
    logger.addHandler(handler)
    if verbosity > 0 and logger.getEffectiveLevel() > handler.level:
        logger.setLevel(handler.level)
    return handler


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
