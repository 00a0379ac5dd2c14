#!/usr/bin/env python3
"""libqblock side by side with its anchors: sequential and random reads, allocating writes.

One run builds the data (a qcow2 with 64 KiB clusters, ~60% random data, plus its
raw and zlib-compressed copies), measures every reader in its own subprocess with a
warm page cache, checks that every reader returned the same bytes, and prints each
figure, its ratio to the section's anchor and the reader's peak RSS. See
benches/README.md for what each row means and how to run it.

    python benches/bench_read.py                 # 2 GiB, the real thing (~10 min)
    python benches/bench_read.py --size 256M     # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as bl  # noqa: E402

SCRIPT = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(SCRIPT))

# --------------------------------------------------------------------------
# Worker side: runs in a fresh interpreter per measurement, imports only the
# reader it measures, prints one JSON line.


class Access:
    """What one reader offers; the loops below pick the fastest fitting call shape.

    read_at(length, offset) and readinto_at(buffer, offset) are positional APIs;
    stream is a file-like object (seek/read/readinto); fd is for os.pread(v).
    """

    def __init__(self) -> None:
        self.read_at: Optional[Callable[[int, int], bytes]] = None
        self.readinto_at: Optional[Callable[[Any, int], int]] = None
        self.stream: Any = None
        self.fd: Optional[int] = None
        self.host_of: Optional[Callable[[int], Optional[int]]] = None  # guest -> file offset (hostpread)
        self.keep: List[Any] = []  # objects that must stay alive


class Unsupported(Exception):
    pass


def _host_offset(img: Any, own: str, offset: int) -> Optional[int]:
    """Where the 4 KiB guest read at ``offset`` lies in the image file ``own``, if in one piece of data there."""
    st = img.block_status(offset, bl.RANDOM_LEN)
    if st.data and st.length >= bl.RANDOM_LEN and st.file_offset is not None and st.file == own:
        return int(st.file_offset)
    return None


def open_reader(reader: str, path: str, fmt: str) -> Access:
    a = Access()
    if reader == "python":
        f = open(path, "rb", buffering=0)  # FileIO: no BufferedReader copy
        a.stream, a.fd = f, f.fileno()
        a.keep.append(f)
    elif reader == "libqblock":
        import libqblock

        try:
            img = libqblock.open(path, fmt=fmt, flags=libqblock.O_CACHE_WB)  # read-only
        except libqblock.UnsupportedError as e:
            raise Unsupported(str(e)) from e
        a.read_at, a.readinto_at = img.read, img.readinto
        a.keep.append(img)
    elif reader == "hostpread":
        # The floor for any pread-based reader of this file: os.pread at the
        # host offsets libqblock maps each read to (reads that land in holes
        # need no I/O and are left out). Set up by the worker, untimed.
        import libqblock

        img = libqblock.open(path, fmt=fmt, flags=0)
        f = open(path, "rb", buffering=0)
        a.fd = f.fileno()
        a.keep += [img, f]
        own = img.info().location.target  # reads mapped into other files (extents) are left out
        a.host_of = lambda o: _host_offset(img, own, o)
    elif reader == "pyqcow":
        import pyqcow

        q = pyqcow.file()
        q.open(path)
        a.read_at = q.read_buffer_at_offset  # (size, offset)
        a.keep.append(q)
    elif reader == "pyvmdk":
        import pyvmdk

        v = pyvmdk.handle()
        v.open(path)
        v.open_extent_data_files()
        a.read_at = v.read_buffer_at_offset
        a.keep.append(v)
    elif reader == "pyvhdi":
        import pyvhdi

        v = pyvhdi.file()
        v.open(path)
        a.read_at = v.read_buffer_at_offset
        a.keep.append(v)
    elif reader == "pykeramics":
        from pykeramics import vfs

        layer = {"qcow2": vfs.VfsType.QCOW, "vpc": vfs.VfsType.VHD, "vhdx": vfs.VfsType.VHDX}.get(fmt)
        if layer is None:
            raise Unsupported(f"pykeramics has no {fmt} layer")
        base = vfs.VfsLocation.new_base_from_string(vfs.VfsType.OS, path)
        resolver = vfs.VfsResolver()
        fs = resolver.open_file_system(base.new_with_layer_from_string(layer, "/"))
        name = fs.get_root_file_entry().get_sub_file_entry_by_index(0).name.to_string()
        entry = resolver.get_file_entry_by_location(base.new_with_layer_from_string(layer, "/" + name))
        a.stream = entry.get_data_stream()  # seek(offset), read(size)
        a.keep += [resolver, fs, entry]
    elif reader == "dissect":
        fh = open(path, "rb")
        a.keep.append(fh)
        if fmt == "qcow2":
            from dissect.hypervisor.disk.qcow2 import QCow2

            a.stream = QCow2(fh).open()
        elif fmt == "vdi":
            from dissect.hypervisor.disk.vdi import VDI

            a.stream = VDI(fh).open()
        else:
            from dissect.hypervisor.disk import vhd, vhdx, vmdk

            a.stream = {"vmdk": vmdk.VMDK, "vpc": vhd.VHD, "vhdx": vhdx.VHDX}[fmt](fh)
    else:
        raise ValueError(reader)
    return a


def seq_pass(a: Access, mode: str, size: int, h: Any = None) -> bool:
    """One sequential pass in 1 MiB chunks; with ``h``, hash what came back.

    Returns False if a call came back short. The timed passes (h None) keep the
    loop bodies to the bare call so that loop overhead is the same for everyone.
    """
    ch = bl.CHUNK
    n = size // ch
    if mode == "read":
        if a.read_at is not None:
            read_at = a.read_at
            if h is None:
                for off in range(0, size, ch):
                    read_at(ch, off)
                return True
            for off in range(0, size, ch):
                b = read_at(ch, off)
                h.update(b)
                if len(b) != ch:
                    return False
            return True
        s = a.stream
        s.seek(0)
        read = s.read
        if h is None:
            for _ in range(n):
                read(ch)
            return True
        for _ in range(n):
            b = read(ch)
            h.update(b)
            if len(b) != ch:
                return False
        return True
    # readinto into one reused buffer
    buf = bytearray(ch)
    if a.readinto_at is not None:
        readinto_at = a.readinto_at
        if h is None:
            for off in range(0, size, ch):
                readinto_at(buf, off)
            return True
        for off in range(0, size, ch):
            got = readinto_at(buf, off)
            h.update(buf)
            if got != ch:
                return False
        return True
    s = a.stream
    if s is None or not hasattr(s, "readinto"):
        raise Unsupported("no readinto")
    s.seek(0)
    readinto = s.readinto
    if h is None:
        for _ in range(n):
            readinto(buf)
        return True
    for _ in range(n):
        got = readinto(buf)
        h.update(buf)
        if got != ch:
            return False
    return True


def rand_pass(a: Access, mode: str, offsets: List[int], h: Any = None) -> bool:
    """One pass of 4 KiB reads at ``offsets``; with ``h``, hash the results in order."""
    n = bl.RANDOM_LEN
    if mode == "read":
        if a.fd is not None:
            pread, fd = os.pread, a.fd
            if h is None:
                for o in offsets:
                    pread(fd, n, o)
                return True
            ok = True
            for o in offsets:
                b = pread(fd, n, o)
                h.update(b)
                ok &= len(b) == n
            return ok
        if a.read_at is not None:
            read_at = a.read_at
            if h is None:
                for o in offsets:
                    read_at(n, o)
                return True
            ok = True
            for o in offsets:
                b = read_at(n, o)
                h.update(b)
                ok &= len(b) == n
            return ok
        seek, read = a.stream.seek, a.stream.read
        if h is None:
            for o in offsets:
                seek(o)
                read(n)
            return True
        ok = True
        for o in offsets:
            seek(o)
            b = read(n)
            h.update(b)
            ok &= len(b) == n
        return ok
    buf = bytearray(n)
    if a.fd is not None:
        preadv, fd, bufs = os.preadv, a.fd, [buf]
        if h is None:
            for o in offsets:
                preadv(fd, bufs, o)
            return True
        ok = True
        for o in offsets:
            ok &= preadv(fd, bufs, o) == n
            h.update(buf)
        return ok
    if a.readinto_at is None:
        raise Unsupported("no positional readinto")
    readinto_at = a.readinto_at
    if h is None:
        for o in offsets:
            readinto_at(buf, o)
        return True
    ok = True
    for o in offsets:
        ok &= readinto_at(buf, o) == n
        h.update(buf)
    return ok


def write_pass(path: str, offsets: List[int]) -> float:
    """Allocating 4 KiB writes into a fresh qcow2, then flush: the same writes as qemu-io's."""
    import libqblock

    pats = [bytes([i % 251 + 1]) * bl.RANDOM_LEN for i in range(251)]
    seq = [pats[i % 251] for i in range(len(offsets))]
    os.sync()  # start from clean page cache, untimed (qemu-io gets the same)
    gc.disable()
    t0 = time.perf_counter()
    try:
        img = libqblock.open(path, fmt="qcow2")  # O_RDWR | O_CACHE_WB: writeback, like qemu-io -t writeback
    except libqblock.UnsupportedError as e:
        raise Unsupported(str(e)) from e
    write = img.write
    for o, p in zip(offsets, seq):
        write(p, o)
    img.flush()
    img.close()
    dt = time.perf_counter() - t0
    gc.enable()
    return dt


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    kind = spec["kind"]
    out: Dict[str, Any] = {"status": "ok"}
    try:
        if kind == "idle":
            out["times"] = []
        elif kind == "write":
            offsets = bl.load_offsets(spec["offsets"])
            out["times"] = [write_pass(p, offsets) for p in spec["images"]]
        else:
            a = open_reader(spec["reader"], spec["path"], spec["fmt"])
            mode = spec["mode"]
            h = bl.new_hash()
            if kind == "seq":
                size = spec["size"]
                full = seq_pass(a, mode, size, h)  # verify pass, also warms every cache
                run: Callable[[], Any] = lambda: seq_pass(a, mode, size)
            else:
                offsets = bl.load_offsets(spec["offsets"])
                if a.host_of is not None:
                    mapped = [a.host_of(o) for o in offsets]
                    offsets = [m for m in mapped if m is not None]
                    out["reads"] = len(offsets)
                full = rand_pass(a, mode, offsets, h)
                run = lambda: rand_pass(a, mode, offsets)
            out["digest"] = h.hexdigest()
            out["short"] = not full
            times: List[float] = []
            # Up to `repeat` timed runs; a slow reader stops once it has spent
            # `budget` seconds, so a 20 MB/s reader does not take half an hour.
            while len(times) < spec["repeat"] and (not times or sum(times) < spec["budget"]):
                gc.disable()
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
                gc.enable()
            out["times"] = times
    except ImportError as e:
        return {"status": "missing", "message": str(e)}
    except Unsupported as e:
        return {"status": "unsupported", "message": str(e)}
    except Exception as e:  # reported in the table, not a crash of the whole run
        if type(e).__name__ == "UnsupportedError":  # libqblock's, raised past open
            return {"status": "unsupported", "message": str(e)}
        return {"status": "error", "message": f"{type(e).__name__}: {e}"}
    out["maxrss_kib"] = bl.peak_rss_kib()
    return out


