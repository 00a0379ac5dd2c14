"""qb.check and qblock check against qemu-img check, on clean and deliberately damaged qcow2 images.

Each damaged image is checked by both; the counts, the JSON (field by field,
in qemu-img's key order) and the findings must agree. Repairs are compared
by outcome: after our repair qemu-img must find the image clean and reading
the same guest data as before. The filename in the JSON is the path exactly
as given to each tool (the tests give both the same string).
"""

from __future__ import annotations

import bz2
import json
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

import libqblock as qb

from conftest import CORPUS, qblock_cmd, qemu_img, qemu_io

CS = 65536



def qemu_check(path: str, *args: str) -> Tuple[int, Optional[dict], List[str]]:
    """(exit code, JSON or None when it failed, stderr lines) of qemu-img check."""
    r = qemu_img("check", "--output=json", *args, path, check=False)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r.stderr.splitlines()


# --- reading and damaging qcow2 metadata ---------------------------------------------------------


class Meta:
    """The few header fields the damages need (v2 and v3, 16-bit refcounts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            h = f.read(104)
        self.version = struct.unpack(">I", h[4:8])[0]
        self.cluster_bits = struct.unpack(">I", h[20:24])[0]
        self.cs = 1 << self.cluster_bits
        self.l1_offset = struct.unpack(">Q", h[40:48])[0]
        self.reftable = struct.unpack(">Q", h[48:56])[0]
        self.order = struct.unpack(">I", h[96:100])[0] if self.version == 3 else 4
        assert self.order == 4, "the damages assume 16-bit refcounts"

    def u64(self, off: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8))[0]

    def put64(self, off: int, v: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(struct.pack(">Q", v))

    def refcount_at(self, cluster: int) -> int:
        epb = self.cs * 8 >> self.order
        block = self.u64(self.reftable + 8 * (cluster // epb)) & ~0x1FF
        return block + 2 * (cluster % epb)

    def set_refcount(self, cluster: int, v: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.refcount_at(cluster))
            f.write(struct.pack(">H", v))

    def l1_entry(self, i: int) -> int:
        return self.l1_offset + 8 * i

    def l2_entry(self, guest: int) -> int:
        """Where the L2 entry of a guest offset is (its L2 table must exist)."""
        l2_bits = self.cluster_bits - 3
        l2 = self.u64(self.l1_entry(guest >> (self.cluster_bits + l2_bits))) & 0x00FFFFFFFFFFFE00
        assert l2, "no L2 table"
        return l2 + 8 * ((guest >> self.cluster_bits) & ((1 << l2_bits) - 1))


COPIED = 1 << 63


def leak(m: Meta) -> None:
    """One cluster past the used ones, with refcount 1 and no reference."""
    size = os.path.getsize(m.path)
    end = -(-size // m.cs) * m.cs
    os.truncate(m.path, end + m.cs)
    m.set_refcount(end // m.cs, 1)


def shared_leak(m: Meta) -> None:
    """A data cluster's refcount raised to 2: a leak, and a copied flag that lies."""
    host = m.u64(m.l2_entry(0)) & 0x00FFFFFFFFFFFE00
    m.set_refcount(host // m.cs, 2)


def zero_refcount(m: Meta) -> None:
    """A used data cluster's refcount dropped to 0."""
    host = m.u64(m.l2_entry(0)) & 0x00FFFFFFFFFFFE00
    m.set_refcount(host // m.cs, 0)


def shared_too_low(m: Meta) -> None:
    """A cluster the snapshot shares with the active layer, its refcount 2 lowered to 1."""
    host = m.u64(m.l2_entry(64 << 10)) & 0x00FFFFFFFFFFFE00
    m.set_refcount(host // m.cs, 1)


def copied_l2(m: Meta) -> None:
    at = m.l2_entry(0)
    m.put64(at, m.u64(at) & ~COPIED)


def copied_l1(m: Meta) -> None:
    m.put64(m.l1_entry(0), m.u64(m.l1_entry(0)) & ~COPIED)


def l2_past_eof(m: Meta) -> None:
    """The L1 entry names an L2 table 1 GiB past the end of the file (the old one and its data leak)."""
    m.put64(m.l1_entry(0), (1 << 30) | COPIED)


def data_unaligned(m: Meta) -> None:
    at = m.l2_entry(0)
    m.put64(at, m.u64(at) + 512)


def zero_unaligned(m: Meta) -> None:
    """A preallocated zero cluster (at 4 MiB) whose offset is not cluster aligned."""
    at = m.l2_entry(4 << 20)
    e = m.u64(at)
    assert e & 1 and e & 0x00FFFFFFFFFFFE00, "not a preallocated zero cluster"
    m.put64(at, e + 512)


def reftable_reserved(m: Meta) -> None:
    m.put64(m.reftable, m.u64(m.reftable) | 1)


def compressed_copied(m: Meta) -> None:
    """The copied flag on a compressed cluster (the image has one at 2 MiB)."""
    at = m.l2_entry(2 << 20)
    e = m.u64(at)
    assert e & (1 << 62), "not compressed"
    m.put64(at, e | COPIED)


DAMAGES: Dict[str, Callable[[Meta], None]] = {
    "leak": leak,
    "shared_leak": shared_leak,
    "shared_too_low": shared_too_low,
    "zero_refcount": zero_refcount,
    "copied_l2": copied_l2,
    "copied_l1": copied_l1,
    "l2_past_eof": l2_past_eof,
    "data_unaligned": data_unaligned,
    "zero_unaligned": zero_unaligned,
    "reftable_reserved": reftable_reserved,
    "compressed_copied": compressed_copied,
}


def make_image(path: Path, *opts: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", ",".join(opts)] if opts else []), str(path), "64M")
    qemu_io(str(path), "write -P 1 0 1M", "write -P 2 10M 192k", "write -c -P 3 2M 64k", "write -P 4 1M 64k",
            "write -P 5 4M 64k", "write -z 4M 64k")  # the last one stays allocated, reading as zeroes
    # An internal snapshot shares what was written so far; then the active
    # layer rewrites its first cluster (its L2 table is copied).
    qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io(str(path), "write -P 6 0 64k")
    return path


def assert_same_as_qemu(path: Path, r: qb.CheckResult, stderr: Optional[List[str]] = None) -> None:
    rc, want, lines = qemu_check(str(path))
    assert want is not None, lines
    got = r.to_qemu_json()
    assert got == want, (got, want, lines)
    assert list(got) == list(want), "key order"
    assert list(r.messages) == lines
    assert (0 if r.clean else 2 if r.corruptions else 3) == rc


# --- checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [(), ("compat=0.10",), ("cluster_size=4096",), ("extended_l2=on",),
                                  ("lazy_refcounts=on",)])
def test_clean_images_match_qemu(tmp, opts):
    p = make_image(tmp / "a.qcow2", *opts)
    r = qb.check(str(p))
    assert r.clean and r.format is qb.Format.QCOW2 and r.filename == str(p)
    cs = json.loads(qemu_img("info", "--output=json", str(p)).stdout)["cluster-size"]
    assert r.total_clusters == (64 << 20) // cs and r.allocated_clusters and r.image_end_offset
    assert_same_as_qemu(p, r)


def test_snapshots_bitmaps_and_data_files_are_counted(tmp):
    p = make_image(tmp / "s.qcow2")
    qemu_img("snapshot", "-c", "one", str(p))
    qemu_io(str(p), "write -P 9 0 64k", "write -P 9 20M 64k")
    qemu_img("snapshot", "-c", "two", str(p))
    qemu_img("bitmap", "--add", str(p), "b0")
    qemu_io(str(p), "write -P 5 30M 64k")
    r = qb.check(p)
    assert r.clean, r.messages
    assert_same_as_qemu(p, r)
    # A repair of a clean image changes nothing. (qemu-img 10's check -r of an
    # image with both internal snapshots and a bitmap drops the snapshot
    # table and frees the snapshots' clusters as leaks; we keep them.)
    before = p.read_bytes()
    r = qb.check(p, repair="leaks")
    assert r.clean and not (r.leaks_fixed or r.corruptions_fixed)
    assert p.read_bytes() == before
    assert len(json.loads(qemu_img("info", "--output=json", str(p)).stdout)["snapshots"]) == 3
    d = tmp / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp / 'd.raw'}", str(d), "8M")
    qemu_io(str(d), "write -P 1 0 1M")
    assert_same_as_qemu(d, qb.check(str(d)))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damage_is_found_as_qemu_finds_it(tmp, damage):
    p = make_image(tmp / "x.qcow2")
    DAMAGES[damage](Meta(p))
    r = qb.check(str(p))
    assert not r.clean
    assert_same_as_qemu(p, r)


# Version 2 images have no zero clusters, so no preallocated one to damage.
@pytest.mark.parametrize("compat, damage", [(c, d) for c in ("1.1", "0.10") for d in sorted(DAMAGES)
                                            if (c, d) != ("0.10", "zero_unaligned")])
@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_repairs_match_qemu(tmp, damage, repair, compat):
    orig = make_image(tmp / "orig.qcow2", f"compat={compat}")
    DAMAGES[damage](Meta(orig))
    theirs, ours = tmp / "theirs.qcow2", tmp / "ours.qcow2"
    shutil.copy(orig, theirs)
    shutil.copy(orig, ours)
    qrc, qjson, qlines = qemu_check(str(theirs), "-r", repair)
    rc = subprocess.run([*qblock_cmd(), "check", "-r", repair, "--output=json", str(ours)],
                        capture_output=True, text=True)
    if damage == "reftable_reserved" and repair == "all":
        # qemu-img's rebuild reuses the cluster of the refcount block it no
        # longer trusts, trips over its own overlap check, marks the image
        # corrupt and fails; ours writes the new structure past the end.
        assert qrc == 1 and "ERROR writing refblock: Input/output error" in "\n".join(qlines)
        assert rc.returncode == 0 and json.loads(rc.stdout)["corruptions-fixed"] == 1
        assert qemu_check(str(ours))[0] == 0
        assert same_guest_data(orig, ours)
        return
    assert rc.returncode == qrc, (rc.stdout, rc.stderr, qlines)
    if qjson is None:
        # qemu-img gave up (a rebuild only -r all does): so do we, leaving the image as it was.
        assert rc.stdout == "" and "Check failed" in rc.stderr
        assert ours.read_bytes() == orig.read_bytes()
        return
    mine = json.loads(rc.stdout)
    # The layout of a rebuilt refcount structure is ours: only where the file ends may differ.
    for d in (mine, qjson):
        d.pop("image-end-offset")
        d.pop("filename")
    assert mine == qjson
    # Our repaired image: qemu-img agrees with our check of it, and the guest data is as before.
    after = qb.check(str(ours))
    assert_same_as_qemu(ours, after)
    assert same_guest_data(orig, ours, theirs)
    if qrc == 0:
        info = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
        assert not info.get("dirty-flag")


def same_guest_data(orig: Path, ours: Path, theirs: Optional[Path] = None) -> bool:
    """qemu-img compare of the damaged original and our repair; when qemu-img
    cannot read the original (a misaligned data cluster), our repair must read
    like qemu-img's own (or fail to, the same way)."""
    def cmp(a: Path, b: Path) -> int:
        return qemu_img("compare", str(a), str(b), check=False).returncode
    if cmp(orig, orig) == 0 or theirs is None:
        return cmp(orig, ours) == 0
    return cmp(theirs, ours) == cmp(theirs, theirs)


def dirty_image(tmp: Path) -> Path:
    """A lazy-refcounts image whose writer died before writing its refcounts back."""
    p = tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "64M")
    subprocess.run([shutil.which("qemu-io") or "qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M",
                    "-c", "write -P 8 5M 128k", "-c", "abort", str(p)], capture_output=True)
    assert json.loads(qemu_img("info", "--output=json", str(p)).stdout)["dirty-flag"]
    return p


