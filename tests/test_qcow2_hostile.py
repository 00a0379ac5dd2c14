"""Hostile qcow2 images: every hand-made corrupt image is refused cleanly.

DESIGN.md, "Rules of the engine": never trust the image. Each case starts from
a small valid image made by qemu-img/qemu-io, patches a few bytes as QEMU's
docs/interop/qcow2.txt describes them, and hands the result to a fresh child
process limited to 1 GiB of address space and 20 s. The child opens the image,
calls info(), reads the first cluster, the last byte and the whole disk in
1 MiB chunks (a sample of ranges when the disk is big), then block_status(),
map() and check_allocation(), so lazy checks are exercised as well as the ones
at open; "rw" cases open with O_RDWR and write. The child reports the class of
the first exception. The test fails, with the child's own words, when:

- the child crashes (a panic that escaped, an abort, a signal) or runs out of
  memory (a huge allocation hits the address-space limit and aborts);
- it hangs (killed after the timeout);
- it finishes without an error: a silently wrong answer;
- it raises anything but the expected class (CorruptImageError, or
  UnsupportedError where the image is valid but uses something we do not
  support, such as an unknown incompatible feature or encryption);
- its peak RSS exceeds the bound, or the image file was changed (never for a
  read-only open; for a writable open only the dirty/corrupt header bits may
  change, and unreferenced clusters may be appended).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional

import pytest

import reliability

from conftest import qemu_img, qemu_io, qemu_raw_bytes

TIMEOUT = 20  # seconds per child: a hostile image must be refused quickly
ADDRESS_SPACE = 1 << 30  # RLIMIT_AS of the child: a huge allocation aborts it
MAX_RSS_KIB = 256 * 1024  # peak resident memory of a child (Python alone is ~16 MiB)

C = "CorruptImageError"
U = "UnsupportedError"
OK = "ok"  # the image opened and read without error (only for tolerant cases)

MiB = 1 << 20
CLUSTER = 65536
VIRT = 4 * MiB
WRITE_OFF = 2 * MiB  # unallocated in every base image: a write there allocates

# Header fields (docs/interop/qcow2.txt, "Header"): name -> (offset, width).
FIELDS = {
    "magic": (0, 4),
    "version": (4, 4),
    "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4),
    "cluster_bits": (20, 4),
    "size": (24, 8),
    "crypt_method": (32, 4),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8),
    "compatible_features": (80, 8),
    "autoclear_features": (88, 8),
    "refcount_order": (96, 4),
    "header_length": (100, 4),
    "compression_type": (104, 1),
}
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFFSET_MASK = ((1 << 56) - 1) & ~511  # bits 9-55 of L1/L2 entries


# --------------------------------------------------------------------------
# The child: one fresh interpreter per case.

CHILD = r"""
import hashlib, itertools, json, resource, sys, time
t0 = time.monotonic()
p = json.loads(sys.argv[1])
out = {"stage": "import", "exc": None, "msg": None, "sha256": None, "done": []}
try:
    import libqblock as qb

    def step(name, fn):
        out["stage"] = name
        r = fn()
        out["done"].append(name)
        return r

    if p["mode"] == "ops":
        # Each op must raise one of its allowed classes (or succeed if "ok" is allowed).
        img = step("open", lambda: qb.open(p["path"], fmt=p["fmt"], flags=qb.O_RDWR if p["rw"] else 0))
        out["ops"] = []

        def dec(a):
            if isinstance(a, dict):
                return bytearray(a["buf"]) if "buf" in a else bytes.fromhex(a["hex"])
            return a

        for name, args in p["ops"]:
            try:
                r = getattr(img, name)(*[dec(a) for a in args])
                if name == "map":
                    list(itertools.islice(r, 1000))
                out["ops"].append([name, args, "ok", ""])
            except BaseException as e:
                out["ops"].append([name, args, type(e).__name__, str(e)[:300]])
        out["sha256"] = hashlib.sha256(step("read", lambda: img.read(img.virt_size, 0))).hexdigest()
        step("close", img.close)
    else:
        rw = p["mode"] == "rw"
        img = step("open", lambda: qb.open(p["path"], fmt=p["fmt"], flags=qb.O_RDWR if rw else 0))
        info = step("info", img.info)
        virt = info.virt_size
        cs = info.cluster_size or 65536
        if virt:
            step("read first cluster", lambda: img.read(min(cs, virt), 0))
            step("read last byte", lambda: img.read(1, virt - 1))
        if rw:
            data = b"\xab" * 4096
            step("write", lambda: img.write(data, p["write_off"]))
            step("flush", img.flush)
            if step("read back", lambda: img.read(len(data), p["write_off"])) != data:
                raise AssertionError("read back differs from what was written")
        elif virt <= 64 << 20:
            h = hashlib.sha256()
            for off in range(0, virt, 1 << 20):
                h.update(step(f"read {off:#x}", lambda: img.read(min(1 << 20, virt - off), off)))
            out["sha256"] = h.hexdigest()
        else:
            for i in range(64):
                off = (virt // 64 * i) & ~511
                step(f"read {off:#x}", lambda: img.read(min(65536, virt - off), off))
        if virt:
            step("block_status", lambda: img.block_status(0, virt))
            step("map", lambda: sum(1 for _ in itertools.islice(img.map(), 1 << 20)))
            step("check_allocation", lambda: img.check_allocation(0, virt))
        step("close", img.close)
    out["stage"] = None
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:500]
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
out["elapsed"] = round(time.monotonic() - t0, 3)
print("RESULT " + json.dumps(out), flush=True)
"""


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(
    params: dict, what: str, script: str = CHILD, timeout: float = TIMEOUT, max_rss_kib: int = MAX_RSS_KIB
) -> dict:
    """Run `script` on params in a fresh, limited interpreter; fail the test on
    a crash, a hang, no report or too much memory, else return its report."""
    env = dict(os.environ, RUST_BACKTRACE="0")
    try:
        r = subprocess.run(
            [sys.executable, "-c", script, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limit_child,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(
            f"{what}: HANG: no answer within {timeout} s (killed)\nstdout: {out[-1000:]}\nstderr: {err[-2000:]}"
        )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        how = f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit status {r.returncode}"
        pytest.fail(
            f"{what}: CRASH ({how}; an abort here is often a failed huge allocation under the "
            f"{ADDRESS_SPACE >> 20} MiB address-space limit)\nstdout: {r.stdout[-1000:]}\nstderr: {r.stderr[-3000:]}"
        )
    res = json.loads(lines[-1][len("RESULT "):])
    peak = res["rss_kib"]
    assert peak < max_rss_kib, f"{what}: peak RSS {peak >> 10} MiB (bound {max_rss_kib >> 10} MiB): {res}"
    return res


def describe(res: dict) -> str:
    if res["exc"] is None:
        return f"no error at all (steps: {', '.join(res['done'])}; {res['elapsed']} s)"
    return f"{res['exc']} at '{res['stage']}': {res['msg']} ({res['elapsed']} s)"


# --------------------------------------------------------------------------
# Base images, made once per session by qemu-img / qemu-io.


@dataclass
class Base:
    data: bytes
    raw: bytes  # the guest view, from `qemu-img convert -O raw`

    @property
    def raw_sha(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def _make(tmp: Path, name: str, create: List[str], writes: List[str]) -> Base:
    p = tmp / name
    qemu_img("create", "-f", "qcow2", *create, str(p), str(VIRT))
    if writes:
        qemu_io(str(p), *writes)
    return Base(p.read_bytes(), qemu_raw_bytes(str(p), tmp))


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Dict[str, Base]:
    tmp = tmp_path_factory.mktemp("hostile-bases")
    writes = ["write -P 0x11 0 64k", "write -P 0x22 1052672 4k", "write -P 0x33 3M 64k"]
    b = {
        "v3": _make(tmp, "v3.qcow2", ["-o", "compat=1.1"], writes),
        "v2": _make(tmp, "v2.qcow2", ["-o", "compat=0.10"], writes),
        "c4k": _make(tmp, "c4k.qcow2", ["-o", "cluster_size=4096"], ["write -P 0x11 0 8k"]),
        "extl2": _make(tmp, "extl2.qcow2", ["-o", "extended_l2=on"], ["write -P 0x44 0 4k", "write -P 0x55 3M 64k"]),
    }
    snap = tmp / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", str(snap), str(VIRT))
    qemu_io(str(snap), "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "s1", str(snap))
    qemu_io(str(snap), "write -P 0x22 0 4k")
    b["snap"] = Base(snap.read_bytes(), qemu_raw_bytes(str(snap), tmp))
    # Compressed: 1 MiB of low-entropy text, so every 64 KiB cluster compresses
    # to ~28 KiB (many 512-byte sectors, not cluster-aligned).
    raw = tmp / "c.raw"
    raw.write_bytes(bytes(random.Random(7).choices(b"abcdefgh", k=MiB)))
    for name, opts in (("comp", "cluster_size=65536"), ("zstd", "cluster_size=65536,compression_type=zstd")):
        comp = tmp / f"{name}.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, str(raw), str(comp))
        b[name] = Base(comp.read_bytes(), raw.read_bytes())
    return b


# --------------------------------------------------------------------------
# Patching.


class Ctx:
    """One case's image under construction: bytes to patch, a directory for extras."""

    def __init__(self, base: Optional[Base], d: Path) -> None:
        self.b: Optional[bytearray] = bytearray(base.data) if base else None
        self.dir = d
        self.path = d / "img.qcow2"  # what the child opens
        self.base = base
        self.ok_sha = base.raw_sha if base else None  # the disk's contents, if opening it is tolerated
        self.watch: List[Path] = []  # other files that must come out unchanged

    def get(self, off: int, width: int) -> int:
        return int.from_bytes(self.b[off:off + width], "big")

    def put(self, off: int, width: int, value: int) -> None:
        self.b[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "big")

    def field(self, name: str) -> int:
        return self.get(*FIELDS[name])

    def set(self, **values: int) -> None:
        for name, v in values.items():
            self.put(*FIELDS[name], v)

    @property
    def cluster_bits(self) -> int:
        return self.field("cluster_bits")

    def l1_pos(self, i: int) -> int:
        return self.field("l1_table_offset") + 8 * i

    def l2_pos(self, guest: int) -> int:
        """File offset of the L2 entry that maps guest offset `guest`."""
        cb = self.cluster_bits
        esize = 16 if self.field("incompatible_features") & INCOMPAT_EXTL2 else 8
        per_l2 = (1 << cb) // esize
        l2 = self.get(self.l1_pos((guest >> cb) // per_l2), 8) & OFFSET_MASK
        assert l2, "no L2 table there in the base image"
        return l2 + ((guest >> cb) % per_l2) * esize

    def extensions(self) -> List[tuple]:
        """(position, type, length) of each header extension, before the end marker."""
        pos = 72 if self.field("version") == 2 else self.field("header_length")
        out = []
        while True:
            t, n = struct.unpack(">II", self.b[pos:pos + 8])
            if t == EXT_END:
                return out
            out.append((pos, t, n))
            pos += 8 + (n + 7) // 8 * 8

    def ext(self, etype: int) -> tuple:
        return next(e for e in self.extensions() if e[1] == etype)

    def compressed(self, guest: int) -> tuple:
        """(entry position, host offset, byte length) of a compressed cluster."""
        pos = self.l2_pos(guest)
        e = self.get(pos, 8)
        assert e & OFLAG_COMPRESSED
        x = 62 - (self.cluster_bits - 8)
        off = e & ((1 << x) - 1)
        nsect = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
        return pos, off, nsect * 512 - (off & 511)


Patch = Callable[[Ctx], None]


def hdr(**values: int) -> Patch:
    return lambda c: c.set(**values)


def both(*patches: Patch) -> Patch:
    def f(c: Ctx) -> None:
        for p in patches:
            p(c)

    return f


def entry(where: Callable[[Ctx], int], value: Callable[[Ctx, int], int]) -> Patch:
    """Replace the 64-bit table entry at where(c) by value(c, old)."""

    def f(c: Ctx) -> None:
        pos = where(c)
        c.put(pos, 8, value(c, c.get(pos, 8)))

    return f


L1_0 = lambda c: c.l1_pos(0)  # noqa: E731
L2_0 = lambda c: c.l2_pos(0)  # noqa: E731 (guest cluster 0: allocated in every base)
L2_FREE = lambda c: c.l2_pos(WRITE_OFF)  # noqa: E731 (guest cluster at 2 MiB: unallocated)
REFTABLE_0 = lambda c: c.field("refcount_table_offset")  # noqa: E731
L1_OFF = lambda c: c.field("l1_table_offset")  # noqa: E731
AT_0 = dict(mode="rw", write_off=0)  # write guest cluster 0, which the case has pointed at metadata


def file_len(c: Ctx) -> int:
    return len(c.b)


def as_qemu_reads(patch: Patch) -> Patch:
    """A tolerated damage that changes what the disk reads: the expected
    contents are qemu-img's reading of the damaged image."""

    def go(c: Ctx) -> None:
        patch(c)
        c.ok_sha = None

    return go


def past_eof(c: Ctx) -> int:
    """A cluster-aligned offset 16 clusters past the end of the file."""
    cs = 1 << c.cluster_bits
    return (len(c.b) + cs - 1) // cs * cs + 16 * cs


# --- header extensions --------------------------------------------------


def ext_len(n: int) -> Patch:
    def f(c: Ctx) -> None:
        pos, _, _ = c.extensions()[0]
        c.put(pos + 4, 4, n)

    return f


def feature_table_len(delta: int) -> Patch:
    def f(c: Ctx) -> None:
        pos, _, n = c.ext(EXT_FEATURE_TABLE)
        assert n % 48 == 0
        c.put(pos + 4, 4, n + delta)

    return f


def many_unknown_exts(c: Ctx) -> None:
    """The whole first cluster after the header is unknown, empty extensions: no end marker."""
    start = c.field("header_length")
    for pos in range(start, CLUSTER, 8):
        c.put(pos, 4, 0x12345678)
        c.put(pos + 4, 4, 0)


def bitmaps_ext_absurd(c: Ctx) -> None:
    """A bitmaps extension claiming 2^32-1 bitmaps in a directory of 2^63 bytes."""
    pos = c.field("header_length")
    body = struct.pack(">IIQQ", 0xFFFFFFFF, 0, 1 << 63, 0xFFFFFFFFFFFF0000)
    c.b[pos:pos + 8 + len(body) + 8] = struct.pack(">II", EXT_BITMAPS, len(body)) + body + bytes(8)
    c.set(autoclear_features=1)


def add_ext(c: Ctx, etype: int, data: bytes) -> None:
    """Append a header extension after the last one (cluster 0 has room); a
    backing file name, stored right after the extensions, moves to 0x800."""
    off, size = c.field("backing_file_offset"), c.field("backing_file_size")
    if off:
        name = bytes(c.b[off:off + size])
        c.b[off:off + size] = bytes(size)
        c.b[0x800:0x800 + size] = name
        c.set(backing_file_offset=0x800)
    last = c.extensions()[-1]
    pos = last[0] + 8 + (last[2] + 7) // 8 * 8
    padded = data.ljust((len(data) + 7) // 8 * 8, b"\0")
    c.b[pos:pos + 16 + len(padded)] = struct.pack(">II", etype, len(data)) + padded + bytes(8)


def data_file_is_self(name: str, symlink: bool = False) -> Patch:
    """The external data file is the image itself (by name, or through a symlink),
    and guest cluster 0 maps to host offset 0: a guest write there would land on
    the qcow2 header. (QEMU refuses such an image: its own locks conflict.)"""

    def f(c: Ctx) -> None:
        add_ext(c, EXT_DATA_FILE, name.encode())
        c.set(incompatible_features=INCOMPAT_DATA_FILE)
        c.put(c.l2_pos(0), 8, OFLAG_COPIED)  # host offset 0, valid with a data file
        if symlink:
            os.symlink(c.path.name, c.dir / name)

    return f


def data_file_is_backing(c: Ctx) -> None:
    """The external data file is the raw backing file: a guest write would
    modify the backing file, which must stay read-only (a shared base image).
    Stricter than QEMU 10, which writes into the backing file here."""
    backing = c.dir / "base.raw"
    backing.write_bytes(b"\x5a" * VIRT)
    c.b = bytearray(_overlay(c, "img.qcow2", "base.raw", "raw").read_bytes())
    add_ext(c, EXT_DATA_FILE, b"base.raw")
    c.set(incompatible_features=INCOMPAT_DATA_FILE)
    c.watch.append(backing)


# --- backing files ------------------------------------------------------


def backing_name(name: bytes) -> Patch:
    """Store `name` as the backing file name, after the extensions in cluster 0."""

    def f(c: Ctx) -> None:
        c.b[0x800:0x800 + len(name)] = name
        c.set(backing_file_offset=0x800, backing_file_size=len(name))

    return f


def _overlay(c: Ctx, name: str, backing: str, fmt: str = "qcow2", *opts: str) -> Path:
    p = c.dir / name
    qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, *opts, str(p), str(VIRT))
    return p


def _rename_backing(c: Ctx, old: bytes, new: bytes) -> None:
    """Rewrite the backing name of c.b in place (same length)."""
    assert len(old) == len(new)
    off, size = c.field("backing_file_offset"), c.field("backing_file_size")
    assert bytes(c.b[off:off + size]) == old
    c.b[off:off + size] = new


def loop_self(c: Ctx) -> None:
    """A -> A (qemu-img refuses to make it, so rename the backing file afterwards)."""
    c.path = c.dir / "A.qcow2"
    c.b = bytearray(_overlay(c, "A.qcow2", "Z.qcow2").read_bytes())
    _rename_backing(c, b"Z.qcow2", b"A.qcow2")


def loop_self_abspath(c: Ctx) -> None:
    """A -> /abs/path/A: the same file under another spelling."""
    c.path = c.dir / "A.qcow2"
    c.b = bytearray(_overlay(c, "A.qcow2", str(c.dir / "Z.qcow2")).read_bytes())
    _rename_backing(c, str(c.dir / "Z.qcow2").encode(), str(c.path).encode())


def loop_two(c: Ctx) -> None:
    """A -> B -> A."""
    _overlay(c, "B.qcow2", "A.qcow2")
    c.path = _overlay(c, "A.qcow2", "B.qcow2")
    c.b = None


def loop_symlink(c: Ctx) -> None:
    """A -> L, where L is a symlink to A: a loop only visible by file identity."""
    c.path = _overlay(c, "A.qcow2", "L.qcow2")
    os.symlink("A.qcow2", c.dir / "L.qcow2")
    c.b = None


def loop_three_via_dotdot(c: Ctx) -> None:
    """A -> sub/B -> ../C -> A, with relative names resolved per image."""
    (c.dir / "sub").mkdir()
    _overlay(c, "C.qcow2", "A.qcow2")
    _overlay(c, "sub/B.qcow2", "../C.qcow2")
    c.path = _overlay(c, "A.qcow2", "sub/B.qcow2")
    c.b = None


def deep_chain(c: Ctx) -> None:
    """A chain of 500 qcow2 overlays over a qcow2 full of 0x5a: no loop, but a
    depth the file chooses. Refusing it (a depth cap) or reading 0x5a through all
    500 layers are both fine; a stack overflow, fd exhaustion or memory per layer is not."""
    depth = 500
    base = c.dir / "zbase.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), str(VIRT))
    qemu_io(str(base), f"write -P 0x5a 0 {VIRT}")
    # 512-byte clusters keep each overlay at 2.5 KiB.
    template = bytearray(_overlay(c, "c0000.qcow2", "c0001.qcow2", "qcow2", "-o", "cluster_size=512").read_bytes())
    off, size = struct.unpack(">QI", template[8:20])
    for i in range(depth):
        name = b"zbase.qcow2" if i == depth - 1 else f"c{i + 1:04d}.qcow2".encode()
        template[off:off + size] = name
        (c.dir / f"c{i:04d}.qcow2").write_bytes(template)
    c.path, c.b = c.dir / "c0000.qcow2", None
    c.ok_sha = hashlib.sha256(b"\x5a" * VIRT).hexdigest()


def backing_with_nul(c: Ctx) -> None:
    """Backing name b"base.raw\\0evil": no file can have that name. A driver that
    cuts the name at the NUL would silently open base.raw instead."""
    with open(c.dir / "base.raw", "wb") as f:
        f.truncate(VIRT)
    c.b = bytearray(_overlay(c, "img.qcow2", "base.rawXevil", fmt="raw").read_bytes())
    _rename_backing(c, b"base.rawXevil", b"base.raw\0evil")


# --- refcounts ------------------------------------------------------------


def refblock_fill(value: int) -> Patch:
    """Every 16-bit refcount in the first refcount block set to `value`."""

    def f(c: Ctx) -> None:
        assert c.field("refcount_order") == 4
        rb = c.get(REFTABLE_0(c), 8)
        c.b[rb:rb + CLUSTER] = value.to_bytes(2, "big") * (CLUSTER // 2)

    return f


def refcount_of(cluster: int, value: int) -> Patch:
    def f(c: Ctx) -> None:
        assert c.field("refcount_order") == 4
        c.put(c.get(REFTABLE_0(c), 8) + 2 * cluster, 2, value)

    return f


# --- compressed clusters ------------------------------------------------


def comp_descriptor(value: Callable[[Ctx, int, int], int]) -> Patch:
    """Replace guest cluster 1's compressed descriptor by value(c, x, old)."""

    def f(c: Ctx) -> None:
        pos = c.l2_pos(CLUSTER)
        x = 62 - (c.cluster_bits - 8)
        c.put(pos, 8, value(c, x, c.get(pos, 8)))

    return f


def comp_all_ones(c: Ctx, x: int, old: int) -> int:
    # Host offset 2^54-1 and the largest sector count: offset + size past 2^54, far past EOF.
    return OFLAG_COMPRESSED | ((1 << 62) - 1)


def comp_past_eof(c: Ctx, x: int, old: int) -> int:
    return OFLAG_COMPRESSED | (3 << x) | (len(c.b) + (1 << 30) + 100)


def comp_one_sector(c: Ctx, x: int, old: int) -> int:
    # Keep the offset, claim no additional sector: the ~28 KiB stream is cut short.
    return old & ~(((1 << (62 - x)) - 1) << x)


def comp_garbage(c: Ctx) -> None:
    # 0xFF starts a deflate block of the reserved type 3: invalid from the first byte.
    _, off, n = c.compressed(CLUSTER)
    c.b[off:off + n] = b"\xff" * n


def comp_short_stream(c: Ctx) -> None:
    # A valid, complete deflate stream that yields only 100 bytes, not a cluster.
    _, off, n = c.compressed(CLUSTER)
    co = zlib.compressobj(9, zlib.DEFLATED, -12)
    stream = co.compress(b"A" * 100) + co.flush()
    assert len(stream) < n
    c.b[off:off + len(stream)] = stream


def comp_file_truncated(c: Ctx) -> None:
    # Cut the file 100 bytes into the last compressed cluster's data.
    last = max(c.compressed(g)[1] for g in range(0, MiB, CLUSTER))
    tables = (c.field("l1_table_offset"), c.l2_pos(0) & ~(CLUSTER - 1), c.field("refcount_table_offset"))
    metadata_end = max(tables) + CLUSTER
    assert metadata_end <= last
    del c.b[last + 100:]


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_rle_block(byte: int, size: int, last: bool) -> bytes:
    """A zstd RLE block (RFC 8878, 3.1.1.2): `size` copies of `byte`."""
    return (int(last) | 1 << 1 | size << 3).to_bytes(3, "little") + bytes([byte])


def zstd_frame(frame_header: bytes) -> Patch:
    """Replace guest cluster 1's zstd data by a hand-made frame, zero-padded
    to the stored length (zero bytes are empty raw blocks that never end the frame)."""

    def f(c: Ctx) -> None:
        _, off, n = c.compressed(CLUSTER)
        assert c.field("compression_type") == 1
        c.b[off:off + n] = frame_header.ljust(n, b"\0")

    return f


# Single segment, 1-byte content size 100, one last RLE block of 100 bytes: a
# complete, valid frame that yields 100 bytes instead of a cluster.
ZSTD_SHORT = ZSTD_MAGIC + bytes([0x20, 100]) + zstd_rle_block(0x41, 100, last=True)
# Window descriptor 0xff: a 2^41-byte (2 TiB) window, then 1000 bytes and no end.
ZSTD_HUGE_WINDOW = ZSTD_MAGIC + bytes([0x00, 0xFF]) + zstd_rle_block(0x41, 1000, last=False)
# Single segment with an 8-byte content size of 2^64-1, then 1000 bytes and no end.
ZSTD_HUGE_CONTENT = (
    ZSTD_MAGIC + bytes([0xE0]) + (2**64 - 1).to_bytes(8, "little") + zstd_rle_block(0x41, 1000, last=False)
)


# --- internal snapshots ---


def snapshot_entry(field_off: int, width: int, value: int) -> Patch:
    """Set a field of the first snapshot table entry (docs: "Snapshot table entry")."""

    def f(c: Ctx) -> None:
        assert c.field("nb_snapshots") >= 1
        c.put(c.field("snapshots_offset") + field_off, width, value)

    return f


# --- extended L2 entries ------------------------------------------------


def extl2_bitmap(guest: int, value: Callable[[int], int]) -> Patch:
    def f(c: Ctx) -> None:
        pos = c.l2_pos(guest) + 8
        c.put(pos, 8, value(c.get(pos, 8)))

    return f


# --------------------------------------------------------------------------
# The cases.


@dataclass(frozen=True)
class Case:
    id: str
    base: Optional[str]  # key of `bases`, or None when the patch builds the files itself
    patch: Patch
    expect: FrozenSet[str]
    mode: str = "ro"  # "ro": open read-only and read everything; "rw": open O_RDWR and write
    fmt: Optional[str] = "qcow2"
    write_off: int = WRITE_OFF  # where a "rw" case writes 4 KiB


def case(
    id: str,
    base: Optional[str],
    patch: Patch,
    *expect: str,
    mode: str = "ro",
    fmt: Optional[str] = "qcow2",
    write_off: int = WRITE_OFF,
) -> Case:
    return Case(id, base, patch, frozenset(expect or (C,)), mode, fmt, write_off)


U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

CASES = [
    # --- L1 table header fields ---
    case("l1_size_2^31", "v3", hdr(l1_size=1 << 31)),
    case("l1_size_u32max", "v3", hdr(l1_size=U32)),
    case("l1_size_zero", "v3", hdr(l1_size=0)),
    case("l1_size_too_small_for_size", "v3", hdr(size=1 << 30)),  # 1 GiB needs 2 entries, the table has 1
    case("l1_size_past_eof", "v3", hdr(l1_size=1 << 20)),  # 8 MiB of L1 in a 512 KiB file
    case("l1_offset_unaligned", "v3", lambda c: c.set(l1_table_offset=c.field("l1_table_offset") + 8)),
    case("l1_offset_2^62", "v3", hdr(l1_table_offset=1 << 62)),
    case("l1_offset_past_eof", "v3", lambda c: c.set(l1_table_offset=past_eof(c))),
    case("l1_offset_plus_size_wraps", "v3", hdr(l1_table_offset=U64 & ~(CLUSTER - 1), l1_size=0x4000)),
    case("l1_overlaps_header", "v3", hdr(l1_table_offset=0)),
    # --- refcount table header fields ---
    case("reftable_past_eof", "v3", lambda c: c.set(refcount_table_offset=past_eof(c))),
    case("reftable_2^62", "v3", hdr(refcount_table_offset=1 << 62)),
    case("reftable_unaligned", "v3", lambda c: c.set(refcount_table_offset=c.field("refcount_table_offset") + 512)),
    case("reftable_clusters_u32max", "v3", hdr(refcount_table_clusters=U32)),
    case("reftable_clusters_2^20", "v3", hdr(refcount_table_clusters=1 << 20)),  # 64 GiB of refcount table
    case("reftable_overlaps_l1_write", "v3", lambda c: c.set(refcount_table_offset=L1_OFF(c)), mode="rw"),
    case("reftable_overlaps_header_write", "v3", hdr(refcount_table_offset=0), mode="rw"),
    # --- cluster size, refcount width, header length, version ---
    case("cluster_bits_8", "v3", hdr(cluster_bits=8)),
    case("cluster_bits_22", "v3", hdr(cluster_bits=22), C, U),
    case("cluster_bits_63", "v3", hdr(cluster_bits=63), C, U),
    case("cluster_bits_64", "v3", hdr(cluster_bits=64), C, U),
    case("cluster_bits_u32max", "v3", hdr(cluster_bits=U32), C, U),
    case("refcount_order_7", "v3", hdr(refcount_order=7)),
    case("refcount_order_u32max", "v3", hdr(refcount_order=U32)),
    case("header_length_72_v3", "v3", hdr(header_length=72)),
    case("header_length_100_v3", "v3", hdr(header_length=100)),
    case("header_length_past_cluster", "v3", hdr(header_length=CLUSTER + 8)),
    case("header_length_u32max_aligned", "v3", hdr(header_length=U32 & ~7)),
    case("header_length_unaligned", "v3", hdr(header_length=108)),
    case("version_0", "v3", hdr(version=0), C, U),
    case("version_1_as_qcow2", "v3", hdr(version=1), U, C),
    case("version_1_probed", "v3", hdr(version=1), U, C, fmt=None),
    case("version_4", "v3", hdr(version=4), U, C),
    case("version_u32max", "v3", hdr(version=U32), U, C),
    # --- virtual size ---
    case("size_2^64-512", "v3", hdr(size=U64 & ~511)),
    case("size_2^63", "v3", hdr(size=1 << 63)),
    case("size_l1_count_wraps_u32", "v3", hdr(size=(1 << 61) + 512)),  # needs 2^32+1 L1 entries; as u32 that is 1
    case("size_2^62_tiny_clusters", "c4k", hdr(size=1 << 62)),
    # --- backing file ---
    case("backing_offset_past_eof", "v3", hdr(backing_file_offset=1 << 40, backing_file_size=8)),
    case("backing_offset_wraps", "v3", hdr(backing_file_offset=U64 - 3, backing_file_size=16)),
    case("backing_size_1024", "v3", backing_name(b"b" * 1024)),
    case("backing_size_u32max", "v3", hdr(backing_file_offset=0x800, backing_file_size=U32)),
    case("backing_name_with_nul", None, backing_with_nul),
    case("backing_loop_self", None, loop_self),
    case("backing_loop_self_abspath", None, loop_self_abspath),
    case("backing_loop_two", None, loop_two),
    case("backing_loop_three_dotdot", None, loop_three_via_dotdot),
    case("backing_loop_symlink", None, loop_symlink),
    case("backing_chain_500_deep", None, deep_chain, OK, C, U),
    # --- header extensions ---
    case("ext_len_past_cluster", "v3", ext_len(CLUSTER)),
    case("ext_len_u32max", "v3", ext_len(U32)),
    case("ext_len_pads_to_2^32", "v3", ext_len(U32 - 6)),  # 0xfffffff9 rounds up to 2^32: 0 in u32
    case("feature_table_odd_len", "v3", feature_table_len(-1)),
    case("ext_no_end_marker", "v3", many_unknown_exts, OK, C),
    case("bitmaps_ext_absurd", "v3", bitmaps_ext_absurd, OK, C),
    # --- L1 / L2 entries (found lazily, on read) ---
    case("l1_entry_unaligned", "v3", entry(L1_0, lambda c, e: e + 512)),
    case("l1_entry_past_eof", "v3", entry(L1_0, lambda c, e: OFLAG_COPIED | past_eof(c))),
    case("l1_entry_reserved_bit56", "v3", entry(L1_0, lambda c, e: e | 1 << 56)),
    case("l1_entry_reserved_bit0", "v3", entry(L1_0, lambda c, e: e | 1)),
    # A data cluster past the end of the file reads as zeroes, as in QEMU (a
    # crash that lost the write extending the file leaves one): not refused.
    case("l2_entry_past_eof", "v3", as_qemu_reads(entry(L2_0, lambda c, e: OFLAG_COPIED | past_eof(c))), OK),
    case("l2_entry_2^55", "v3", as_qemu_reads(entry(L2_0, lambda c, e: OFLAG_COPIED | 1 << 55)), OK),
    case("l2_entry_unaligned", "v3", entry(L2_0, lambda c, e: e + 512)),
    case("l2_entry_reserved_bit1", "v3", entry(L2_0, lambda c, e: e | 1 << 1)),
    case("l2_entry_reserved_bit57", "v3", entry(L2_0, lambda c, e: e | 1 << 57)),
    case("l2_entry_unaligned_v2", "v2", entry(L2_0, lambda c, e: e + 512)),
    case("extl2_alloc_and_zero", "extl2", extl2_bitmap(0, lambda b: b | 1 << 32)),
    case("extl2_alloc_without_offset", "extl2", extl2_bitmap(CLUSTER, lambda b: b | 1)),
    # --- data clusters on top of metadata: a write there would destroy the image ---
    case("l2_data_is_refblock_write", "v3", entry(L2_0, lambda c, e: OFLAG_COPIED | c.get(REFTABLE_0(c), 8)), **AT_0),
    case("l2_data_is_l1_write", "v3", entry(L2_0, lambda c, e: OFLAG_COPIED | L1_OFF(c)), **AT_0),
    case("l2_data_is_own_l2_write", "v3", entry(L2_0, lambda c, e: OFLAG_COPIED | (c.l2_pos(0) & ~(CLUSTER - 1))), **AT_0),
    # An L1 entry naming the refcount table as an L2 table: a COW write would update
    # the "L2 entry", that is overwrite the refcount table.
    case("l2_table_is_reftable_write", "v3", entry(L1_0, lambda c, e: OFLAG_COPIED | REFTABLE_0(c)), **AT_0),
    # --- refcount blocks, found on the first allocating write ---
    case("refblock_unaligned_write", "v3", entry(REFTABLE_0, lambda c, e: e + 512), mode="rw"),
    case("refblock_past_eof_write", "v3", entry(REFTABLE_0, lambda c, e: past_eof(c)), mode="rw"),
    case("refblock_2^62_write", "v3", entry(REFTABLE_0, lambda c, e: 1 << 62), mode="rw"),
    case("refblock_overlaps_l1_write", "v3", entry(REFTABLE_0, lambda c, e: c.field("l1_table_offset")), mode="rw"),
    # Refcounts of 0 for clusters in use: a first-fit allocator hands out the
    # header (QEMU's overlap check then refuses). Refusing, or allocating
    # elsewhere without overwriting anything, are both fine.
    case("refcounts_all_zero_write", "v3", refblock_fill(0), OK, C, mode="rw"),
    case("refcount_of_header_zero_write", "v3", refcount_of(0, 0), OK, C, mode="rw"),
    case("refcount_of_l2_zero_write", "v3", refcount_of(4, 0), OK, C, mode="rw"),
    # --- compressed clusters ---
    case("compressed_desc_all_ones", "comp", comp_descriptor(comp_all_ones)),
    case("compressed_past_eof", "comp", comp_descriptor(comp_past_eof)),
    case("compressed_truncated_by_sector_count", "comp", comp_descriptor(comp_one_sector)),
    case("compressed_garbage_deflate", "comp", comp_garbage),
    case("compressed_short_stream", "comp", comp_short_stream),
    case("compressed_file_truncated", "comp", comp_file_truncated),
    case("zstd_garbage", "zstd", comp_garbage),
    case("zstd_truncated_by_sector_count", "zstd", comp_descriptor(comp_one_sector)),
    case("zstd_short_frame", "zstd", zstd_frame(ZSTD_SHORT)),
    case("zstd_window_2TiB", "zstd", zstd_frame(ZSTD_HUGE_WINDOW)),  # a decoder sizing its window from it aborts
    case("zstd_content_size_2^64", "zstd", zstd_frame(ZSTD_HUGE_CONTENT)),
    case("zstd_file_truncated", "zstd", comp_file_truncated),
    # --- snapshots ---
    case("nb_snapshots_u32max", "v3", lambda c: c.set(nb_snapshots=U32, snapshots_offset=c.field("l1_table_offset"))),
    case("snapshot_table_past_eof", "v3", lambda c: c.set(nb_snapshots=1, snapshots_offset=past_eof(c))),
    case("snapshot_table_2^62", "v3", hdr(nb_snapshots=16, snapshots_offset=1 << 62)),
    case("snapshot_offset_unaligned", "v3", lambda c: c.set(nb_snapshots=1, snapshots_offset=L1_OFF(c) + 8)),
    case("snapshot_extra_size_u32max", "snap", snapshot_entry(36, 4, U32)),
    case("snapshot_extra_size_1M", "snap", snapshot_entry(36, 4, MiB)),  # past the end of the file
    # A snapshot's own L1 table is only needed to switch to it: refusing the image
    # or ignoring it are both fine, loading 32 GiB of it is not.
    case("snapshot_l1_size_u32max", "snap", snapshot_entry(8, 4, U32), OK, C),
    case("snapshot_l1_offset_unaligned", "snap", snapshot_entry(0, 8, 0x60008), OK, C),
    # --- feature bits, encryption, compression type ---
    case("incompat_bit5_unknown", "v3", hdr(incompatible_features=1 << 5), U),
    case("incompat_bit63_unknown", "v3", hdr(incompatible_features=1 << 63), U),
    case("external_data_file_without_name", "v3", hdr(incompatible_features=INCOMPAT_DATA_FILE), C, U),
    case("data_file_is_the_image_write", "v3", data_file_is_self("img.qcow2"), **AT_0),
    case("data_file_symlink_to_the_image_write", "v3", data_file_is_self("data.raw", symlink=True), **AT_0),
    case("data_file_is_the_backing_file_write", None, data_file_is_backing, **AT_0),
    case("extended_l2_with_4k_clusters", "c4k", hdr(incompatible_features=INCOMPAT_EXTL2)),
    case("zstd_type_without_bit", "v3", hdr(compression_type=1)),
    case("compression_bit_with_zlib_type", "v3", hdr(incompatible_features=INCOMPAT_COMPRESSION, compression_type=0)),
    case("compression_type_unknown", "v3", hdr(incompatible_features=INCOMPAT_COMPRESSION, compression_type=7), U, C),
    case("crypt_aes", "v3", hdr(crypt_method=1), U),
    case("crypt_luks_without_header_ext", "v3", hdr(crypt_method=2), U, C),
    case("crypt_method_unknown", "v3", hdr(crypt_method=0x99), C, U),
]


def _build(c: Case, bases: Dict[str, Base], tmp: Path) -> Ctx:
    ctx = Ctx(bases[c.base] if c.base else None, tmp)
    c.patch(ctx)
    if ctx.b is not None:
        ctx.path.write_bytes(bytes(ctx.b))
    return ctx


def _changed(before: bytes, after: bytes, name: str = "the image file") -> str:
    if after == before:
        return ""
    n = min(len(before), len(after))
    diff = [i for i in range(n) if before[i] != after[i]]
    where = ", ".join(f"{i:#x}" for i in diff[:8]) or "none"
    return f"; and {name} changed (bytes at {where}; length {len(before)} -> {len(after)})"


def _assert_untouched(before: bytes, after: bytes, writable: bool, what: str) -> None:
    """Read-only: not one byte changed. Writable: only the dirty/corrupt header
    bits may have changed, and the file may have grown (a leaked cluster)."""
    if not writable:
        assert after == before, f"{what}: a read-only open modified the image file"
        return
    assert len(after) >= len(before), f"{what}: the image file shrank from {len(before)} to {len(after)} bytes"
    head = bytearray(after[: len(before)])
    allowed = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
    old = int.from_bytes(before[72:80], "big")
    new = int.from_bytes(head[72:80], "big")
    assert (old ^ new) & ~allowed == 0, f"{what}: incompatible_features changed from {old:#x} to {new:#x}"
    head[72:80] = before[72:80]
    if head != before:
        diff = next(i for i in range(len(before)) if head[i] != before[i])
        pytest.fail(f"{what}: the refused write still modified the image at file offset {diff:#x}")


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_image_is_refused(c: Case, bases: Dict[str, Base], tmp: Path) -> None:
    ctx = _build(c, bases, tmp)
    before = ctx.path.read_bytes()
    others = {p: p.read_bytes() for p in ctx.watch}
    res = run_child({"path": str(ctx.path), "fmt": c.fmt, "mode": c.mode, "write_off": c.write_off}, c.id)
    outcome = res["exc"] or OK
    for p, old in others.items():
        if p.read_bytes() != old:
            pytest.fail(f"{c.id}: {describe(res)}{_changed(old, p.read_bytes(), p.name)}")
    if outcome != OK and outcome in c.expect:
        reliability.count("hostile: crafted qcow2 images refused with a clear error")
    if outcome not in c.expect:
        want = " or ".join(sorted(c.expect))
        pytest.fail(f"{c.id}: expected {want}, got {describe(res)}{_changed(before, ctx.path.read_bytes())}")
    if outcome == OK and c.mode == "rw":
        # A tolerated write: the header is intact and QEMU reads the old disk
        # plus the 4 KiB written, so nothing else was overwritten.
        after = ctx.path.read_bytes()
        _assert_untouched(before[:CLUSTER], after[:CLUSTER], True, c.id)
        want = bytearray(ctx.base.raw)
        want[c.write_off:c.write_off + 4096] = b"\xab" * 4096
        got = qemu_raw_bytes(str(ctx.path), tmp)
        if got != want:
            diff = next(i for i in range(len(want)) if got[i] != want[i])
            pytest.fail(f"{c.id}: the write was accepted, but qemu-img now reads the disk differently at {diff:#x}")
        return
    _assert_untouched(before, ctx.path.read_bytes(), c.mode == "rw", c.id)
    if outcome == OK:
        # Tolerated, but then the disk must read exactly as QEMU reads it.
        want_sha = ctx.ok_sha or hashlib.sha256(qemu_raw_bytes(str(ctx.path), tmp)).hexdigest()
        assert res["sha256"] == want_sha, f"{c.id}: opened, but the disk reads differently from qemu-img"


def test_corrupt_bit_allows_read_only_refuses_writable(bases: Dict[str, Base], tmp: Path) -> None:
    """Incompatible bit 1: the image may be read (and must read right) but not opened writable."""
    ctx = Ctx(bases["v3"], tmp)
    ctx.set(incompatible_features=INCOMPAT_CORRUPT)
    ctx.path.write_bytes(bytes(ctx.b))
    before = ctx.path.read_bytes()
    params = {"path": str(ctx.path), "fmt": "qcow2", "write_off": WRITE_OFF}
    ro = run_child(dict(params, mode="ro"), "corrupt bit, read-only")
    assert ro["exc"] is None, f"read-only open of an image with the corrupt bit: {describe(ro)}"
    assert ro["sha256"] == bases["v3"].raw_sha, "read-only open of an image with the corrupt bit reads wrong data"
    assert ctx.path.read_bytes() == before
    rw = run_child(dict(params, mode="rw"), "corrupt bit, writable")
    assert rw["exc"] == C and rw["stage"] == "open", f"writable open with the corrupt bit: expected {C}, got {describe(rw)}"
    assert ctx.path.read_bytes() == before, "a refused writable open modified the image"


HUGE = [1 << 63, (1 << 63) - 1, (1 << 64) - 4096, U64]


@pytest.mark.parametrize("rw", [False, True], ids=["read-only", "writable"])
def test_huge_offsets_on_a_valid_image(bases: Dict[str, Base], tmp: Path, rw: bool) -> None:
    """Offsets near 2^63 and 2^64 (and offset + length overflowing u64) are
    OutOfRangeError, never a panic or a wrap-around to the start of the disk."""
    p = tmp / "valid.qcow2"
    p.write_bytes(bases["v3"].data)
    before = p.read_bytes()
    # Arguments travel as JSON: {"buf": n} is a bytearray(n), {"hex": s} is bytes.fromhex(s).
    ops = [["read", [1, o]] for o in HUGE] + [["read", [4096, o]] for o in HUGE]
    ops += [["read", [2, VIRT - 1]], ["read", [1, VIRT]], ["readinto", [{"buf": 16}, U64 - 7]]]
    ops += [["block_status", [o, 4096]] for o in HUGE] + [["check_allocation", [o, U64]] for o in HUGE]
    ops += [["map", [1 << 63, 4096]]]
    if rw:
        ops += [["write", [{"hex": "78"}, o]] for o in HUGE] + [["write_zeroes", [o, 4096]] for o in HUGE]
        ops += [["write", [{"hex": "7879"}, VIRT - 1]], ["truncate", [U64]], ["truncate", [1 << 63]]]
        ops += [["discard", [o, 4096]] for o in HUGE]
    res = run_child({"path": str(p), "fmt": "qcow2", "mode": "ops", "rw": rw, "ops": ops}, "huge offsets")
    assert res["exc"] is None, f"huge offsets: {describe(res)}"
    bad = []
    for name, args, got, msg in res["ops"]:
        strict = name in ("read", "readinto", "write", "write_zeroes")
        allowed = {"OutOfRangeError"} if strict else {"OutOfRangeError", "InvalidParamError"}
        if name == "truncate":
            allowed.add(U)  # shrinking/growing may not be offered; a huge size must not be accepted
        if name == "map":
            allowed.add(OK)  # an empty map past the end is a fine answer too
        if got not in allowed:
            bad.append(f"{name}{tuple(args)} -> {got}: {msg}")
    assert not bad, "huge offsets:\n" + "\n".join(bad)
    assert res["sha256"] == bases["v3"].raw_sha, "after the refused calls the disk reads differently"
    _assert_untouched(before, p.read_bytes(), rw, "huge offsets")