# --------------------------------------------------------------------------
# Driver side


@dataclass
class Case:
    section: str
    label: str
    image: str  # "qcow2", "raw", "zlib"
    kind: str  # seq, rand, write, cmd-null, cmd-raw, cmd-io
    reader: str = ""
    mode: str = ""
    anchor: bool = False
    result: Dict[str, Any] = field(default_factory=dict)


SEQ = "Sequential read, 1 MiB chunks"
ZLIB = "Sequential read of the zlib-compressed copy, 1 MiB chunks"
RAND = "Random 4 KiB reads"
WRITE = "Allocating 4 KiB writes, then flush"

#: The other formats' copies (benches/_benchlib.FORMAT_COPIES) and the peers that read each.
FORMAT_PEERS: Dict[str, List[tuple]] = {
    "vmdk": [("pyvmdk", "libvmdk-python read_buffer_at_offset"), ("dissect", "dissect.hypervisor")],
    "vpc": [("pyvhdi", "libvhdi-python read_buffer_at_offset"), ("pykeramics", "pykeramics"),
            ("dissect", "dissect.hypervisor")],
    "vdi": [("dissect", "dissect.hypervisor")],
    "vhdx": [("pyvhdi", "libvhdi-python read_buffer_at_offset"), ("pykeramics", "pykeramics"),
             ("dissect", "dissect.hypervisor")],
}
QEMU_IO_RAND = "qemu-io read (commands on stdin, one process)"
HOST_PREAD = "floor: os.pread of the image file at the mapped offsets"


