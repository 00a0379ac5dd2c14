"""Resource bounds on hostile images: a field the file chooses must not size
an allocation, a loop or a recursion without a cap. Each image here is built
from a valid one with one field patched so that an unbounded reader would
hold far more memory than it needs (a stored chunk read whole, a table held
twice, a list of every table entry); it is opened and read in a child process
whose peak resident memory above its own baseline is measured (VmHWM; the
child's, not the parent's) and must stay under PEAK_BUDGET_MIB. The backing
chain cases check the depth cap (image.rs MAX_CHAIN_DEPTH, 64 images) and
loops through more than one format.
"""
from __future__ import annotations

import struct
import uuid
import zlib
from pathlib import Path

import pytest

import libqblock as qb
from childrun import run_result_child
from conftest import qemu_img

KiB, MiB = 1024, 1024 * 1024
TIMEOUT = 60
ADDRESS_SPACE = 2 << 30
# Peak growth allowed above the child's baseline: the images below make an
# unbounded reader grow by 120 MiB or more.
PEAK_BUDGET_MIB = 48
MAX_CHAIN_DEPTH = 64

CHILD = r"""
import json, sys
def status(key):
    return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(key)))
p = json.loads(sys.argv[1])
out = {"exc": None, "msg": None, "reads": []}
import libqblock as qb
out["base_kib"] = status("VmRSS")
try:
    img = qb.open(p["path"], fmt=p["fmt"], flags=0)
    for off, n in p["reads"]:
        out["reads"].append(img.read(n, off).hex()[:64])
    img.close()
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:400]
out["peak_kib"] = status("VmHWM")
print("RESULT " + json.dumps(out), flush=True)
"""



def run_child(path: Path, fmt: str, reads=()) -> dict:
    params = {"path": str(path), "fmt": fmt, "reads": list(reads)}
    res = run_result_child(CHILD, params, path.name, timeout=TIMEOUT, address_space=ADDRESS_SPACE)
    grown = (res["peak_kib"] - res["base_kib"]) // 1024
    assert grown < PEAK_BUDGET_MIB, f"{path.name}: peak grew by {grown} MiB: {res}"
    return res


def pattern(n: int, seed: int) -> bytes:
    return bytes(((i * 13 + seed) ^ (i >> 10)) & 0xFF for i in range(n))


# --- cloop: a block storing 120 MiB (under QEMU's 128 MiB cap) ------------------