def test_dirty_image_is_reported_as_it_is_on_disk(tmp):
    p = dirty_image(tmp)
    r = qb.check(p)
    assert r.corruptions > 0
    assert_same_as_qemu(p, r)
    # Reading it the normal way (read-only) does not repair it either.
    assert json.loads(qemu_img("info", "--output=json", str(p)).stdout)["dirty-flag"]


def test_dirty_image_repaired(tmp):
    p = dirty_image(tmp)
    qemu_img("convert", "-O", "raw", str(p), str(tmp / "before.raw"))
    with pytest.raises(qb.CorruptImageError, match="need to rebuild"):
        qb.check(p, repair="leaks")
    r = qb.check(p, repair="all")
    assert r.clean and r.corruptions_fixed > 0, r
    assert qemu_check(str(p))[0] == 0
    assert not json.loads(qemu_img("info", "--output=json", str(p)).stdout)["dirty-flag"]
    qemu_img("convert", "-O", "raw", str(p), str(tmp / "after.raw"))
    assert (tmp / "before.raw").read_bytes() == (tmp / "after.raw").read_bytes()


def test_repair_text_and_human_output_match_qemu(tmp):
    for damage in ("leak", "zero_refcount"):
        orig = make_image(tmp / f"{damage}.qcow2")
        DAMAGES[damage](Meta(orig))
        for repair in (None, "all"):
            a, b = tmp / "a.qcow2", tmp / "b.qcow2"
            shutil.copy(orig, a)
            shutil.copy(orig, b)
            args = ["-r", repair] if repair else []
            ours = subprocess.run([*qblock_cmd(), "check", *args, str(a)], capture_output=True, text=True)
            theirs = qemu_img("check", *args, str(b), check=False)
            assert ours.returncode == theirs.returncode
            if repair and damage == "zero_refcount":
                # Where our rebuilt refcount structure ends differs; nothing else.
                strip = lambda s: [l for l in s.splitlines() if not l.startswith("Image end offset")]  # noqa: E731
                assert strip(ours.stdout) == strip(theirs.stdout)
            else:
                assert ours.stdout == theirs.stdout
            assert qb.check(a).clean == (repair is not None)