def fmt_seq(fmt: str) -> str:
    return f"Sequential read of the {fmt} copy, 1 MiB chunks"


def fmt_rand(fmt: str) -> str:
    return f"Random 4 KiB reads of the {fmt} copy"


def format_of(image: str) -> str:
    """The format libqblock and qemu-img are told for a data-set image."""
    return {"raw": "raw", "qcow2": "qcow2", "zlib": "qcow2"}.get(image, image)


def is_rate(section: str) -> bool:
    return section.startswith("Sequential")


def all_cases() -> List[Case]:
    c: List[Case] = []
    c += [
        Case(SEQ, "Python FileIO.read", "raw", "seq", "python", "read", anchor=True),
        Case(SEQ, "Python FileIO.readinto", "raw", "seq", "python", "readinto"),
        Case(SEQ, "libqblock read", "qcow2", "seq", "libqblock", "read"),
        Case(SEQ, "libqblock readinto", "qcow2", "seq", "libqblock", "readinto"),
        Case(SEQ, "libqblock read", "raw", "seq", "libqblock", "read"),
        Case(SEQ, "libqblock readinto", "raw", "seq", "libqblock", "readinto"),
        Case(SEQ, "libqcow-python read_buffer_at_offset", "qcow2", "seq", "pyqcow", "read"),
        Case(SEQ, "pykeramics read", "qcow2", "seq", "pykeramics", "read"),
        Case(SEQ, "dissect.hypervisor read", "qcow2", "seq", "dissect", "read"),
        Case(SEQ, "dissect.hypervisor readinto", "qcow2", "seq", "dissect", "readinto"),
        Case(SEQ, "qemu-img convert -> null-co", "qcow2", "cmd-null"),
        Case(SEQ, "qemu-img convert -> raw file", "qcow2", "cmd-raw"),
        Case(SEQ, "qemu-img convert -> null-co", "raw", "cmd-null"),
    ]
    c += [
        Case(ZLIB, "qemu-img convert -> null-co", "zlib", "cmd-null", anchor=True),
        Case(ZLIB, "qemu-img convert -> raw file", "zlib", "cmd-raw"),
        Case(ZLIB, "libqblock read", "zlib", "seq", "libqblock", "read"),
        Case(ZLIB, "libqblock readinto", "zlib", "seq", "libqblock", "readinto"),
        Case(ZLIB, "libqcow-python read_buffer_at_offset", "zlib", "seq", "pyqcow", "read"),
        Case(ZLIB, "pykeramics read", "zlib", "seq", "pykeramics", "read"),
        Case(ZLIB, "dissect.hypervisor read", "zlib", "seq", "dissect", "read"),
    ]
    c += [
        Case(RAND, "os.pread", "raw", "rand", "python", "read", anchor=True),
        Case(RAND, "os.preadv (into one buffer)", "raw", "rand", "python", "readinto"),
        Case(RAND, "libqblock read", "qcow2", "rand", "libqblock", "read"),
        Case(RAND, "libqblock readinto", "qcow2", "rand", "libqblock", "readinto"),
        Case(RAND, "libqblock read", "raw", "rand", "libqblock", "read"),
        Case(RAND, "libqcow-python read_buffer_at_offset", "qcow2", "rand", "pyqcow", "read"),
        Case(RAND, "pykeramics seek+read", "qcow2", "rand", "pykeramics", "read"),
        Case(RAND, "dissect.hypervisor seek+read", "qcow2", "rand", "dissect", "read"),
        Case(RAND, QEMU_IO_RAND, "qcow2", "cmd-io-rand"),
    ]
    for fmt, peers in FORMAT_PEERS.items():
        seq, rand = fmt_seq(fmt), fmt_rand(fmt)
        c += [
            Case(seq, "qemu-img convert -> null-co", fmt, "cmd-null", anchor=True),
            Case(seq, "libqblock read", fmt, "seq", "libqblock", "read"),
            Case(seq, "libqblock readinto", fmt, "seq", "libqblock", "readinto"),
        ]
        c += [Case(seq, f"{label} read" if "read_" not in label else label, fmt, "seq", r, "read")
              for r, label in peers]
        c += [
            Case(rand, "os.pread (raw copy)", "raw", "rand", "python", "read", anchor=True),
            Case(rand, "libqblock read", fmt, "rand", "libqblock", "read"),
            Case(rand, "libqblock readinto", fmt, "rand", "libqblock", "readinto"),
        ]
        c += [Case(rand, f"{label} seek+read" if "read_" not in label else label, fmt, "rand", r, "read")
              for r, label in peers]
        c.append(Case(rand, QEMU_IO_RAND, fmt, "cmd-io-rand"))
        c.append(Case(rand, HOST_PREAD, fmt, "rand", "hostpread", "read"))
    c += [
        Case(WRITE, "qemu-io -t writeback (one process)", "qcow2", "cmd-io", anchor=True),
        Case(WRITE, "qemu-io start-up alone (open, flush, exit)", "qcow2", "cmd-io0"),
        Case(WRITE, "libqblock write", "qcow2", "write", "libqblock"),
    ]
    return c