CLOOP_MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def test_cloop_block_with_120_mib_stored_is_read_in_pieces(tmp_path):
    """Block 0's stored span is 120 MiB: a zlib stream of the 64 KiB block,
    then zeroes (a sparse hole). The reader used to allocate and read the
    whole span; now it reads 256 KiB pieces and stops at the stream's end."""
    bs = 64 * KiB
    b0, b1 = pattern(bs, 1), pattern(bs, 2)
    z0, z1 = zlib.compress(b0), zlib.compress(b1)
    table_end = 136 + 8 * 3
    span = 120 * MiB
    offsets = [table_end, table_end + span, table_end + span + len(z1)]
    p = tmp_path / "long-block.cloop"
    with open(p, "wb") as f:
        f.write(CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", bs, 2) + struct.pack(">3Q", *offsets))
        f.write(z0)
        f.seek(offsets[1])
        f.write(z1)
    res = run_child(p, "cloop", [(0, 4096), (bs, bs)])
    assert res["exc"] is None, res
    assert res["reads"] == [b0[:32].hex(), b1[:32].hex()]


# --- dmg: a zlib chunk storing 60 MiB (under QEMU's 64 MiB cap) ------------------


def test_dmg_chunk_with_60_mib_stored_is_read_in_pieces(tmp_path):
    """A UDZO chunk of 1 MiB whose stored length is 60 MiB (the stream, then
    padding): decoded from 256 KiB pieces, not from a 60 MiB input buffer."""
    from test_dmg import UDZO, build

    data = pattern(MiB, 3)
    stored = zlib.compress(data).ljust(60 * MiB, b"\0")
    p = tmp_path / "long-chunk.dmg"
    p.write_bytes(build([[(UDZO, MiB // 512, stored)]]))
    res = run_child(p, "dmg", [(0, 4096), (MiB - 4096, 4096)])
    assert res["exc"] is None, res
    assert res["reads"] == [data[:32].hex(), data[MiB - 4096:MiB - 4064].hex()]


# --- vhdx: a 4 TiB disk of 1 MiB blocks, every BAT entry naming one block -------

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le


def _vhdx_bat(path: Path) -> tuple:
    """(offset, length) of the BAT region, from the first region table."""
    with open(path, "rb") as f:
        f.seek(192 * KiB)
        rt = f.read(64 * KiB)
    assert rt[:4] == b"regi"
    (count,) = struct.unpack_from("<I", rt, 8)
    for i in range(count):
        at = 16 + 32 * i
        if rt[at:at + 16] == BAT_GUID:
            off, length = struct.unpack_from("<QI", rt, at + 16)
            return off, length
    raise AssertionError("no BAT region")


def test_vhdx_bat_naming_one_block_4m_times_is_refused_within_budget(tmp_path):
    """4 Mi payload entries (a 32 MiB BAT) all FULLY_PRESENT at one offset in
    a 40 MiB file. Refused as corrupt once more blocks are listed than the
    file holds (40), before a 96 MiB list of every block, and with the BAT
    held once, in pages."""
    p = tmp_path / "one-block.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", str(p), "4T")
    bat_off, bat_len = _vhdx_bat(p)
    assert bat_len >= 32 * MiB
    # The data block goes after every region qemu-img laid out.
    target = -(-p.stat().st_size // MiB) * MiB
    size = target + MiB
    entry = struct.pack("<Q", target | 6)
    # 512-byte logical sectors and 1 MiB blocks: a sector bitmap entry after
    # every 4096 payload entries.
    chunk = entry * 4096 + bytes(8)
    n_chunks = (4 << 40) // MiB // 4096
    with open(p, "r+b") as f:
        f.seek(bat_off)
        f.write(chunk * n_chunks)
        f.truncate(size)
    res = run_child(p, "vhdx")
    assert res["exc"] == "CorruptImageError", res
    assert "more than the file holds" in res["msg"], res


def test_vhdx_64_tib_opens_and_reads(tmp_path):
    """The cap is QEMU's (64 TiB), and a 64 TiB disk still opens, is written
    at its last block and read back."""
    p = tmp_path / "big.vhdx"
    qemu_img("create", "-f", "vhdx", str(p), "64T")
    last = (64 << 40) - 8 * KiB
    with qb.open(str(p), fmt="vhdx", flags=qb.O_RDWR) as img:
        assert img.virt_size == 64 << 40
        img.write(b"\x5a" * 4096, last)
    res = run_child(p, "vhdx", [(last, 4096), (0, 4096)])
    assert res["exc"] is None, res
    assert res["reads"] == [(b"\x5a" * 32).hex(), bytes(32).hex()]


# --- vpc: every BAT entry naming one block ---------------------------------------


def test_vpc_bat_naming_one_block_everywhere_is_refused(tmp_path):
    p = tmp_path / "one-block.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=dynamic", str(p), "100G")
    b = bytearray(p.read_bytes())
    (bat_off,) = struct.unpack_from(">Q", b, 512 + 16)
    (entries,) = struct.unpack_from(">I", b, 512 + 28)
    assert entries > 40000
    first = (bat_off + 4 * entries + 511) // 512
    b[bat_off:bat_off + 4 * entries] = struct.pack(">I", first) * entries
    footer = bytes(b[:512])
    b = b[:-512] + bytes(8 * MiB) + footer
    p.write_bytes(bytes(b))
    res = run_child(p, "vpc")
    assert res["exc"] == "CorruptImageError", res
    assert "without overlap" in res["msg"], res


# --- backing chains: the depth cap and loops through several formats ------------


def _chain(tmp: Path, n: int, fmts=("qcow2",)) -> Path:
    """n images: a raw base of 0x5a-free zeroes, then n-1 overlays in turn of
    the given formats; returns the top."""
    prev, prev_fmt = tmp / "c000.raw", "raw"
    with open(prev, "wb") as f:
        f.truncate(MiB)
    for i in range(1, n):
        fmt = fmts[i % len(fmts)]
        cur = tmp / f"c{i:03d}.{fmt}"
        qemu_img("create", "-f", fmt, "-u", "-b", prev.name, "-F", prev_fmt, str(cur), str(MiB))
        prev, prev_fmt = cur, fmt
    return prev


@pytest.mark.parametrize("fmts", [("qcow2",), ("qcow2", "qed")], ids=["qcow2", "qcow2-qed"])
def test_backing_chain_of_the_cap_opens_one_more_is_corrupt(tmp_path, fmts):
    top = _chain(tmp_path, MAX_CHAIN_DEPTH, fmts)
    with qb.open(str(top)) as img:
        assert img.read(4096, 0) == bytes(4096)
    over = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", top.name, "-F", top.suffix[1:], str(over), str(MiB))
    with pytest.raises(qb.CorruptImageError, match=f"deeper than {MAX_CHAIN_DEPTH}"):
        qb.open(str(over))


def test_backing_loop_through_qcow2_and_qed_is_corrupt(tmp_path):
    a, b = tmp_path / "a.qed", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qed", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a), str(MiB))
    qemu_img("create", "-f", "qcow2", "-u", "-b", "a.qed", "-F", "qed", str(b), str(MiB))
    for top in (a, b):
        with pytest.raises(qb.CorruptImageError, match="loops"):
            qb.open(str(top))
