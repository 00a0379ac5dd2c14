"""Image locking against running QEMU processes: the same OFD byte locks QEMU's file driver takes, so
that a write-open fails while qemu-io holds the image for writing, QEMU refuses to write while we do,
read-only and force-share opens behave as QEMU's do, and close or death releases them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import libqblock as qb

from conftest import qblock_cmd, qemu_img

MiB = 1 << 20


@contextlib.contextmanager
def qemu_io_holding(path: Path, *args: str) -> Iterator[subprocess.Popen]:
    """A qemu-io process with `path` open (its locks taken) until the block ends."""
    p = subprocess.Popen(["qemu-io", *args, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # qemu-io prints its prompt only to a terminal: wait until it answers a command instead.
        p.stdin.write("length\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line.strip(), f"qemu-io did not open {path}: {p.stderr.read() if p.poll() is not None else ''}"
        yield p
    finally:
        p.stdin.close()
        p.wait(timeout=10)


def qemu_io_write(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", *args, "-c", "write -P 7 0 512", str(path)], capture_output=True, text=True)


@pytest.fixture
def image(tmp) -> Path:
    p = tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
    return p


def test_a_qemu_writer_keeps_us_out_and_force_share_reads(image):
    with qemu_io_holding(image, "-f", "qcow2"):
        with pytest.raises(qb.ImageLockedError, match='"write" lock'):
            qb.open(image, flags=qb.O_RDWR)
        # As qemu-img info: a reader does not let others write, so a writer's image refuses it too.
        with pytest.raises(qb.ImageLockedError, match='shared "write" lock'):
            qb.open(image, flags=0)
        with qb.open(image, flags=0, force_share=True) as img:
            assert img.virt_size == 4 * MiB
        with pytest.raises(qb.InvalidParamError, match="read-only"):
            qb.open(image, flags=qb.O_RDWR, force_share=True)
    with qb.open(image, flags=qb.O_RDWR) as img:  # the writer is gone: its locks went with it
        img.write(b"x", 0)


def test_our_writer_keeps_qemu_out_until_close(image):
    img = qb.open(image, flags=qb.O_RDWR)
    r = qemu_io_write(image, "-f", "qcow2")
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r.stderr
    r = qemu_img("info", str(image), check=False)
    assert r.returncode != 0 and 'shared "write" lock' in r.stderr
    assert qemu_img("info", "-U", str(image), check=False).returncode == 0
    img.close()  # the object lives on; its locks do not
    assert qemu_io_write(image, "-f", "qcow2").returncode == 0


def test_readers_share_and_keep_writers_out(image):
    with qb.open(image, flags=0) as img:
        with qemu_io_holding(image, "-r", "-f", "qcow2"):
            assert img.read(512, 0) == bytes(512)
        r = qemu_io_write(image, "-f", "qcow2")
        assert r.returncode != 0 and "lock" in r.stderr
    with qb.open(image, flags=0, force_share=True):
        assert qemu_io_write(image, "-f", "qcow2").returncode == 0  # -U denies nothing


def test_two_writers_in_one_process_conflict_as_two_processes_would(image):
    with qb.open(image, flags=qb.O_RDWR):
        with pytest.raises(qb.ImageLockedError):
            qb.open(image, flags=qb.O_RDWR)


def test_raw_is_shared_as_qemu_shares_it(tmp):
    """QEMU's raw format lets other writers in (a guest device is what denies them)."""
    p = tmp / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(p), "1M")
    with qemu_io_holding(p, "-f", "raw"):
        with qb.open(p, "raw", flags=qb.O_RDWR) as img:
            img.write(b"y", 0)


def test_create_refuses_an_image_in_use_and_leaves_it_whole(image):
    qemu_img("resize", "-q", str(image), "8M")
    size = image.stat().st_size
    with qemu_io_holding(image, "-f", "qcow2"):
        with pytest.raises(qb.ImageLockedError):
            qb.create(image, qb.Qcow2Options(MiB))
        assert image.stat().st_size == size  # not truncated
    assert qemu_img("check", "-q", str(image), check=False).returncode == 0


def test_backing_files_and_extents_are_locked(tmp, image):
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(top))
    with qb.open(top, flags=qb.O_RDWR):
        r = qemu_io_write(image, "-f", "qcow2")  # the backing file, opened read-only below us
        assert r.returncode != 0 and "lock" in r.stderr
    v = tmp / "split.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(v), "1M")
    with qb.open(v, flags=qb.O_RDWR):
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(tmp / "split-s001.vmdk")],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr


def test_a_killed_writer_leaves_no_lock(image):
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time, libqblock as qb\n"
                              f"img = qb.open({str(image)!r}, flags=qb.O_RDWR)\n"
                              "print('open', flush=True)\n"
                              "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(qb.ImageLockedError):
            qb.open(image, flags=qb.O_RDWR)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with qb.open(image, flags=qb.O_RDWR):
        pass


def test_the_command_line_reports_a_held_image(tmp, image):
    with qemu_io_holding(image, "-f", "qcow2"):
        for argv in (["info", str(image)], ["check", "-r", "leaks", str(image)], ["map", str(image)],
                     ["convert", "-O", "raw", str(image), str(tmp / "nope.raw")], ["check", str(image)],
                     ["snapshot", "-l", str(image)], ["measure", "-O", "qcow2", str(image)],
                     ["dd", f"if={image}", f"of={tmp / 'nope-dd.raw'}"]):
            r = subprocess.run([*qblock_cmd(), *argv], capture_output=True, text=True)
            assert r.returncode != 0 and "lock" in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        for argv in (["info", "-U", str(image)], ["map", "-U", "--output=json", str(image)],
                     ["checksum", "-U", str(image)], ["compare", "-U", str(image), str(image)],
                     ["read", "-U", str(image), "0", "512"],
                     ["convert", "-U", "-O", "raw", str(image), str(tmp / "copy.raw")],
                     ["convert", "-U", "-O", "qcow2", str(image), "-"], ["check", "-U", str(image)],
                     ["snapshot", "-l", "-U", str(image)], ["measure", "-U", "-O", "qcow2", str(image)],
                     ["dd", "-U", f"if={image}", f"of={tmp / 'dd.raw'}", "bs=64k", "count=2"]):
            r = subprocess.run([*qblock_cmd(), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            assert r.returncode == 0, (argv, r.stderr)
        # a repair writes: it cannot share
        r = subprocess.run([*qblock_cmd(), "check", "-U", "-r", "leaks", str(image)], capture_output=True, text=True)
        assert r.returncode != 0 and "-U" in r.stderr and "Traceback" not in r.stderr, r.stderr
        with pytest.raises(qb.InvalidParamError):
            qb.check(image, repair="leaks", force_share=True)
        assert qb.check(image, force_share=True).format is qb.Format.QCOW2