def _image_path(ds: bl.Dataset, image: str) -> str:
    own = {"raw": ds.raw, "qcow2": ds.qcow2, "zlib": ds.zlib}.get(image)
    return own if own is not None else bl.format_copy(ds, image, log=lambda m: print(m, flush=True))


def _fresh_qcow2(path: str, size: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={bl.CLUSTER}", path, str(size)],
        check=True,
    )


def _summarize_cmd(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return bad[0]
    return {
        "status": "ok",
        "times": [r["seconds"] for r in runs],
        "maxrss_kib": max(r["maxrss_kib"] for r in runs),
        "rss_exact": all(r["rss_exact"] for r in runs),
    }


def run_case(case: Case, ds: bl.Dataset, args: argparse.Namespace) -> Dict[str, Any]:
    d = ds.dir
    fmt = format_of(case.image)
    src = _image_path(ds, case.image)
    if case.kind in ("seq", "rand"):
        spec = {
            "kind": case.kind, "reader": case.reader, "mode": case.mode, "path": src, "fmt": fmt,
            "size": ds.size, "offsets": ds.offsets, "repeat": args.repeat, "budget": args.budget,
        }
        r = bl.run_worker(SCRIPT, spec)
        if r["status"] == "ok" and case.reader == "hostpread":
            r["check"] = f"{r['reads']:,} reads in data"  # holes need no I/O: not the same reads
        elif r["status"] == "ok":
            want = ds.seq_digest if case.kind == "seq" else ds.rand_digest
            r["check"] = "ok" if r["digest"] == want and not r["short"] else "WRONG"
        return r
    if case.kind == "cmd-null":
        argv = ["qemu-img", "convert", "-f", fmt, "-n", src, "--target-image-opts", f"driver=null-co,size={ds.size}"]
        r = _summarize_cmd([bl.run_timed_command(argv, d) for _ in range(args.repeat)])
        r["check"] = "n/a"  # nothing comes out; the -> raw file row checks the same read path
        return r
    if case.kind == "cmd-raw":
        out = os.path.join(d, "convert-out.raw")
        argv = ["qemu-img", "convert", "-f", fmt, "-O", "raw", src, out]
        runs, check = [], "ok"
        for i in range(args.repeat):
            bl.remove_and_sync(out)
            runs.append(bl.run_timed_command(argv, d))
            if i == 0 and runs[-1]["status"] == "ok":
                check = "ok" if bl.hash_file(out) == ds.seq_digest else "WRONG"
        bl.remove_and_sync(out)
        r = _summarize_cmd(runs)
        r["check"] = check
        return r
    if case.kind == "cmd-io-rand":
        # qemu-io's own read loop: one process, one read per line on stdin (start-up included)
        script = os.path.join(d, "qemu-io-random-reads.txt")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.writelines(f"read -q {o} {bl.RANDOM_LEN}\n" for o in bl.load_offsets(ds.offsets))
        argv = ["qemu-io", "-r", "-t", "writeback", "-f", fmt, src]
        r = _summarize_cmd([bl.run_timed_command(argv, d, stdin=script) for _ in range(args.repeat)])
        r["check"] = "n/a"  # qemu-io prints no data; the libqblock rows are checked
        return r
    offsets = bl.load_offsets(ds.write_offsets)
    ref = os.path.join(d, "written-by-qemu-io.qcow2")
    if case.kind in ("cmd-io", "cmd-io0"):
        target = ref if case.kind == "cmd-io" else os.path.join(d, "qemu-io-startup.qcow2")
        cmds: List[str] = []
        if case.kind == "cmd-io":
            for i, o in enumerate(offsets):
                cmds += ["-c", f"write -q -P {i % 251 + 1} {o} 4k"]
        cmds += ["-c", "flush"]
        argv = ["qemu-io", "-t", "writeback", "-f", "qcow2", target, *cmds]
        runs = []
        for _ in range(args.repeat):
            _fresh_qcow2(target, ds.size)
            os.sync()
            runs.append(bl.run_timed_command(argv, d))
        r = _summarize_cmd(runs)
        r["check"] = "n/a" if case.kind == "cmd-io0" else _qemu_check(ref)
        if case.kind == "cmd-io0":
            bl.remove_and_sync(target)
        return r
    # libqblock writes: one fresh image per repeat, all made up front by qemu-img
    images = [os.path.join(d, f"written-by-libqblock-{i}.qcow2") for i in range(args.repeat)]
    for p in images:
        _fresh_qcow2(p, ds.size)
    r = bl.run_worker(SCRIPT, {"kind": "write", "images": images, "offsets": ds.write_offsets})
    if r["status"] == "ok":
        if not os.path.exists(ref):  # the qemu-io row was filtered out: make the reference
            _fresh_qcow2(ref, ds.size)
            cmds = []
            for i, o in enumerate(offsets):
                cmds += ["-c", f"write -q -P {i % 251 + 1} {o} 4k"]
            subprocess.run(["qemu-io", "-t", "writeback", "-f", "qcow2", ref, *cmds], check=True,
                           stdout=subprocess.DEVNULL)
        c = _qemu_check(images[0])
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", ref, images[0]]).returncode
        r["check"] = "ok" if c == "ok" and same == 0 else ("WRONG" if same else c)
    for p in images:
        bl.remove_and_sync(p)
    return r


def _qemu_check(path: str) -> str:
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True, text=True)
    return "ok" if p.returncode == 0 else "WRONG (qemu-img check)"


