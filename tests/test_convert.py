"""qb.convert and ``qblock convert`` against qemu-img: every writable format out,
every readable one in, sparseness, -n, -B, ranges, concatenation, progress,
cancellation and bad arguments."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import libqblock as qb
from conftest import qblock_cmd, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

MiB = 1 << 20
SIZE = 24 * MiB

#: Formats we write, with the options that make them, and whether qemu-img check knows them.
TARGETS = {
    "raw": (qb.RawOptions, False),
    "qcow2": (qb.Qcow2Options, True),
    "qcow": (qb.QcowOptions, False),
    "qed": (qb.QedOptions, True),
    "vdi": (qb.VdiOptions, True),
    "vmdk": (qb.VmdkOptions, True),
    "vpc": (qb.VpcOptions(virt_size=SIZE, force_size=True), False),
    "vhdx": (qb.VhdxOptions, True),
    "parallels": (qb.ParallelsOptions, True),
}


def make_source(tmp: Path, fmt: str = "qcow2", size: int = SIZE, seed: int = 1) -> tuple[str, bytes]:
    """A qemu-written image with data, zeroed clusters, holes and an unaligned tail; and its content."""
    path = str(tmp / f"src-{seed}.{fmt}")
    qemu_img("create", "-f", fmt, path, str(size))
    rng = random.Random(seed)
    cmds = []
    for _ in range(40):
        off = rng.randrange(size // 512) * 512
        n = min(rng.choice([512, 4096, 65536, 300 * 1024]), size - off)
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
    cmds.append(f"write -z {2 * MiB} {MiB}")
    cmds.append(f"write -P 7 {size - 512} 512")
    qemu_io(path, *cmds, fmt=fmt)
    return path, qemu_raw_bytes(path, tmp)


@pytest.mark.parametrize("fmt", sorted(TARGETS))
def test_convert_to_every_writable_format(tmp, fmt):
    src, want = make_source(tmp)
    make, checkable = TARGETS[fmt]
    dst = str(tmp / f"out.{fmt}")
    qb.convert(src, dst, make)
    assert qemu_raw_bytes(dst, tmp)[: len(want)] == want
    assert qemu_img("compare", "-f", "qcow2", "-F", fmt, src, dst, check=False).returncode == 0
    if checkable:
        qemu_check(dst)
    with qb.open(dst, flags=0) as img:
        assert img.virt_size >= SIZE and img.read(SIZE, 0) == want


@pytest.mark.parametrize("fmt", ["qcow2", "qcow", "qed", "vdi", "vmdk", "vpc", "vhdx", "parallels", "raw"])
def test_convert_what_qemu_wrote_in_every_format(tmp, fmt):
    src, want = make_source(tmp, fmt)
    dst = str(tmp / "out.qcow2")
    qb.convert(src, dst, qb.Qcow2Options)
    qemu_check(dst)
    assert qemu_img("compare", "-F", "qcow2", src, dst, check=False).returncode == 0
    assert qemu_raw_bytes(dst, tmp)[: len(want)] == want


def test_target_takes_the_source_size_and_its_own_options(tmp):
    src, want = make_source(tmp)
    dst = str(tmp / "out.qcow2")
    qb.convert(src, dst, qb.Qcow2Options(virt_size=2 * SIZE, cluster_size=4096, lazy_refcounts=True))
    info = qb.open(dst, flags=0).info()
    assert info.virt_size == 2 * SIZE and info.cluster_size == 4096
    for how in ("qcow2", qb.Format.QCOW2, qb.Qcow2Options, qb.RawOptions(virt_size=0)):
        out = tmp / "sized.img"
        qb.convert(src, str(out), how)
        with qb.open(str(out), flags=0) as img:
            assert img.virt_size == SIZE and img.read(SIZE, 0) == want
        out.unlink()
    with pytest.raises(qb.InvalidParamError, match="options must be"):
        qb.convert(src, str(tmp / "x"), 42)  # type: ignore[arg-type]


def _allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_zero_runs_become_holes_and_s0_allocates_everything(tmp):
    src = str(tmp / "src.raw")
    data = bytearray(8 * MiB)
    data[MiB : MiB + 4096] = b"\x11" * 4096
    data[5 * MiB + 8192 : 5 * MiB + 8192 + 100] = b"\x22" * 100
    Path(src).write_bytes(bytes(data))  # every byte written: no holes in the source
    sparse, full = str(tmp / "sparse.raw"), str(tmp / "full.raw")
    qb.convert(src, sparse, qb.RawOptions)
    qb.convert(src, full, qb.RawOptions, sparse_size=0)
    assert Path(sparse).read_bytes() == Path(full).read_bytes() == bytes(data)
    assert _allocated_bytes(sparse) <= 64 * 1024
    assert _allocated_bytes(full) >= 8 * MiB
    # qcow2: only the clusters holding data are allocated, as qemu-img map says
    q = str(tmp / "sparse.qcow2")
    qb.convert(src, q, qb.Qcow2Options)
    data_extents = [e for e in qemu_map(q) if e["data"]]
    assert sum(e["length"] for e in data_extents) == 2 * 65536
    qemu_check(q)


def test_sparse_size_is_the_minimum_hole(tmp):
    src = str(tmp / "src.raw")
    data = bytearray(MiB)
    for i in range(0, MiB, 8192):  # 4 KiB of data, 4 KiB of zeroes, alternating
        data[i : i + 4096] = b"\x33" * 4096
    Path(src).write_bytes(bytes(data))
    small, big = str(tmp / "small.raw"), str(tmp / "big.raw")
    qb.convert(src, small, qb.RawOptions, sparse_size=4096)
    qb.convert(src, big, qb.RawOptions, sparse_size=8192)
    assert Path(small).read_bytes() == Path(big).read_bytes() == bytes(data)
    assert _allocated_bytes(small) < _allocated_bytes(big)


def test_existing_target_is_overwritten_exactly(tmp):
    src, want = make_source(tmp)
    dst = str(tmp / "old.qcow2")
    qemu_img("create", "-f", "qcow2", dst, str(SIZE))
    qemu_io(dst, f"write -P 0x5a 0 {SIZE}")  # old data everywhere, also where the source is zero
    qb.convert(src, dst, existing=True)
    assert qemu_raw_bytes(dst, tmp) == want
    qemu_check(dst)


def test_backing_target_holds_only_what_differs(tmp):
    base = str(tmp / "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, f"write -P 0x41 0 {SIZE // 2}")
    src = str(tmp / "src.qcow2")
    qemu_img("convert", "-O", "qcow2", base, src)
    qemu_io(src, f"write -P 0x42 {MiB} 65536", f"write -z {3 * MiB} 65536", f"write -P 0x43 {20 * MiB} 4096")
    want = qemu_raw_bytes(src, tmp)
    dst = str(tmp / "overlay.qcow2")
    qb.convert(src, dst, qb.Qcow2Options(backing=base, backing_fmt=qb.Format.QCOW2))
    assert qemu_raw_bytes(dst, tmp) == want
    assert qemu_info(dst)["backing-filename"] == base
    top = [e for e in qemu_map(dst) if e["depth"] == 0 and (e["data"] or e["zero"]) and e["present"]]
    # three changed regions, each within one 64 KiB cluster (the zeroed one may be a zero cluster)
    assert sum(e["length"] for e in top) == 3 * 65536, top
    qemu_check(dst)


def test_sources_are_concatenated_and_a_range_can_be_picked(tmp):
    a, wa = make_source(tmp, size=3 * MiB, seed=2)
    b, wb = make_source(tmp, "vdi", size=5 * MiB, seed=3)
    dst = str(tmp / "cat.raw")
    qb.convert([a, b], dst)
    assert Path(dst).read_bytes() == wa + wb
    part = str(tmp / "part.qcow2")
    qb.convert([a, b], part, qb.Qcow2Options, start=2 * MiB + 512, length=2 * MiB)
    assert qemu_raw_bytes(part, tmp) == (wa + wb)[2 * MiB + 512 : 4 * MiB + 512]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_thread_count_does_not_change_the_result(tmp, threads):
    src, want = make_source(tmp)
    dst = str(tmp / f"t{threads}.qcow2")
    qb.convert(src, dst, qb.Qcow2Options, threads=threads)
    assert qemu_raw_bytes(dst, tmp) == want
    qemu_check(dst)


def test_progress_is_reported_up_to_the_total(tmp):
    src, _ = make_source(tmp)
    seen = []
    qb.convert(src, str(tmp / "p.raw"), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (SIZE, SIZE)
    assert all(t == SIZE for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_an_exception_from_progress_stops_and_removes_the_target(tmp):
    src, _ = make_source(tmp)
    dst = tmp / "stopped.qcow2"

    class Stop(Exception):
        pass

    def cb(done, total):
        if done > 0:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        qb.convert(src, str(dst), qb.Qcow2Options, progress=cb)
    assert not dst.exists()


def test_a_stopped_existing_target_stays_valid(tmp):
    src, _ = make_source(tmp)
    dst = str(tmp / "old.qcow2")
    qemu_img("create", "-f", "qcow2", dst, str(SIZE))

    def cb(done, total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qb.convert(src, dst, existing=True, progress=cb)
    qemu_check(dst)


@pytest.mark.parametrize(
    "kw, cls, msg",
    [
        ({"sparse_size": 1000}, qb.InvalidParamError, "multiple of 512"),
        ({"sparse_size": -512}, qb.InvalidParamError, "multiple of 512"),
        ({"threads": -1}, qb.InvalidParamError, "threads"),
        ({"compress": True}, qb.UnsupportedError, "cannot store compressed data"),
        ({"start": SIZE + 1}, qb.InvalidParamError, "start"),
        ({"start": 512, "length": SIZE}, qb.InvalidParamError, "length"),
    ],
)
def test_bad_arguments(tmp, kw, cls, msg):
    src, _ = make_source(tmp)
    dst = tmp / "never.raw"
    with pytest.raises(cls, match=msg):
        qb.convert(src, str(dst), **kw)
    assert not dst.exists()


def test_missing_source_and_small_existing_target(tmp):
    with pytest.raises(qb.QBlockError):
        qb.convert(str(tmp / "nope.qcow2"), str(tmp / "x.raw"))
    assert not (tmp / "x.raw").exists()
    src, _ = make_source(tmp)
    small = str(tmp / "small.qcow2")
    qemu_img("create", "-f", "qcow2", small, str(MiB))
    with pytest.raises(qb.InvalidParamError, match="smaller"):
        qb.convert(src, small, existing=True)
    with pytest.raises(qb.InvalidParamError, match="no options"):
        qb.convert(src, small, qb.Qcow2Options, existing=True)


def mixed_source(tmp: Path, size: int = SIZE) -> tuple[str, bytes]:
    """A qcow2 image of text (compressible), random bytes (not), zeroes and holes."""
    rng = random.Random(5)
    words = [b"disk ", b"image ", b"cluster ", b"qcow2 ", b"the ", b"of ", b"\n"]
    raw = bytearray(size)
    for k in range(0, size, 64 << 10):
        kind = rng.random()
        if kind < 0.35:
            text = b"".join(rng.choice(words) for _ in range(20000))[: 64 << 10]
            raw[k : k + len(text)] = text
        elif kind < 0.6:
            raw[k : k + (64 << 10)] = rng.randbytes(64 << 10)
        elif kind < 0.7:
            raw[k + 1000 : k + 1100] = b"x" * 100  # mostly zero
        elif kind < 0.85:  # random letters of a 16-letter alphabet: compressible without matches
            raw[k : k + (64 << 10)] = rng.randbytes(64 << 10).translate(bytes(65 + (i & 15) for i in range(256)))
    raw[-300:] = b"end" * 100
    rp = tmp / "mixed.raw"
    rp.write_bytes(bytes(raw))
    path = str(tmp / "mixed.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(rp), path)
    qemu_io(path, f"write -z {3 * MiB} {MiB}")
    raw[3 * MiB : 4 * MiB] = bytes(MiB)
    return path, bytes(raw)


COMPRESSED_TARGETS = [
    ("zlib", {}),
    ("zstd", {"compression_type": "zstd"}),
    ("v2 512-byte clusters", {"compat": "0.10", "cluster_size": 512}),
    ("2 MiB clusters extended L2", {"cluster_size": 2 * MiB, "extended_l2": True}),
    ("1-bit refcounts", {"refcount_bits": 1}),
    ("64-bit refcounts 4 KiB clusters", {"refcount_bits": 64, "cluster_size": 4096}),
]


def qemu_opts(o: dict) -> str:
    return ",".join(f"{k}={'on' if v is True else v}" for k, v in o.items())


@pytest.mark.parametrize("name, o", COMPRESSED_TARGETS, ids=[c[0] for c in COMPRESSED_TARGETS])
def test_compressed_convert_as_qemu_img(tmp, name, o):
    src, want = mixed_source(tmp)
    ours, theirs = str(tmp / "ours.qcow2"), str(tmp / "theirs.qcow2")
    qb.convert(src, ours, qb.Qcow2Options(SIZE, **o), compress=True)
    qemu_img("convert", "-c", "-O", "qcow2", *(["-o", qemu_opts(o)] if o else []), src, theirs)
    assert qemu_img("compare", src, ours, check=False).returncode == 0
    c = qemu_check(ours)
    assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0
    assert c["compressed-clusters"] > 0
    assert qemu_raw_bytes(ours, tmp) == want
    with qb.open(ours, flags=0) as img:
        assert img.read(SIZE, 0) == want
    # The same clusters are compressed as in qemu-img's copy, and the space
    # the file takes on disk is within a few clusters of it.
    cs = o.get("cluster_size", 65536)

    def kinds(path: str) -> dict:
        """Each data cluster's start -> compressed? (host placement aside)."""
        return {c: e["compressed"] for e in qemu_map(path) if e["data"]
                for c in range(e["start"], e["start"] + e["length"], cs)}

    assert kinds(ours) == kinds(theirs)
    assert os.stat(ours).st_blocks * 512 <= os.stat(theirs).st_blocks * 512 + 8 * max(cs, 4096)