# --- the command ----------------------------------------------------------------------------------


def test_exit_codes_and_quiet(tmp):
    clean = make_image(tmp / "c.qcow2")
    leaky = make_image(tmp / "l.qcow2")
    leak(Meta(leaky))
    broken = make_image(tmp / "b.qcow2")
    zero_refcount(Meta(broken))
    raw = tmp / "r.raw"
    raw.write_bytes(b"\0" * 4096)
    for path, code in ((clean, 0), (leaky, 3), (broken, 2), (raw, 63), (tmp / "missing.qcow2", 1)):
        ours = subprocess.run([*qblock_cmd(), "check", str(path)], capture_output=True, text=True)
        theirs = qemu_img("check", str(path), check=False)
        assert ours.returncode == theirs.returncode == code, (path, ours.stderr)
        assert "Traceback" not in ours.stderr
        quiet = subprocess.run([*qblock_cmd(), "check", "-q", str(path)], capture_output=True, text=True)
        assert quiet.returncode == code and quiet.stdout == ""
    r = subprocess.run([*qblock_cmd(), "check", str(raw)], capture_output=True, text=True)
    assert r.stderr == "qblock: This image format does not support checks\n"
    assert qemu_img("check", str(raw), check=False).stderr == "qemu-img: This image format does not support checks\n"
    r = subprocess.run([*qblock_cmd(), "check", "--output=json", str(clean)], capture_output=True, text=True)
    assert r.stdout == qemu_img("check", "--output=json", str(clean)).stdout