# --------------------------------------------------------------------------
# Report


def _figure(case: Case, ds: bl.Dataset) -> Optional[float]:
    """GB/s for sequential sections, seconds otherwise; best of the repeats."""
    r = case.result
    if r.get("status") != "ok" or not r.get("times"):
        return None
    t = min(r["times"])
    if is_rate(case.section):
        return ds.size / t / 1e9
    return t


def _ratio(case: Case, anchor: Optional[Case], ds: bl.Dataset) -> Optional[float]:
    f = _figure(case, ds)
    fa = _figure(anchor, ds) if anchor else None
    if f is None or fa is None:
        return None
    # rates: speed / anchor speed (higher is better); times: time / anchor time (lower is better)
    return f / fa


def build_rows(cases: List[Case], ds: bl.Dataset, args: argparse.Namespace) -> Dict[str, List[List[str]]]:
    sections: Dict[str, List[List[str]]] = {}
    for sec in dict.fromkeys(c.section for c in cases):
        sc = [c for c in cases if c.section == sec]
        if not sc:
            continue
        anchor = next((c for c in sc if c.anchor), None)
        rows = []
        for c in sc:
            r = c.result
            st = r.get("status", "skipped")
            if st == "ok":
                f = _figure(c, ds)
                fig = f"{f:.2f} GB/s" if is_rate(sec) else f"{f:.3f} s"
                ratio = _ratio(c, anchor, ds)
                rat = "anchor" if c.anchor else (f"{ratio:.2f}x" if ratio is not None else "-")
                rss = f"{r['maxrss_kib'] / 1024:.0f} MiB" + ("" if r.get("rss_exact", True) else " (<=)")
                lo, hi = min(r["times"]), max(r["times"])
                spread = f"+{(hi / lo - 1) * 100:.0f}% ({len(r['times'])})"
                chk = r.get("check", "n/a")
            else:
                fig, rat, rss, spread = st, "-", "-", ""
                chk = (r.get("message") or "")[:60]
            rows.append([c.label, c.image, fig, rat, rss, spread, chk])
        sections[sec] = rows
    return sections