def test_compressed_overlay_and_existing_target(tmp):
    src, want = mixed_source(tmp)
    base = str(tmp / "base.qcow2")
    qemu_img("convert", "-O", "qcow2", src, base)
    qemu_io(src, "write -P 9 0 64k", "write -P 8 5M 100k")
    want = qemu_raw_bytes(src, tmp)
    top = str(tmp / "top.qcow2")
    qb.convert(src, top, qb.Qcow2Options(SIZE, backing="base.qcow2", backing_fmt=qb.Format.QCOW2), compress=True)
    assert qemu_raw_bytes(top, tmp) == want
    own = [e for e in qemu_map(top) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in own) <= 4 * 64 << 10  # only the changed clusters
    qemu_check(top)
    # Into an image that already holds data: the old clusters are released.
    old = str(tmp / "old.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", old, str(SIZE))
    qemu_io(old, f"write -P 1 0 {SIZE}")
    qb.convert(src, old, existing=True, compress=True)
    assert qemu_raw_bytes(old, tmp) == want
    c = qemu_check(old)
    assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0


def test_compressed_convert_on_the_command_line(tmp):
    src, want = mixed_source(tmp)
    dst = tmp / "c.qcow2"
    r = subprocess.run([*qblock_cmd(), "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qemu_info(str(dst))["format-specific"]["data"]["compression-type"] == "zstd"
    assert qemu_raw_bytes(str(dst), tmp) == want and qemu_check(str(dst))["compressed-clusters"] > 0
    r = subprocess.run([*qblock_cmd(), "convert", "-c", "-O", "vdi", src, str(tmp / "c.vdi")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cannot store compressed data" in r.stderr and not (tmp / "c.vdi").exists()



def test_a_created_target_is_synced_only_when_asked(tmp, monkeypatch):
    from libqblock import cli, tools

    src, want = make_source(tmp)
    synced = []
    real = os.fsync
    monkeypatch.setattr(tools.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    qb.convert(src, str(tmp / "a.qcow2"), qb.Qcow2Options)
    assert synced == []  # qemu-img's default (-t unsafe): left to the page cache
    qb.convert(src, str(tmp / "b.qcow2"), qb.Qcow2Options, sync=True)
    assert synced == [str(tmp / "b.qcow2")]
    assert cli.main(["convert", "-t", "writeback", "-O", "qcow2", src, str(tmp / "c.qcow2")]) == 0
    assert synced[-1] == str(tmp / "c.qcow2")
    for name in "abc":
        assert qemu_raw_bytes(str(tmp / f"{name}.qcow2"), tmp) == want


RSS_CHILD = r"""
import sys
import libqblock as qb

class Sink:
    def write(self, b):
        return len(b)

    def flush(self):
        pass

src, job, out = sys.argv[1:4]
if job == "qcow2":
    qb.convert(src, out, "qcow2", compress=True)
else:
    qb.convert_to_stream(src, Sink(), "vmdk")
# VmHWM: this program's own peak (ru_maxrss would include the forked parent's, taken over at exec)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024)
"""


@pytest.mark.parametrize("job", ["qcow2", "vmdk-stream"])
def test_compressed_convert_memory_stays_bounded(tmp, job):
    """Thousands of well-compressing clusters held for one write batch must cost their bytes, not a
    cluster each: 4,000 of them once took 250 MiB."""
    src = tmp / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(1 << 40))
    rng = random.Random(7)
    script = "".join(f"write -q -P {i % 250 + 1} {i * 65536} 64k\n"
                     for i in rng.sample(range((1 << 40) // 65536), 4000))
    subprocess.run(["qemu-io", "-f", "qcow2", str(src)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(src), job, str(tmp / "out.qcow2")],
                       capture_output=True, text=True, check=True)
    assert int(r.stdout) < 150, f"peak RSS {r.stdout.strip()} MiB"
    if job == "qcow2":
        assert qemu_img("compare", str(src), str(tmp / "out.qcow2"), check=False).returncode == 0
