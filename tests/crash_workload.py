"""Seeded write workloads for the crash-consistency tests (tests/test_crash.py),
and what an image may hold after a crash in the middle of one.

Run as a script it is the writer a test kills with SIGKILL::

    python tests/crash_workload.py CONFIG IMAGE SEED

It runs CONFIG's workload on IMAGE and prints ``flushed N`` after the flush
that is operation N returns, so the killer knows what must have survived.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import libqblock as qb

KiB, MiB = 1024, 1024 * 1024
SECTOR = 512


@dataclass(frozen=True)
class Config:
    """One writable format configuration under test."""

    fmt: str
    options: Callable[[int, Optional[str]], qb.ImageOptions]  # (size, backing file name)
    size: int
    unit: int  # cluster, grain or block size: offsets are biased to its boundaries
    qemu_check: bool = True  # qemu-img check supports the format
    # qcow2 lazy refcounts: QEMU leaves such an image dirty at a crash (our
    # writer keeps refcounts current anyway); qemu-img check runs after the
    # reopen that repairs it
    lazy: bool = False
    # What qemu-img check may call an error in an image a crash left behind,
    # before it is opened for writing again (which repairs it, as QEMU's does)
    dirty_marks: Tuple[str, ...] = ()
    leaks_repairable: bool = True  # qemu-img check -r leaks can clean them
    base: Optional[str] = None  # the backing file's format, for an overlay


CONFIGS: Dict[str, Config] = {
    "qcow2": Config("qcow2", lambda s, b: qb.Qcow2Options(s), 2 * MiB, 64 * KiB),
    "qcow2-4k": Config("qcow2", lambda s, b: qb.Qcow2Options(s, cluster_size=4096), 2 * MiB, 4096),
    "qcow2-lazy": Config("qcow2", lambda s, b: qb.Qcow2Options(s, cluster_size=4096, lazy_refcounts=True),
                         2 * MiB, 4096, lazy=True),
    "qcow2-extl2": Config("qcow2", lambda s, b: qb.Qcow2Options(s, cluster_size=32 * KiB, extended_l2=True),
                          2 * MiB, 32 * KiB),
    "qcow2-v2": Config("qcow2", lambda s, b: qb.Qcow2Options(s, compat="0.10", cluster_size=8192), 2 * MiB, 8192),
    "qcow": Config("qcow", lambda s, b: qb.QcowOptions(s), 2 * MiB, 4096, qemu_check=False),
    # QEMU's qed check counts leaks (unreferenced space) but cannot free them
    "qcow2-backing": Config("qcow2", lambda s, b: qb.Qcow2Options(s, backing=b, backing_fmt=qb.Format.QCOW2),
                            2 * MiB, 64 * KiB, base="qcow2"),
    "qcow-backing": Config("qcow", lambda s, b: qb.QcowOptions(s, backing=b, backing_fmt=qb.Format.RAW), 2 * MiB, 4096,
                           qemu_check=False, base="raw"),
    "qed-backing": Config("qed", lambda s, b: qb.QedOptions(s, backing=b, backing_fmt=qb.Format.QCOW2), 2 * MiB,
                          64 * KiB, leaks_repairable=False, base="qcow2"),
    "cow-backing": Config("cow", lambda s, b: qb.CowOptions(s, backing=b), 2 * MiB, 512, qemu_check=False, base="raw"),
    "vmdk-backing": Config("vmdk", lambda s, b: qb.VmdkOptions(s, backing=b, backing_fmt=qb.Format.VMDK), 2 * MiB,
                           64 * KiB, base="vmdk"),
    "qed": Config("qed", lambda s, b: qb.QedOptions(s, cluster_size=4096), 2 * MiB, 4096, leaks_repairable=False),
    "cow": Config("cow", lambda s, b: qb.CowOptions(s), 2 * MiB, 512, qemu_check=False),
    "raw": Config("raw", lambda s, b: qb.RawOptions(s), 2 * MiB, 4096, qemu_check=False),
    # the header's count of blocks is updated after the block map
    "vdi": Config("vdi", lambda s, b: qb.VdiOptions(s), 3 * MiB, MiB, dirty_marks=("allocated blocks mismatch",)),
    "vmdk": Config("vmdk", lambda s, b: qb.VmdkOptions(s), 2 * MiB, 64 * KiB),
    "vmdk-flat": Config("vmdk", lambda s, b: qb.VmdkOptions(s, subformat="monolithicFlat"), 2 * MiB, 64 * KiB),
    "vmdk-2gb": Config("vmdk", lambda s, b: qb.VmdkOptions(s, subformat="twoGbMaxExtentSparse"), 2 * MiB, 64 * KiB),
    "vpc": Config("vpc", lambda s, b: qb.VpcOptions(s), 4 * MiB, 2 * MiB, qemu_check=False),
    "vhdx": Config("vhdx", lambda s, b: qb.VhdxOptions(s, block_size=MiB), 3 * MiB, MiB),
    # an image open for writing is marked so (QEMU's inuse flag)
    "parallels": Config("parallels", lambda s, b: qb.ParallelsOptions(s, cluster_size=64 * KiB), 2 * MiB, 64 * KiB,
                        dirty_marks=("not closed correctly",)),
}


@dataclass(frozen=True)
class Op:
    """One step: ``write`` (data), ``zero`` (length) or ``flush``."""

    kind: str
    offset: int = 0
    data: bytes = b""
    length: int = 0

    def span(self) -> Tuple[int, bytes]:
        """The offset and the bytes this step leaves, for writes and zero writes."""
        return (self.offset, self.data if self.kind == "write" else bytes(self.length))


def workload(cfg: Config, seed: int, n: int) -> List[Op]:
    """``n`` steps, about one in four a flush, sectors aligned, biased to unit edges."""
    rng = random.Random(seed)
    ops: List[Op] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            ops.append(Op("flush"))
            continue
        units = cfg.size // cfg.unit
        start = rng.randrange(units) * cfg.unit
        if rng.random() < 0.5:
            start += rng.randrange(cfg.unit // SECTOR) * SECTOR
        length = min(rng.choice([1, 2, 7, cfg.unit // SECTOR, 2 * cfg.unit // SECTOR + 3]) * SECTOR,
                     cfg.size - start, 4 * MiB)
        length = max(length, SECTOR)
        start = min(start, cfg.size - length)
        if r < 0.85:
            ops.append(Op("write", start, rng.randbytes(length)))
        else:
            ops.append(Op("zero", start, length=length))
    ops.append(Op("flush"))
    return ops


def apply(image: qb.Image, op: Op) -> None:
    if op.kind == "write":
        image.write(op.data, op.offset)
    elif op.kind == "zero":
        image.write_zeroes(op.offset, op.length)
    else:
        image.flush()


def model_after(initial: bytes, ops: Sequence[Op]) -> bytearray:
    """The disk, ``initial`` before, once ``ops`` have all happened."""
    m = bytearray(initial)
    for op in ops:
        if op.kind != "flush":
            off, data = op.span()
            m[off:off + len(data)] = data
    return m


def crash_violations(got: bytes, durable: bytes, maybe: Sequence[Op]) -> List[str]:
    """Sectors of ``got`` that neither hold what was flushed (``durable``) nor
    what one of the steps in flight since (``maybe``) wrote there."""
    bad: List[str] = []
    if len(got) != len(durable):
        return [f"size {len(got)}, expected {len(durable)}"]
    spans = [op.span() for op in maybe if op.kind != "flush"]
    for s in range(0, len(got), SECTOR):
        sector = got[s:s + SECTOR]
        if sector == durable[s:s + SECTOR]:
            continue
        if any(off <= s and s + SECTOR <= off + len(d) and d[s - off:s - off + SECTOR] == sector
               for off, d in spans):
            continue
        bad.append(f"sector at {s:#x}")
        if len(bad) >= 5:
            break
    return bad


def make_image(cfg: Config, folder: Path) -> Tuple[Path, bytes]:
    """A new image of ``cfg`` in ``folder`` (over a backing file there,
    named relatively, whose every other 64 KiB holds seeded bytes) and what
    its disk reads."""
    folder.mkdir(parents=True, exist_ok=True)
    backing = None
    if cfg.base:
        backing = f"b.{cfg.base}"
        base_opts = {"qcow2": qb.Qcow2Options, "raw": qb.RawOptions, "vmdk": qb.VmdkOptions}[cfg.base](cfg.size)
        qb.create(str(folder / backing), base_opts)
        rng = random.Random(cfg.size)
        with qb.open(str(folder / backing), cfg.base, qb.O_RDWR) as base:
            for off in range(0, base.virt_size, 128 * KiB):
                base.write(rng.randbytes(min(64 * KiB, base.virt_size - off)), off)
    path = folder / f"i.{cfg.fmt}"
    qb.create(str(path), cfg.options(cfg.size, backing))
    with qb.open(str(path), cfg.fmt) as img:
        return path, img.read(img.virt_size, 0)


def last_flushed(lines: Sequence[str]) -> Optional[int]:
    """The index of the last flush a killed writer reported."""
    done = [int(l.split()[1]) for l in lines if l.startswith("flushed ")]
    return done[-1] if done else None


def _child(name: str, path: str, seed: int, n: int) -> None:
    cfg = CONFIGS[name]
    img = qb.open(path, cfg.fmt, qb.O_RDWR | qb.O_CACHE_WB)
    for i, op in enumerate(workload(cfg, seed, n)):
        apply(img, op)
        if op.kind == "flush":
            print(f"flushed {i}", flush=True)
    img.close()
    print("done", flush=True)


def _main(argv: List[str]) -> None:
    name, path, seed = argv[0], argv[1], int(argv[2])
    n = int(argv[3]) if len(argv) > 3 else 400
    _child(name, path, seed, n)


if __name__ == "__main__":
    _main(sys.argv[1:])