def section_note(sec: str) -> str:
    if is_rate(sec):
        return "figure = virtual size / best time; ratio = speed / anchor speed (higher is better)"
    if sec == WRITE:
        return "figure = best time, open to flush; ratio = time / anchor time (lower is better)"
    return "figure = best time for all reads; ratio = time / anchor time (lower is better)"


def _fastest_peer(cases: List[Case], sec: str, fig: Callable[[Case], Optional[float]], higher: bool) -> Optional[float]:
    """The best figure of the section's other readers (peers and qemu-io), counting only rows that read right."""
    figs = [
        f for c in cases
        if c.section == sec and not c.anchor and c.reader not in ("libqblock", "python", "hostpread")
        and c.kind != "cmd-null" and c.result.get("check") in ("ok", "n/a")
        for f in [fig(c)] if f is not None
    ]
    if not figs:
        return None
    return max(figs) if higher else min(figs)


def targets(cases: List[Case], ds: bl.Dataset) -> List[str]:
    def find(sec: str, label: str, image: str) -> Optional[Case]:
        return next((c for c in cases if c.section == sec and c.label == label and c.image == image), None)

    def fig(c: Optional[Case]) -> Optional[float]:
        return _figure(c, ds) if c else None

    out = []

    def line(name: str, value: Optional[float], goal: Optional[float], higher: bool, fmt: str) -> None:
        if value is None or goal is None:
            out.append(f"n/a     {name}: not measured (see the table)")
            return
        met = value >= goal if higher else value <= goal
        out.append(f"{'MET   ' if met else 'MISSED'}  {name}: {fmt.format(value=value, goal=goal)}")

    py = fig(find(SEQ, "Python FileIO.read", "raw"))
    lq = fig(find(SEQ, "libqblock readinto", "qcow2"))
    qi = fig(find(SEQ, "qemu-img convert -> null-co", "qcow2"))
    line("sequential readinto >= 0.8x plain-Python raw read", lq, py * 0.8 if py else None, True,
         "{value:.2f} GB/s vs 0.8 x Python = {goal:.2f} GB/s")
    line("sequential readinto >= qemu-img's read path", lq, qi, True, "{value:.2f} GB/s vs {goal:.2f} GB/s")
    pr = fig(find(RAND, "os.pread", "raw"))
    lr = fig(find(RAND, "libqblock read", "qcow2"))
    line("random 4 KiB read within 1.2x os.pread", lr, pr * 1.2 if pr else None, False,
         "{value:.3f} s vs 1.2 x os.pread = {goal:.3f} s")
    peers: List[float] = [
        f for c in cases
        if c.section == RAND and c.reader in ("pyqcow", "pykeramics", "dissect") and c.result.get("check") == "ok"
        for f in [fig(c)] if f is not None
    ]
    line("random 4 KiB read faster than every peer", lr, min(peers) if peers else None, False,
         "{value:.3f} s vs fastest peer {goal:.3f} s")
    zq = fig(find(ZLIB, "qemu-img convert -> null-co", "zlib"))
    zl: List[float] = [
        f for f in (fig(find(ZLIB, "libqblock readinto", "zlib")), fig(find(ZLIB, "libqblock read", "zlib")))
        if f is not None
    ]
    line("zlib sequential >= 1.5x qemu-img", max(zl) if zl else None, zq * 1.5 if zq else None, True,
         "{value:.2f} GB/s vs 1.5 x qemu-img = {goal:.2f} GB/s")
    io = fig(find(RAND, QEMU_IO_RAND, "qcow2"))
    line("random 4 KiB read faster than qemu-io", lr, io, False, "{value:.3f} s vs {goal:.3f} s")
    for fmt, peers in FORMAT_PEERS.items():
        seq, rand = fmt_seq(fmt), fmt_rand(fmt)
        best_seq = max((f for f in (fig(find(seq, "libqblock readinto", fmt)), fig(find(seq, "libqblock read", fmt)))
                        if f is not None), default=None)
        line(f"{fmt} sequential >= qemu-img's read path", best_seq, fig(find(seq, "qemu-img convert -> null-co", fmt)),
             True, "{value:.2f} GB/s vs {goal:.2f} GB/s")
        line(f"{fmt} sequential faster than every peer", best_seq, _fastest_peer(cases, seq, fig, higher=True), True,
             "{value:.2f} GB/s vs fastest peer {goal:.2f} GB/s")
        lr_f = min((f for f in (fig(find(rand, "libqblock read", fmt)), fig(find(rand, "libqblock readinto", fmt)))
                    if f is not None), default=None)
        pr_f = fig(find(rand, "os.pread (raw copy)", "raw"))
        line(f"{fmt} random 4 KiB read within 1.2x os.pread", lr_f, pr_f * 1.2 if pr_f else None, False,
             "{value:.3f} s vs 1.2 x os.pread = {goal:.3f} s")
        line(f"{fmt} random 4 KiB read faster than every peer and qemu-io", lr_f,
             _fastest_peer(cases, rand, fig, higher=False), False, "{value:.3f} s vs fastest other {goal:.3f} s")
    wq = fig(find(WRITE, "qemu-io -t writeback (one process)", "qcow2"))
    wl = fig(find(WRITE, "libqblock write", "qcow2"))
    line("allocating writes faster than qemu-io", wl, wq, False, "{value:.3f} s vs {goal:.3f} s")
    return out


