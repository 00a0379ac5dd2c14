"""qb.checksum (against a plain-Python model of the documented algorithm) and
qb.compare / ``qblock compare`` (against qemu-img compare, exit codes included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import libqblock as qb
from conftest import qemu_img, qemu_io, qemu_raw_bytes

import blake3  # the test extra installs it

MiB = 1 << 20
BLOCK = 64 << 10
SEGMENT = 1024 * BLOCK


def model_checksum(data: bytes) -> str:
    """The README's qblock-checksum-v1, from the bytes alone."""
    segs = []
    for s in range(0, len(data), SEGMENT):
        seg = data[s : s + SEGMENT]
        segs.append(blake3.blake3(b"".join(blake3.blake3(seg[b : b + BLOCK]).digest()
                                         for b in range(0, len(seg), BLOCK))).digest())
    return blake3.blake3(b"qblock-checksum-v1" + len(data).to_bytes(8, "little") + b"".join(segs)).hexdigest()


def qcow2_with(tmp: Path, size: int, *cmds: str, name: str = "a.qcow2") -> str:
    p = str(tmp / name)
    qemu_img("create", "-f", "qcow2", p, str(size))
    if cmds:
        qemu_io(p, *cmds)
    return p


@pytest.mark.parametrize("size", [BLOCK, 3 * MiB + 512, SEGMENT + BLOCK + 4096, 2 * SEGMENT])
def test_checksum_matches_the_documented_algorithm(tmp, size):
    p = qcow2_with(tmp, size, "write -P 9 0 4096", f"write -P 3 {size // 2} {min(70000, size // 2 - 512)}",
                   f"write -P 5 {size - 512} 512")
    assert qb.checksum(p) == model_checksum(qemu_raw_bytes(p, tmp))


def test_checksum_is_the_same_in_every_format_and_thread_count(tmp):
    p = qcow2_with(tmp, 70 * MiB, "write -P 1 0 1M", f"write -P 2 {65 * MiB} 3M", f"write -z {MiB} 64k")
    want = qb.checksum(p)
    for fmt in ("raw", "vdi", "vmdk", "vhdx", "qed"):
        other = str(tmp / f"b.{fmt}")
        qemu_img("convert", "-O", fmt, p, other)
        assert qb.checksum(other) == want, fmt
    full = str(tmp / "full.raw")
    qemu_img("convert", "-S", "0", "-O", "raw", p, full)  # zeroes written, not holes
    assert qb.checksum(full, threads=1) == qb.checksum(full, threads=7) == want


def test_checksum_changes_with_one_byte_and_with_the_size(tmp):
    a = qcow2_with(tmp, 4 * MiB, "write -P 1 0 64k")
    b = qcow2_with(tmp, 4 * MiB, "write -P 1 0 64k", f"write -P 1 {3 * MiB + 17} 1", name="b.qcow2")
    c = qcow2_with(tmp, 4 * MiB + 512, "write -P 1 0 64k", name="c.qcow2")
    assert len({qb.checksum(a), qb.checksum(b), qb.checksum(c)}) == 3


def test_checksum_progress_and_cancel(tmp):
    p = qcow2_with(tmp, 200 * MiB, "write -P 1 0 100M")
    seen = []
    qb.checksum(p, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (200 * MiB, 200 * MiB)

    def stop(d, t):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        qb.checksum(p, progress=stop)


def qemu_compare(*args: str) -> subprocess.CompletedProcess:
    return qemu_img("compare", *args, check=False)


def qblock(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libqblock", *args], capture_output=True, text=True)


CASES = {
    "same content, other allocation": ("write -P 1 0 64k", f"write -P 1 0 64k; write -z {MiB} 64k"),
    "one sector differs": ("write -P 1 0 1M", "write -P 1 0 1M; write -P 2 4608 1"),
    "data against a hole": ("write -P 0 0 64k; write -P 4 700000 512", ""),
    "zero data against a hole": ("write -P 0 0 1M", ""),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strict", [False, True])
def test_compare_agrees_with_qemu_img(tmp, case, strict):
    ca, cb = CASES[case]
    a = qcow2_with(tmp, 2 * MiB, *[c.strip() for c in ca.split(";") if c.strip()], name="a.qcow2")
    b = qcow2_with(tmp, 2 * MiB, *[c.strip() for c in cb.split(";") if c.strip()], name="b.qcow2")
    flags = ["-s"] if strict else []
    want = qemu_compare(*flags, a, b)
    got = qblock("compare", *flags, a, b)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), (want.stderr, got.stderr)
    r = qb.compare(a, b, strict=strict)
    assert r.identical == (want.returncode == 0) and r.message == want.stdout.strip()


@pytest.mark.parametrize("tail", ["", "write -P 1 2M 512"])
@pytest.mark.parametrize("strict", [False, True])
def test_compare_of_different_sizes_agrees_with_qemu_img(tmp, tail, strict):
    a = qcow2_with(tmp, 2 * MiB, "write -P 1 0 4k", name="a.qcow2")
    b = qcow2_with(tmp, 3 * MiB, "write -P 1 0 4k", *([tail] if tail else []), name="b.qcow2")
    flags = ["-s"] if strict else []
    for x, y in ((a, b), (b, a)):
        want = qemu_compare(*flags, x, y)
        got = qblock("compare", *flags, x, y)
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
        assert qb.compare(x, y, strict=strict).sizes == (qb.open(x, flags=0).virt_size, qb.open(y, flags=0).virt_size)


def test_compare_errors_exit_2_with_one_line(tmp):
    a = qcow2_with(tmp, MiB)
    got = qblock("compare", a, str(tmp / "missing.qcow2"))
    assert got.returncode == 2 == qemu_compare(a, str(tmp / "missing.qcow2")).returncode
    assert got.stderr.startswith("qblock: ") and got.stderr.count("\n") == 1 and "Traceback" not in got.stderr
    assert qblock("compare", "-q", a, a).stdout == ""
    with pytest.raises(qb.InvalidParamError, match="expected one image"):
        qb.compare([a, a], a)  # type: ignore[arg-type]
    with pytest.raises(qb.InvalidParamError, match="expected one image"):
        qb.checksum([a])  # type: ignore[arg-type]


def _bytes_read() -> int:
    """What this process has read through read(2)/pread(2) so far (/proc/self/io's rchar, all threads)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_ranges_that_block_status_calls_zero_are_not_read(tmp):
    # A 1 GiB raw file that is one hole but for 64 KiB: reading the hole would
    # cost 1 GiB of pread; convert, checksum and compare must skip it.
    src = tmp / "sparse.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 * MiB)
        f.write(b"\x5a" * 65536)
    dst = str(tmp / "copy.qcow2")
    for job in (
        lambda: qb.convert(str(src), dst, qb.Qcow2Options),
        lambda: qb.checksum(str(src)),
        lambda: qb.compare(str(src), dst),
    ):
        before = _bytes_read()
        job()
        assert _bytes_read() - before < 32 * MiB
    assert qb.compare(str(src), dst).identical
    assert qb.checksum(str(src)) == qb.checksum(dst)