def test_api_errors(tmp):
    p = make_image(tmp / "a.qcow2")
    with pytest.raises(qb.InvalidParamError):
        qb.check(p, repair="everything")
    raw = tmp / "r.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(qb.UnsupportedError, match="does not support checks"):
        qb.check(raw)
    with pytest.raises(qb.UnsupportedError):
        qb.check(p, format="raw")
    with pytest.raises(qb.InvalidParamError):
        qb.check(p, format="nosuch")
    with pytest.raises(qb.QBlockError):
        qb.check(tmp / "missing.qcow2")


def test_result_dataclass():
    r = qb.CheckResult(filename="x", format=qb.Format.QCOW2, leaks=2, total_clusters=10, allocated_clusters=4,
                       fragmented_clusters=0, compressed_clusters=0, image_end_offset=65536)
    assert not r.clean
    assert r.to_qemu_json() == {"image-end-offset": 65536, "total-clusters": 10, "check-errors": 0, "leaks": 2,
                                "allocated-clusters": 4, "filename": "x", "format": "qcow2"}
    assert r.to_qemu_human().endswith("4/10 = 40.00% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
                                      "Image end offset: 65536\n")
    with pytest.raises(Exception):
        r.leaks = 0  # type: ignore[misc]


# --- hostile input --------------------------------------------------------------------------------