def report(cases: List[Case], ds: bl.Dataset, args: argparse.Namespace, info: Dict[str, str],
           loads: List[str], idle_rss: Optional[int], markdown: bool) -> str:
    header = ["reader", "image", "figure", "ratio", "peak RSS", "spread", "check"]
    parts = []
    n_rand = len(bl.load_offsets(ds.offsets))
    n_write = len(bl.load_offsets(ds.write_offsets))
    nclusters = ds.size // bl.CLUSTER
    desc = (
        f"{bl.human_size(ds.size)} virtual disk, 64 KiB clusters, {ds.allocated}/{nclusters} "
        f"({ds.allocated / nclusters:.0%}) allocated with random data; raw copy sparse; zlib copy by "
        f"qemu-img convert -c. {n_rand:,} random 4 KiB-aligned reads (seed {ds.seed}; "
        f"{bl.fraction_in_data(ds):.0%} land in data, the rest in holes, where qcow2 readers need no I/O "
        f"but reads of the raw copy still copy zeroes); {n_write:,} allocating "
        f"4 KiB writes, each into its own 64 KiB cluster of a fresh image. Best of up to {args.repeat} runs (fewer past {args.budget:.0f} s) after one untimed "
        f"verification pass"
        + (f", in each of {args.rounds} rounds over the read rows (order rotated every round)" if args.rounds > 1 else "")
        + "; warm page cache."
    )
    parts.append(desc)
    for sec, rows in build_rows(cases, ds, args).items():
        title = sec
        if not is_rate(sec) and sec != WRITE:
            title += f" x {n_rand:,}"
        if sec == WRITE:
            title += f" x {n_write:,}"
        if markdown:
            parts.append(f"### {title}\n\n_{section_note(sec)}_\n\n" + bl.render_table(header, rows, True))
        else:
            parts.append(f"== {title}\n   ({section_note(sec)})\n" + bl.render_table(header, rows, False))
    tl = targets(cases, ds)
    if markdown:
        parts.append("### Targets\n\n" + "\n".join(f"- {t}" for t in tl))
    else:
        parts.append("== Targets\n" + "\n".join(tl))
    notes = [
        f"load average before / after: {loads[0]} / {loads[-1]}",
        "spread = slowest / fastest timed run - 1 (number of timed runs)",
        "peak RSS = high-water RSS of the reader's whole process (VmHWM; GNU time's %M for commands)"
        + (f"; an idle worker interpreter alone peaks at {idle_rss / 1024:.0f} MiB" if idle_rss else ""),
    ]
    if markdown:
        parts.append("\n".join(f"- {n}" for n in notes))
    else:
        parts.append("\n".join(notes))
    return "\n\n".join(parts)


