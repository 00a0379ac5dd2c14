"""Valid but extreme qcow2 images open, read right and stay within bounded memory.

Each image is made by qemu-img at a limit QEMU itself accepts: the largest
virtual size for 512-byte, 64 KiB and 2 MiB clusters (QEMU caps the L1 table at
32 MiB, so those are 128 GiB, 2 PiB and 2 EiB), and smaller disks with 512-byte
or 2 MiB clusters written all over. qemu-io writes byte patterns at odd offsets
(crossing cluster and L2-table boundaries, at the very end of the disk); a
fresh child process, limited to 1 GiB of address space, opens the image
read-only, reads those ranges and (for the smaller disks) the whole disk, and
walks map(). The bytes must be what was written, the map must tile the disk and
put data exactly on the written clusters, and the child's peak RSS must stay
under 300 MiB. (`qemu-img map` is not the oracle here: it needs minutes on a
2 EiB image; the expected map follows from the writes.)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import qemu_img, qemu_io
from test_qcow2_hostile import describe, run_child

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PiB, EiB = 1 << 50, 1 << 60
MAX_RSS_KIB = 300 * 1024
TIMEOUT = 30

Write = Tuple[int, int, int]  # (pattern byte, offset, length)


@dataclass(frozen=True)
class Spec:
    id: str
    cluster: int
    virt: int
    writes: Tuple[Write, ...]
    whole: bool  # read the whole disk and compare it with the model


def _scattered(seed: int, virt: int, n: int, max_len: int) -> Tuple[Write, ...]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        length = r.randint(1, max_len)
        out.append((1 + i % 254, r.randrange(0, virt - length), length))
    return tuple(out)


SPECS = [
    # 64 GiB - 100: across an L2 table's end (one covers 32 KiB of 512-byte clusters).
    Spec(
        "c512_max_128G", 512, 128 * GiB,
        ((0x61, 0, 4096), (0x62, 64 * GiB + 123, 1000), (0x63, 64 * GiB - 100, 200), (0x64, 128 * GiB - 4096, 4096)),
        False,
    ),
    # 512 MiB - 10: across an L2 table's end; 2 PiB - 1: the very last byte.
    Spec(
        "c64k_max_2P", 64 * KiB, 2 * PiB,
        ((0x61, 0, 4096), (0x62, PiB + 12345, 70000), (0x63, 512 * MiB - 10, 20), (0x64, 2 * PiB - 1, 1)),
        False,
    ),
    Spec("c2M_max_2E", 2 * MiB, 2 * EiB, ((0x61, 0, 4096), (0x62, EiB - 1, 3), (0x63, 2 * EiB - 4096, 4096)), False),
    Spec("c2M_64M_whole", 2 * MiB, 64 * MiB, _scattered(1, 64 * MiB, 40, 300 * KiB), True),
    Spec("c512_32M_whole", 512, 32 * MiB, _scattered(2, 32 * MiB, 400, 3000), True),
]


CHILD = r"""
import hashlib, itertools, json, resource, sys, time
t0 = time.monotonic()
p = json.loads(sys.argv[1])
out = {"stage": "import", "exc": None, "msg": None, "done": []}
try:
    import libqblock as qb

    def step(name, fn):
        out["stage"] = name
        r = fn()
        out["done"].append(name)
        return r

    img = step("open", lambda: qb.open(p["path"], fmt="qcow2", flags=0))
    info = step("info", img.info)
    out["virt"], out["cluster"] = info.virt_size, info.cluster_size
    out["reads"] = [
        hashlib.sha256(step(f"read {n}@{off:#x}", lambda: img.read(n, off))).hexdigest() for n, off in p["reads"]
    ]
    if p["whole"]:
        h, buf = hashlib.sha256(), bytearray(1 << 20)
        for off in range(0, info.virt_size, len(buf)):
            step(f"readinto @{off:#x}", lambda: img.readinto(buf, off))
            h.update(buf)
        out["whole"] = h.hexdigest()
    out["map"] = step("map", lambda: [[e.offset, e.length, e.data, e.zero] for e in itertools.islice(img.map(), 10**5)])
    step("close", img.close)
    out["stage"] = None
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:500]
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
out["elapsed"] = round(time.monotonic() - t0, 3)
print("RESULT " + json.dumps(out), flush=True)
"""


def model(writes: Tuple[Write, ...], off: int, n: int) -> bytes:
    """What the disk holds in [off, off + n) after the writes (zeroes elsewhere)."""
    buf = bytearray(n)
    for pat, woff, wlen in writes:
        lo, hi = max(off, woff), min(off + n, woff + wlen)
        if lo < hi:
            buf[lo - off:hi - off] = bytes([pat]) * (hi - lo)
    return bytes(buf)


def expected_map(spec: Spec) -> List[List]:
    """[start, length, data] runs: data on every cluster a write touched, merged."""
    cs = spec.cluster
    clusters = sorted({c for _, off, n in spec.writes for c in range(off // cs, (off + n - 1) // cs + 1)})
    runs: List[List] = []
    pos = 0
    for c in clusters:
        start = c * spec.cluster
        if start > pos:
            runs.append([pos, start - pos, False])
        end = min(start + spec.cluster, spec.virt)
        if runs and runs[-1][2] and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += end - start
        else:
            runs.append([start, end - start, True])
        pos = end
    if pos < spec.virt:
        runs.append([pos, spec.virt - pos, False])
    return runs


def merged(extents: List[List], virt: int) -> List[List]:
    """Our map as [start, length, data] runs; it must tile [0, virt) exactly."""
    runs: List[List] = []
    pos = 0
    for start, length, data, zero in extents:
        assert start == pos and length > 0, f"map extents do not tile the disk: {start:#x}+{length:#x} after {pos:#x}"
        if runs and runs[-1][2] == data:
            runs[-1][1] += length
        else:
            runs.append([start, length, data])
        pos = start + length
    assert pos == virt, f"map covers {pos:#x} bytes, the disk has {virt:#x}"
    return runs


def read_plan(spec: Spec) -> List[Tuple[int, int]]:
    v, cs = spec.virt, spec.cluster
    reads = [(min(cs, v), 0), (1, v - 1), (min(MiB, v), v - min(MiB, v)), (MiB, v // 2 - MiB // 2)]
    reads.append((2 * cs, v // 3 // cs * cs + cs // 2))  # straddles two clusters
    for _, off, n in spec.writes[:20]:
        lo, hi = max(0, off - 7), min(v, off + n + 7)
        reads.append((hi - lo, lo))
    return reads


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_extreme_valid_image(spec: Spec, tmp: Path) -> None:
    p = tmp / f"{spec.id}.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={spec.cluster}", str(p), str(spec.virt))
    qemu_io(str(p), *(f"write -P {pat:#x} {off} {n}" for pat, off, n in spec.writes))
    reads = read_plan(spec)
    try:
        res = run_child(
            {"path": str(p), "reads": reads, "whole": spec.whole},
            spec.id,
            script=CHILD,
            timeout=TIMEOUT,
            max_rss_kib=MAX_RSS_KIB,
        )
    finally:
        size = p.stat().st_size
        p.unlink()  # the biggest ones hold a 32 MiB L1 table
    assert res["exc"] is None, f"{spec.id} ({size} byte file): {describe(res)}"
    assert (res["virt"], res["cluster"]) == (spec.virt, spec.cluster)
    sha = lambda off, n: hashlib.sha256(model(spec.writes, off, n)).hexdigest()  # noqa: E731
    bad = [f"{n} bytes at {off:#x}" for (n, off), got in zip(reads, res["reads"]) if got != sha(off, n)]
    assert not bad, f"{spec.id}: wrong bytes read: {', '.join(bad)}"
    if spec.whole:
        assert res["whole"] == sha(0, spec.virt), f"{spec.id}: the whole disk reads wrong"
    assert merged(res["map"], spec.virt) == expected_map(spec), f"{spec.id}: map() disagrees with the writes"