def test_mangled_metadata_never_breaks_the_check(tmp):
    """Random bytes over the metadata: a report or a documented exception, quickly, every time."""
    base = make_image(tmp / "base.qcow2", "cluster_size=4096")
    qemu_img("snapshot", "-c", "s", str(base))
    data = bytearray(base.read_bytes())
    m = Meta(base)
    # Header fields past the magic, L1, refcount table and block, the first L2 table.
    targets = [(16, 104), (m.l1_offset, m.l1_offset + 64), (m.reftable, m.reftable + 64),
               (m.u64(m.reftable) & ~0x1FF, (m.u64(m.reftable) & ~0x1FF) + 256),
               (m.l2_entry(0) & ~0xFFF, (m.l2_entry(0) & ~0xFFF) + 512)]
    rnd = random.Random(5)
    p = tmp / "m.qcow2"
    for i in range(120):
        b = bytearray(data)
        lo, hi = targets[i % len(targets)]
        for _ in range(rnd.randint(1, 6)):
            at = rnd.randrange(lo, hi)
            b[at] = rnd.randrange(256) if rnd.random() < 0.7 else b[at] ^ (1 << rnd.randrange(8))
        p.write_bytes(bytes(b))
        for repair in (None, "all"):
            t0 = time.monotonic()
            try:
                r = qb.check(p, repair=repair)
                assert isinstance(r, qb.CheckResult)
            except qb.QBlockError:
                pass
            assert time.monotonic() - t0 < 10, f"variant {i} took too long"
        p.unlink()


# --- qed ------------------------------------------------------------------------------------------


def qed_damage(path: Path, damage: str) -> None:
    with open(path, "r+b") as f:
        h = f.read(64)
        l1 = struct.unpack("<Q", h[40:48])[0]

        def rd(o: int) -> int:
            f.seek(o)
            return struct.unpack("<Q", f.read(8))[0]

        def wr(o: int, v: int) -> None:
            f.seek(o)
            f.write(struct.pack("<Q", v))

        l2 = rd(l1)
        if damage == "l1_past_eof":
            wr(l1 + 8, 1 << 34)
        elif damage == "l2_past_eof":
            wr(l2 + 8, 1 << 34)
        elif damage == "used_twice":
            wr(l2 + 8, rd(l2))
        elif damage == "unaligned":
            wr(l2, rd(l2) + 512)
        elif damage == "need_check":
            wr(16, rd(16) | 2)
        elif damage == "leak":
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * 65536)


def qed_features(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[16:24])[0]


@pytest.mark.parametrize("damage", ["none", "leak", "l1_past_eof", "l2_past_eof", "used_twice", "unaligned",
                                    "need_check"])