def machine_block(info: Dict[str, str], markdown: bool) -> str:
    if markdown:
        return "\n".join(f"- {k}: {v}" for k, v in info.items())
    return "\n".join(f"{k:>18}: {v}" for k, v in info.items())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2G", help="virtual size of the images (default 2G; e.g. 256M for a quick check)")
    p.add_argument("--dir", help="where to build the data (default: a new directory under /tmp);"
                   " a directory holding a matching data set is reused")
    p.add_argument("--keep", action="store_true", help="keep the data directory at the end")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per reader, best reported (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the read rows this many times, each round in a rotated order, and keep each"
                   " row's best; with 2 or more, row order and a passing disturbance cannot decide a target")
    p.add_argument("--budget", type=float, default=20.0,
                   help="stop repeating a reader once its timed runs add up to this many seconds (default 20)")
    p.add_argument("--random-count", type=int, default=100_000, help="random 4 KiB reads (default 100000)")
    p.add_argument("--write-count", type=int, default=20_000, help="allocating 4 KiB writes (default 20000)")
    p.add_argument("--seed", type=int, default=20121026, help="seed of the data and the offsets")
    p.add_argument("--only", action="append", default=[],
                   help="run only rows whose section, reader or image contains this text (repeatable)")
    p.add_argument("--markdown", metavar="FILE", help="also write the results as Markdown to FILE")
    p.add_argument("--build-note", help="text added to the libqblock line of the machine description,"
                   " e.g. which commit an out-of-tree build was made from")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            p.error(f"{tool} is needed (apt-get install qemu-utils)")
    size = bl.parse_size(args.size)
    d = args.dir or bl.default_tmp_dir(size)
    keep = args.keep or bool(args.dir)
    loads = [bl.loadavg()]
    info = machine_info_with_load(loads[0])
    if args.build_note:
        info["libqblock"] += f" ({args.build_note})"
    print(machine_block(info, False), flush=True)
    try:
        ds = bl.build_dataset(d, size, args.seed, args.random_count, args.write_count,
                              log=lambda m: print(m, flush=True))
        cases = all_cases()
        if args.only:
            cases = [c for c in cases if any(o.lower() in f"{c.section} {c.label} {c.image}".lower() for o in args.only)]
        print("warming the page cache ...", flush=True)
        images = dict.fromkeys(c.image for c in cases)  # the other formats' copies are made here, before warming
        bl.warm([ds.raw, ds.qcow2, ds.zlib] + [_image_path(ds, i) for i in images if i not in ("raw", "qcow2", "zlib")])
        idle = bl.run_worker(SCRIPT, {"kind": "idle"})
        idle_rss = idle.get("maxrss_kib")
        # Reads first, then what writes files (whose write-back would disturb reads).
        order = sorted(cases, key=lambda c: {"seq": 0, "rand": 0, "cmd-null": 0, "cmd-raw": 1}.get(c.kind, 2))
        for rnd, batch in enumerate(run_order(order, args.rounds)):
            if args.rounds > 1:
                print(f"round {rnd + 1} of {args.rounds}", flush=True)
            for c in batch:
                t0 = time.perf_counter()
                r = run_case(c, ds, args)
                c.result = merge_rounds(c.result, r) if c.result else r
                what = r.get("check", "") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('message', '')}"
                print(f"  [{time.perf_counter() - t0:6.1f} s] {c.section[:22]:<22} | {c.label} ({c.image}): {what}",
                      flush=True)
        loads.append(bl.loadavg())
        print()
        print(report(cases, ds, args, info, loads, idle_rss, markdown=False))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("## Machine\n\n" + machine_block(info, True) + "\n\n## Results\n\n")
                f.write(report(cases, ds, args, info, loads, idle_rss, markdown=True) + "\n")
            print(f"\nwrote {args.markdown}")
    finally:
        if keep:
            print(f"data kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    return 0


#: Rows that only read, and so may be repeated in rounds without disturbing one another.
READ_KINDS = ("seq", "rand", "cmd-null", "cmd-io-rand")


def run_order(order: List[Case], rounds: int) -> List[List[Case]]:
    """The batches to run: `rounds` passes over the read rows, each rotated by one
    more place within every section (so no row always runs first or right after a
    given neighbour), then the other rows once."""
    reads = [c for c in order if c.kind in READ_KINDS]
    rest = [c for c in order if c.kind not in READ_KINDS]
    sections = list(dict.fromkeys(c.section for c in reads))
    batches = []
    for rnd in range(max(1, rounds)):
        batch: List[Case] = []
        for sec in sections:
            rows = [c for c in reads if c.section == sec]
            k = rnd % len(rows)
            batch += rows[k:] + rows[:k]
        batches.append(batch)
    batches[-1] += rest
    return batches


def merge_rounds(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """One row's results over several rounds: every timed run is kept (the report
    shows the best); a failure or a wrong check in any round is what is reported."""
    if old.get("status") != "ok":
        return old
    if new.get("status") != "ok" or new.get("check") != old.get("check"):
        return new if new.get("status") != "ok" or new.get("check") == "WRONG" else old
    merged = dict(new)
    merged["times"] = old["times"] + new["times"]
    merged["maxrss_kib"] = max(old.get("maxrss_kib") or 0, new.get("maxrss_kib") or 0) or None
    return merged


def machine_info_with_load(load: str) -> Dict[str, str]:
    info = bl.machine_info(REPO)
    info["load average at start"] = load
    return info


if __name__ == "__main__":
    sys.exit(main())
