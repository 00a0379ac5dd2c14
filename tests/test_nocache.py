"""O_NOCACHE: every file of the chain opened with O_DIRECT. Any offset and
length still work (aligned bounce buffers, read-modify-write of partial
blocks), images stay what QEMU reads, and the page cache is bypassed."""

from __future__ import annotations

import os
import threading

import pytest

import libqblock as qb

from conftest import qemu_img, qemu_io, qemu_raw_bytes

MiB = 1 << 20
NOCACHE = qb.O_RDWR | qb.O_NOCACHE


def test_direct_descriptor_is_used(tmp):
    p = tmp / "d.raw"
    qb.create(p, qb.RawOptions(MiB))
    with qb.open(p, qb.Format.RAW, flags=NOCACHE):
        flags = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == str(p):
                    info = open(f"/proc/self/fdinfo/{fd}").read()
                    flags.append(int(info.split("flags:")[1].split()[0], 8))
            except OSError:
                pass
        assert flags and all(f & os.O_DIRECT for f in flags)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc", "vdi", "qed"])
def test_unaligned_workload_reads_back_and_qemu_agrees(tmp, fmt):
    p = tmp / f"d.{fmt}"
    size = 8 * MiB + 512  # an odd size: the last block is partial
    if fmt in ("vmdk", "vpc", "vdi", "qed"):
        size = 8 * MiB
    qemu_img("create", "-q", "-f", fmt, str(p), str(size))
    with qb.open(p, fmt, flags=0) as img:
        size = img.virt_size
    model = bytearray(size)
    with qb.open(p, fmt, flags=NOCACHE) as img:
        for i, (off, n) in enumerate(((1, 1), (4095, 2), (8191, 9000), (3 * MiB - 7, 70001), (size - 3, 3), (65536, 4096))):
            data = bytes([i + 1]) * n
            img.write(data, off)
            model[off : off + n] = data
        img.write_zeroes(1 * MiB, 65536 + 5)
        model[1 * MiB : 1 * MiB + 65541] = bytes(65541)
        img.flush()
        assert img.read(size, 0) == bytes(model)
        assert img.read(3, 4094) == bytes(model[4094:4097])
        buf = bytearray(10007)
        img.readinto(memoryview(buf), 3 * MiB - 11)
        assert buf == model[3 * MiB - 11 : 3 * MiB - 11 + 10007]
    assert qemu_raw_bytes(str(p), tmp, "-f", fmt) == bytes(model)
    if fmt not in ("raw", "vpc"):  # QEMU checks neither
        r = qemu_img("check", "-f", fmt, str(p), check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_backing_chain_and_qemu_written_data(tmp):
    base = tmp / "base.qcow2"
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(str(base), "write -P 0x5a 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "4M")
    with qb.open(top, flags=NOCACHE) as img:
        img.write(b"\x01" * 100, 1000)  # copy-on-write from the backing file
        assert img.read(2048, 0) == b"\x5a" * 1000 + b"\x01" * 100 + b"\x5a" * 948
    assert qemu_raw_bytes(str(top), tmp)[:2048] == b"\x5a" * 1000 + b"\x01" * 100 + b"\x5a" * 948


def test_concurrent_unaligned_writers(tmp):
    p = tmp / "t.raw"
    qb.create(p, qb.RawOptions(4 * MiB))
    with qb.open(p, qb.Format.RAW, flags=NOCACHE) as img:
        def work(t: int) -> None:
            # Thread t owns byte t of every 8: all threads share every block.
            for k in range(1500):
                img.write(bytes([t + 1]), (k * 4099 % (4 * MiB - 8)) // 8 * 8 + t)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        data = img.read(4 * MiB, 0)
    for t in range(8):
        for k in range(1500):
            assert data[(k * 4099 % (4 * MiB - 8)) // 8 * 8 + t] == t + 1