def test_qed_matches_qemu(tmp, damage):
    orig = tmp / "q.qed"
    qemu_img("create", "-q", "-f", "qed", str(orig), "64M")
    qemu_io(str(orig), "write -P 1 0 1M", "write -P 2 10M 64k", fmt="qed")
    qed_damage(orig, damage)
    p = tmp / "x.qed"
    shutil.copy(orig, p)
    r = qb.check(str(p))
    assert r.format is qb.Format.QED and r.messages == ()
    assert_same_as_qemu(p, r)
    for repair in ("leaks", "all"):
        ours, theirs = tmp / f"ours-{repair}.qed", tmp / f"theirs-{repair}.qed"
        shutil.copy(orig, ours)
        shutil.copy(orig, theirs)
        got = qb.check(str(ours), repair=repair).to_qemu_json()
        qrc, want, _ = qemu_check(str(theirs), "-r", repair)
        got["filename"] = str(theirs)
        assert got == want
        # QEMU's repair and ours write the same bytes.
        assert ours.read_bytes() == theirs.read_bytes()
        # The need-check flag goes once no corruption is left, stays otherwise.
        assert qed_features(ours) & 2 == (qed_features(orig) & 2 if want.get("corruptions") else 0)


# --- vdi ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header_count", [None, 2, 5])
def test_vdi_matches_qemu(tmp, header_count):
    p = tmp / "v.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(p), "64M")
    qemu_io(str(p), "write -P 1 0 3M", fmt="vdi")
    if header_count is not None:
        with open(p, "r+b") as f:  # blocks_allocated in the header
            f.seek(0x184)
            f.write(struct.pack("<I", header_count))
    r = qb.check(str(p))
    assert_same_as_qemu(p, r)
    # qemu-img check -r on vdi: "does not support checks", exit 63; the same here.
    before = p.read_bytes()
    assert qemu_img("check", "-r", "all", str(p), check=False).returncode == 63
    ours = subprocess.run([*qblock_cmd(), "check", "-r", "all", str(p)], capture_output=True, text=True)
    assert ours.returncode == 63 and ours.stderr == "qblock: This image format does not support checks\n"
    with pytest.raises(qb.UnsupportedError):
        qb.check(p, repair="leaks")
    assert p.read_bytes() == before


def test_vdi_block_used_twice_is_refused_at_open(tmp):
    """qemu-img counts it as a corruption; our vdi driver refuses to open such a map at all."""
    p = tmp / "v.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(p), "64M")
    qemu_io(str(p), "write -P 1 0 2M", fmt="vdi")
    with open(p, "r+b") as f:
        f.seek(0x154)
        bmap = struct.unpack("<I", f.read(4))[0]
        f.seek(bmap + 4)
        f.write(struct.pack("<I", 0))
    assert qemu_check(str(p))[1]["corruptions"] >= 1
    with pytest.raises(qb.CorruptImageError, match="used twice"):
        qb.check(p)


def test_amplified_references_are_bounded_and_counted_as_qemu(tmp):
    """Every L1 entry names the same L2 table and every L2 entry the same
    cluster: 1 Mi references to one cluster, overflowing its 16-bit refcount."""
    p = tmp / "amp.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "64G")
    qemu_io(str(p), "write -P 1 0 64k")
    m = Meta(p)
    l1 = m.u64(m.l1_entry(0))
    data = m.u64(m.l2_entry(0))
    with open(p, "r+b") as f:
        f.seek(m.l1_offset)
        f.write(struct.pack(">Q", l1) * 128)
        f.seek(l1 & 0x00FFFFFFFFFFFE00)
        f.write(struct.pack(">Q", data) * 8192)
    t0 = time.monotonic()
    r = qb.check(p)
    assert time.monotonic() - t0 < 20
    assert len(r.messages) == 10_001 and r.messages[-1].startswith("(only the first")
    rc, want, _ = qemu_check(str(p))
    assert r.to_qemu_json() == want and rc == 2


