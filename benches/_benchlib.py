"""Shared helpers for the benches: the data set, subprocess runs, the machine, tables.

Nothing here times anything by itself; the scripts decide what is measured. Every
measured reader runs in its own subprocess so that its peak memory (ru_maxrss) and
its caches do not leak into the next one.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

CLUSTER = 64 * KiB
CHUNK = 1 * MiB
RANDOM_LEN = 4 * KiB
# Bumped whenever the way the data set is built changes, so a kept directory
# built by an older script is rebuilt rather than silently reused.
DATASET_VERSION = 2


def parse_size(text: str) -> int:
    """'2G', '256M', '65536' -> bytes (binary units, as qemu-img takes them)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(m.group(1)) * mult


def human_size(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def new_hash() -> "hashlib._Hash":
    # Only to compare outputs, not for security; SHA-1 is the fastest hashlib
    # digest on SHA-NI machines (~1.1 GB/s here), and it runs outside the timing.
    return hashlib.sha1(usedforsecurity=False)


# --------------------------------------------------------------------------
# The data set


@dataclass
class Dataset:
    """The images every reader is pointed at, and what they must return."""

    dir: str
    size: int
    seed: int
    raw: str  # sparse raw file: the generated content, holes where unallocated
    qcow2: str  # qemu-img convert -O qcow2, 64 KiB clusters
    zlib: str  # qemu-img convert -c -O qcow2 (zlib), 64 KiB clusters
    allocation: str  # one byte per 64 KiB cluster: 1 = random data, 0 = hole
    offsets: str  # random-read offsets, array('Q') in native byte order
    write_offsets: str  # allocating-write offsets, array('Q')
    allocated: int  # clusters holding data
    seq_digest: str  # hash of the whole virtual disk
    rand_digest: str  # hash of the random reads' results, in order
    build_seconds: float


def _manifest_path(d: str) -> str:
    return os.path.join(d, "manifest.json")


def _cluster_data(rng: random.Random, table: bytes) -> bytes:
    # Random bytes folded onto a 16-symbol alphabet: random, yet zlib shrinks a
    # cluster to ~56%, so the zlib copy really holds compressed clusters
    # (qemu-img stores a cluster that does not shrink uncompressed).
    return rng.randbytes(CLUSTER).translate(table)


def build_dataset(
    d: str,
    size: int,
    seed: int,
    random_count: int,
    write_count: int,
    alloc_ratio: float = 0.6,
    log=print,
) -> Dataset:
    """Build (or reuse, if a matching manifest is there) the images in ``d``."""
    if size % CHUNK or size < CHUNK:
        raise ValueError("--size must be a positive multiple of 1 MiB")
    want = {
        "version": DATASET_VERSION,
        "size": size,
        "seed": seed,
        "random_count": random_count,
        "write_count": write_count,
        "alloc_ratio": alloc_ratio,
    }
    mp = _manifest_path(d)
    if os.path.exists(mp):
        with open(mp) as f:
            have = json.load(f)
        if all(have.get(k) == v for k, v in want.items()) and all(
            os.path.exists(have[k]) for k in ("raw", "qcow2", "zlib", "allocation", "offsets", "write_offsets")
        ):
            log(f"reusing the data set in {d}")
            return Dataset(**{k: have[k] for k in Dataset.__dataclass_fields__})
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    raw = os.path.join(d, "disk.raw")
    qcow2 = os.path.join(d, "disk.qcow2")
    zlib_ = os.path.join(d, "disk-zlib.qcow2")
    rng = random.Random(seed)
    nclusters = size // CLUSTER
    table = bytes(0x41 + (i & 15) for i in range(256))
    log(f"building a {human_size(size)} raw image, ~{alloc_ratio:.0%} of its 64 KiB clusters random data ...")
    bitmap = bytearray(nclusters)
    with open(raw, "wb") as f:
        f.truncate(size)
        fd = f.fileno()
        for c in range(nclusters):
            if rng.random() < alloc_ratio:
                os.pwrite(fd, _cluster_data(rng, table), c * CLUSTER)
                bitmap[c] = 1
    allocated = sum(bitmap)
    allocation = os.path.join(d, "allocation.bin")
    with open(allocation, "wb") as f:
        f.write(bitmap)
    log(f"  {allocated}/{nclusters} clusters allocated; qemu-img convert -O qcow2 ...")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, qcow2])
    log("  qemu-img convert -c -O qcow2 (zlib) ...")
    _run(
        [
            "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
            "-o", f"cluster_size={CLUSTER},compression_type=zlib", raw, zlib_,
        ]
    )
    offsets = os.path.join(d, "random-offsets.bin")
    a = array.array("Q", (rng.randrange(size // RANDOM_LEN) * RANDOM_LEN for _ in range(random_count)))
    with open(offsets, "wb") as f:
        a.tofile(f)
    write_offsets = os.path.join(d, "write-offsets.bin")
    n = min(write_count, nclusters)
    w = array.array("Q", (c * CLUSTER for c in rng.sample(range(nclusters), n)))
    with open(write_offsets, "wb") as f:
        w.tofile(f)
    log("  hashing the reference content (plain reads of the raw file) ...")
    seq_digest = hash_file(raw)
    rand_digest = hash_random_reads(raw, list(a))
    ds = Dataset(
        dir=d, size=size, seed=seed, raw=raw, qcow2=qcow2, zlib=zlib_, allocation=allocation, offsets=offsets,
        write_offsets=write_offsets, allocated=allocated, seq_digest=seq_digest,
        rand_digest=rand_digest, build_seconds=time.perf_counter() - t0,
    )
    with open(mp, "w") as f:
        json.dump({**want, **ds.__dict__}, f, indent=1)
    return ds


#: The copies of the qcow2's content in the other formats, and how qemu-img makes them.
#: vpc takes force_size so that its virtual size stays exactly --size (without it
#: qemu-img rounds up to a CHS geometry, and the copy would be longer than the raw).
FORMAT_COPIES: Dict[str, List[str]] = {
    "vmdk": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
    "vpc": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
    "vdi": ["-O", "vdi"],
    "vhdx": ["-O", "vhdx", "-o", "subformat=dynamic"],
}


def format_copy(ds: "Dataset", fmt: str, log=print) -> str:
    """The data set's content as a ``fmt`` image, made by qemu-img from the raw copy on first use."""
    path = os.path.join(ds.dir, f"disk.{fmt}")
    done = path + ".done"  # written after the convert: a half-made copy is remade
    if not os.path.exists(done):
        log(f"  qemu-img convert {' '.join(FORMAT_COPIES[fmt])} ...")
        _run(["qemu-img", "convert", "-f", "raw", *FORMAT_COPIES[fmt], ds.raw, path])
        open(done, "w").close()
    return path


def fraction_in_data(ds: "Dataset") -> float:
    """Share of the random-read offsets that land in a cluster holding data."""
    with open(ds.allocation, "rb") as f:
        bitmap = f.read()
    offs = load_offsets(ds.offsets)
    return sum(bitmap[o // CLUSTER] for o in offs) / max(1, len(offs))


def load_offsets(path: str) -> List[int]:
    a = array.array("Q")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a.tolist()


def hash_file(path: str, chunk: int = 8 * MiB) -> str:
    h = new_hash()
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def hash_random_reads(path: str, offsets: Iterable[int], length: int = RANDOM_LEN) -> str:
    h = new_hash()
    fd = os.open(path, os.O_RDONLY)
    try:
        for o in offsets:
            h.update(os.pread(fd, length, o))
    finally:
        os.close(fd)
    return h.hexdigest()


def warm(paths: Sequence[str], chunk: int = 8 * MiB) -> None:
    """Read files once so that every measurement starts with a warm page cache."""
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def remove_and_sync(path: str) -> None:
    """Remove a file a measurement wrote and push dirty pages out, untimed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.sync()


# --------------------------------------------------------------------------
# Running things


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({p.returncode}): {p.stderr.strip()[:500]}")
    return p


TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_timed_command(argv: Sequence[str], tmpdir: str, stdin: Optional[str] = None) -> Dict[str, Any]:
    """Run one external command (its standard input from the file ``stdin``); wall time and its own peak RSS.

    The peak RSS comes from GNU time (a ~1 MiB process) rather than from this
    Python's RUSAGE_CHILDREN: on Linux a child spawned from Python inherits the
    parent's high-water mark at exec, so that figure would be Python's, not the
    tool's. Without /usr/bin/time the figure is reported as an upper bound.
    """
    rss_file = os.path.join(tmpdir, "rss.txt")
    full = [TIME_BIN, "-f", "%M", "-o", rss_file, *argv] if TIME_BIN else list(argv)
    with open(stdin or os.devnull, "rb") as inp:
        t0 = time.perf_counter()
        p = subprocess.run(full, stdin=inp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
    if p.returncode:
        return {"status": "error", "message": p.stderr.strip()[-500:]}
    if TIME_BIN:
        with open(rss_file) as f:
            rss_kib = int(f.read().split()[-1])
        rss_exact = True
    else:
        import resource

        rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss_exact = False
    return {"status": "ok", "seconds": dt, "maxrss_kib": rss_kib, "rss_exact": rss_exact}


def peak_rss_kib() -> int:
    """This process's RSS high-water mark in KiB.

    /proc/self/status VmHWM rather than ru_maxrss: Linux carries the parent's
    high-water mark into ru_maxrss across fork+exec, so a worker spawned by a
    driver that once held 30 MiB would report at least 30 MiB; VmHWM belongs to
    the address space the exec created.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(script: str, spec: Dict[str, Any], timeout: float = 3600) -> Dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh interpreter; its last stdout line is JSON."""
    try:
        p = subprocess.run(
            [sys.executable, script, "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": f"timed out after {timeout:.0f} s"}
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "error", "message": f"worker exited {p.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------
# The machine


def _first_line(argv: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _libqblock_build(repo: Optional[str]) -> str:
    """Version and where the measured libqblock lives (and its commit, if in the repo)."""
    import importlib.util

    spec = importlib.util.find_spec("libqblock")
    if spec is None or not spec.origin:
        return "missing"
    where = os.path.dirname(os.path.abspath(spec.origin))
    text = f"{_dist_version('libqblock') or '?'} from {where}"
    if repo and where.startswith(os.path.abspath(repo) + os.sep):
        commit = _first_line(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
        dirty = _first_line(["git", "-C", repo, "status", "--porcelain", "--", "rust", "python", "Cargo.lock"])
        if commit:
            text += f" (git {commit}{', with uncommitted changes' if dirty else ''})"
    return text


def machine_info(repo: Optional[str] = None) -> Dict[str, str]:
    info: Dict[str, str] = {}
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info["cpus"] = str(os.cpu_count())
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = model or platform.processor() or "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        info["memory"] = f"{kib / (1024 * 1024):.1f} GiB"
    except (OSError, ValueError, IndexError):
        info["memory"] = "?"
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    info["qemu-img"] = (_first_line(["qemu-img", "--version"]) or "missing").replace("qemu-img version ", "")
    info["libqblock"] = _libqblock_build(repo)
    for dist in ("libqcow-python", "libvmdk-python", "libvhdi-python", "pykeramics", "dissect.hypervisor"):
        info[dist] = _dist_version(dist) or "missing"
    return info


def loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def default_tmp_dir(size: int) -> str:
    return tempfile.mkdtemp(prefix=f"qblock-bench-{human_size(size).replace(' ', '')}-", dir="/tmp")


# --------------------------------------------------------------------------
# Tables


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)