# --- parallels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["none", "unclean", "leak", "unclean_hole_leak"])
def test_parallels_matches_qemu(tmp, damage):
    orig = tmp / "p.hds"
    qemu_img("create", "-q", "-f", "parallels", str(orig), "64M")
    qemu_io(str(orig), "write -P 1 0 3M", "write -P 2 10M 1M", fmt="parallels")
    with open(orig, "r+b") as f:
        if "unclean" in damage:
            f.seek(44)  # inuse
            f.write(struct.pack("<I", 0x746F6E59))
        if "hole" in damage:
            f.seek(64 + 4)  # the second BAT entry: its cluster is left unused
            f.write(struct.pack("<I", 0))
        if "leak" in damage:
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * (2 << 20))
    for repair in (None, "leaks", "all"):
        ours, theirs = tmp / "x.hds", tmp / "x-qemu.hds"
        shutil.copy(orig, ours)
        shutil.copy(orig, theirs)
        args = ["-r", repair] if repair else []
        mine = subprocess.run([*qblock_cmd(), "check", "--output=json", *args, str(ours)],
                              capture_output=True, text=True)
        q = qemu_img("check", "--output=json", *args, str(theirs), check=False)
        assert mine.returncode == q.returncode
        assert json.loads(mine.stdout) == dict(json.loads(q.stdout), filename=str(ours))
        assert mine.stderr == q.stderr
        # The same repair, byte for byte (truncated tail, in-use flag cleared).
        assert ours.read_bytes() == theirs.read_bytes()


# --- vhdx -----------------------------------------------------------------------------------------

DIRTY_VHDX = CORPUS / "images" / "qemu" / "iotest-dirtylog-10G-4M.vhdx.bz2"


def test_vhdx_clean_matches_qemu(tmp):
    p = tmp / "c.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(p), "64M")
    qemu_io(str(p), "write -P 1 0 3M", fmt="vhdx")
    assert_same_as_qemu(p, qb.check(str(p)))
    r = qb.check(str(p), repair="all")
    assert r.clean and not r.corruptions_fixed


@pytest.mark.skipif(not DIRTY_VHDX.exists(), reason="conformance corpus not found")
def test_vhdx_dirty_log_is_replayed_by_a_repair(tmp):
    ours, theirs = tmp / "ours.vhdx", tmp / "theirs.vhdx"
    with bz2.open(DIRTY_VHDX) as fin, open(ours, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    shutil.copy(ours, theirs)
    # Without a repair: the log cannot be replayed read-only; qemu-img fails to open it too.
    with pytest.raises(qb.UnsupportedError, match="replay"):
        qb.check(ours)
    assert qemu_img("check", str(theirs), check=False).returncode == 1
    mine = subprocess.run([*qblock_cmd(), "check", "-r", "leaks", str(ours)], capture_output=True, text=True)
    q = qemu_img("check", "-r", "leaks", str(theirs), check=False)
    assert (mine.returncode, mine.stdout) == (q.returncode, q.stdout) == (0, q.stdout)
    assert "1 corruptions" in mine.stdout
    assert qb.check(ours).clean and qemu_check(str(ours))[0] == 0
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0


# --- vmdk -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse"])
def test_vmdk_matches_qemu(tmp, subformat):
    p = tmp / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(p), "16M")
    qemu_io(str(p), "write -P 1 0 1M", "write -P 2 8M 64k", fmt="vmdk")
    assert_same_as_qemu(p, qb.check(str(p)))
    # No repairs, as qemu-img: "does not support checks", exit 63.
    assert qemu_img("check", "-r", "leaks", str(p), check=False).returncode == 63
    r = subprocess.run([*qblock_cmd(), "check", "-r", "leaks", str(p)], capture_output=True, text=True)
    assert r.returncode == 63


def test_vmdk_grain_past_the_end_fails_the_check(tmp):
    p = tmp / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(p), "16M")
    qemu_io(str(p), "write -P 1 0 1M", fmt="vmdk")
    os.truncate(p, 200_000)
    assert qemu_img("check", str(p), check=False).returncode == 1
    r = subprocess.run([*qblock_cmd(), "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("qblock: Check failed: ") and "Traceback" not in r.stderr


def test_rebuild_keeps_a_version_2_header_extension(tmp):
    """Version 2 has no feature fields: offset 72 starts its extensions (here
    the backing format), which a rebuild must not overwrite."""
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    p = tmp / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", str(base), "-F", "qcow2", str(p))
    qemu_io(str(p), "write -P 1 0 1M")
    zero_refcount(Meta(p))
    r = qb.check(p, repair="all")
    assert r.clean and r.corruptions_fixed == 1
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    assert info["backing-filename-format"] == "qcow2" and info["format-specific"]["data"]["compat"] == "0.10"
    assert qemu_check(str(p))[0] == 0
