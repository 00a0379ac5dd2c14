"""qcow2 internal snapshots against qemu-img: ours are listed, read and applied
by qemu-img, qemu-img's by us; every step leaves an image qemu-img check finds
clean (no corruption, no leak); content is checked against an in-memory model."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import libqblock as qb
from libqblock.cli import snapshot_table

from conftest import qemu_check, qemu_img, qemu_info, qemu_io, qemu_raw_bytes
from conftest import qblock_cmd

KiB = 1 << 10
MiB = 1 << 20


class Model:
    """The guest content we expect: the disk now, and each snapshot's."""

    def __init__(self, size: int) -> None:
        self.disk = bytearray(size)
        self.snaps: Dict[str, bytes] = {}

    def write(self, img: qb.Image, data: bytes, offset: int) -> None:
        img.write(data, offset)
        self.disk[offset : offset + len(data)] = data

    def zero(self, img: qb.Image, offset: int, length: int) -> None:
        img.write_zeroes(offset, length)
        self.disk[offset : offset + length] = bytes(length)


def clean(path: Path) -> None:
    """qemu-img check: no corruption, no leak, no check error (exit 0), and it says so."""
    r = qemu_check(str(path))
    assert not r.get("corruptions") and not r.get("leaks") and not r.get("check-errors"), r


def content(path: Path, tmp: Path, snapshot: Optional[str] = None) -> bytes:
    """The guest bytes as qemu-img reads them (of an internal snapshot, without applying it)."""
    extra = ("-l", f"snapshot.name={snapshot}") if snapshot else ()
    return qemu_raw_bytes(str(path), tmp, *extra)


def qemu_snapshots(path: Path) -> List[dict]:
    return qemu_info(str(path)).get("snapshots", [])


def make(tmp: Path, name: str = "s.qcow2", size: int = 4 * MiB, **opts: object) -> Path:
    p = tmp / name
    qb.create(p, qb.Qcow2Options(size, **opts))  # type: ignore[arg-type]
    return p


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


CONFIGS = {
    "v3": {},
    "v2": {"compat": "0.10"},
    "refcount64": {"refcount_bits": 64},
    "refcount8": {"refcount_bits": 8},
    "c512": {"cluster_size": 512},
    "c2M": {"cluster_size": 2 * MiB},
    "extended_l2": {"extended_l2": True},
    "lazy_refcounts": {"lazy_refcounts": True},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_our_snapshots_are_qemus(tmp, config):
    """Snapshots we take are listed, read and applied by qemu-img; writes
    after a snapshot never change it (copy-on-write); we apply and delete
    them again; qemu-img check is clean after every step."""
    size = 8 * MiB
    p = make(tmp, size=size, **CONFIGS[config])
    m = Model(size)
    with qb.open(p) as img:
        # Whole and partial clusters, a run crossing an L2 boundary at 512 B.
        m.write(img, pattern(1, 200 * KiB), 0)
        m.write(img, pattern(2, 3000), 5 * MiB + 77)
        m.write(img, pattern(3, 70 * KiB), 2 * MiB - 30 * KiB)
        s1 = img.snapshot_create("s1")
        m.snaps["s1"] = bytes(m.disk)
        assert (s1.id, s1.name, s1.vm_state_size, s1.vm_clock_nsec) == ("1", "s1", 0, 0)
        # Overwrite shared clusters in part and whole, zero some, add new ones.
        m.write(img, pattern(4, 1000), 100)
        m.write(img, pattern(5, 128 * KiB), 64 * KiB)
        m.zero(img, 160 * KiB, 40 * KiB)
        m.write(img, pattern(6, 4096), 7 * MiB)
        assert img.snapshot_create("s2").id == "2"
        m.snaps["s2"] = bytes(m.disk)
        m.write(img, pattern(7, 10 * KiB), 2 * MiB - 5 * KiB)
        m.zero(img, 0, 64 * KiB)
        assert [s.name for s in img.snapshots()] == ["s1", "s2"]
    clean(p)
    assert [(s["id"], s["name"]) for s in qemu_snapshots(p)] == [("1", "s1"), ("2", "s2")]
    for name, want in m.snaps.items():
        assert content(p, tmp, name) == want, name
    assert content(p, tmp) == m.disk
    # qemu-img applies ours ...
    qemu_img("snapshot", "-a", "s1", str(p))
    assert content(p, tmp) == m.snaps["s1"]
    clean(p)
    # ... and we apply, write and delete after it.
    with qb.open(p) as img:
        img.snapshot_apply("s2")
        assert img.read(size, 0) == m.snaps["s2"]
        m.disk = bytearray(m.snaps["s2"])
        m.write(img, pattern(8, 5000), 3 * MiB)
    clean(p)
    assert content(p, tmp) == m.disk
    with qb.open(p) as img:
        img.snapshot_delete("s1")
        assert [s.name for s in img.snapshots()] == ["s2"]
    clean(p)
    assert content(p, tmp, "s2") == m.snaps["s2"]
    assert content(p, tmp) == m.disk
    with qb.open(p) as img:
        img.snapshot_delete("2")  # by id
        assert img.snapshots() == []
    clean(p)
    assert qemu_snapshots(p) == [] and content(p, tmp) == m.disk


def test_qemus_snapshots_are_ours(tmp):
    """Snapshots qemu-img takes are listed with qemu-img's fields, applied and
    deleted by us; qemu-img agrees with the result."""
    size = 4 * MiB
    p = make(tmp, size=size)
    qemu_io(str(p), "write -P 0x11 0 300k", "write -P 0x12 1M 64k")
    qemu_img("snapshot", "-c", "q1", str(p))
    qemu_io(str(p), "write -P 0x21 4k 8k", "write -z 1M 64k", "write -P 0x22 3M 512")
    qemu_img("snapshot", "-c", "q2", str(p))
    q1 = content(p, tmp, "q1")
    q2 = content(p, tmp, "q2")
    with qb.open(p, flags=0) as img:
        ours = [s.to_qemu_info() for s in img.snapshots()]
        assert ours == qemu_snapshots(p)
        assert [s.to_qemu_info() for s in img.info().snapshots] == ours
    with qb.open(p) as img:
        img.snapshot_apply("q1")
        assert img.read(size, 0) == q1
        img.write(b"\x33" * 9000, 100)
        disk = bytearray(q1)
        disk[100:9100] = b"\x33" * 9000
    clean(p)
    assert content(p, tmp, "q1") == q1 and content(p, tmp, "q2") == q2
    assert content(p, tmp) == disk
    with qb.open(p) as img:
        img.snapshot_delete("q2")
        img.snapshot_create("ours")  # id 2 again: one more than the largest left
    clean(p)
    assert [(s["id"], s["name"]) for s in qemu_snapshots(p)] == [("1", "q1"), ("2", "ours")]
    assert content(p, tmp, "ours") == disk
    qemu_img("snapshot", "-d", "q1", str(p))
    clean(p)
    with qb.open(p, flags=0) as img:
        assert [s.name for s in img.snapshots()] == ["ours"]
        assert img.read(size, 0) == disk


def test_delete_one_of_several_keeps_the_others(tmp):
    p = make(tmp, size=2 * MiB, cluster_size=4096)
    m = Model(2 * MiB)
    with qb.open(p) as img:
        for i in range(5):
            m.write(img, pattern(10 + i, 300 * KiB), i * 200 * KiB)
            img.snapshot_create(f"n{i}")
            m.snaps[f"n{i}"] = bytes(m.disk)
        img.snapshot_delete("n2")
        img.snapshot_delete("n0")
        img.snapshot_delete("n4")
    clean(p)
    assert [s["name"] for s in qemu_snapshots(p)] == ["n1", "n3"]
    for name in ("n1", "n3"):
        assert content(p, tmp, name) == m.snaps[name]
    assert content(p, tmp) == m.disk


def test_backing_file_below_a_snapshot(tmp):
    base = tmp / "base.qcow2"
    qb.create(base, qb.Qcow2Options(2 * MiB))
    qemu_io(str(base), "write -P 0x5a 0 2M")
    p = tmp / "top.qcow2"
    qb.create(p, qb.Qcow2Options(2 * MiB, backing=str(base), backing_fmt=qb.Format.QCOW2))
    with qb.open(p) as img:
        img.write(b"\x01" * 1000, 70000)  # a partial cluster copied from the backing file
        img.snapshot_create("a")
        a = img.read(2 * MiB, 0)
        img.write(b"\x02" * 500, 70100)
        img.write_zeroes(0, 65536)
        img.discard(1 * MiB, 65536)
        now = img.read(2 * MiB, 0)
    clean(p)
    assert content(p, tmp, "a") == a and content(p, tmp) == now
    assert a[:65536] == b"\x5a" * 65536 and now[:65536] == bytes(65536)
    with qb.open(p) as img:
        img.snapshot_apply("a")
        assert img.read(2 * MiB, 0) == a
    clean(p)
    assert content(p, tmp) == a


def test_compressed_clusters_are_shared_and_copied(tmp):
    src = tmp / "src.raw"
    src.write_bytes(b"compressible " * (MiB // 13) + bytes(MiB - 13 * (MiB // 13)))
    p = tmp / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", str(src), str(p))
    orig = src.read_bytes()
    with qb.open(p) as img:
        img.snapshot_create("c")
        img.write(b"\xff" * 6000, 1000)  # over compressed clusters
        now = img.read(MiB, 0)
    clean(p)
    assert content(p, tmp, "c") == orig and content(p, tmp) == now
    with qb.open(p) as img:
        img.snapshot_apply("c")
        assert img.read(MiB, 0) == orig
        img.snapshot_delete("c")
    clean(p)
    assert content(p, tmp) == orig


def test_apply_takes_the_snapshots_size(tmp):
    """As QEMU: applying a snapshot resizes the image to the size it had then."""
    p = make(tmp, size=MiB)
    with qb.open(p) as img:
        img.write(b"\x44" * 4096, 0)
        img.snapshot_create("small")
        img.truncate(3 * MiB)
        img.write(b"\x45" * 4096, 2 * MiB)
        img.snapshot_create("big")
        img.snapshot_apply("small")
        assert img.virt_size == MiB and img.read(4096, 0) == b"\x44" * 4096
    clean(p)
    assert qemu_info(str(p))["virtual-size"] == MiB
    qemu_img("snapshot", "-a", "big", str(p))
    assert qemu_info(str(p))["virtual-size"] == 3 * MiB
    qemu_img("snapshot", "-a", "small", str(p))
    with qb.open(p) as img:
        img.snapshot_apply("big")
        assert img.virt_size == 3 * MiB and img.read(4096, 2 * MiB) == b"\x45" * 4096
    clean(p)
    assert qemu_info(str(p))["virtual-size"] == 3 * MiB


def test_v2_image_with_snapshots_cannot_be_resized(tmp):
    p = make(tmp, size=MiB, compat="0.10")
    with qb.open(p) as img:
        img.snapshot_create("x")
        with pytest.raises(qb.UnsupportedError, match="cannot be resized"):
            img.truncate(2 * MiB)
    r = qemu_img("resize", str(p), "2M", check=False)
    assert r.returncode == 1 and "v2 image which has snapshots" in r.stderr  # QEMU's rule as well
    clean(p)


# --- errors -------------------------------------------------------------------------------------


def test_errors(tmp):
    p = make(tmp, size=MiB)
    with qb.open(p) as img:
        img.snapshot_create("one")
        with pytest.raises(qb.InvalidParamError, match="already has a snapshot named 'one'"):
            img.snapshot_create("one")  # (qemu-img would make a second "one")
        for bad in ("", "x" * 256, "a\0b"):
            with pytest.raises(qb.InvalidParamError):
                img.snapshot_create(bad)
        with pytest.raises(qb.InvalidParamError, match="no snapshot with the id or name 'two'"):
            img.snapshot_apply("two")
        with pytest.raises(qb.InvalidParamError, match="'7'"):
            img.snapshot_delete("7")
        assert [s.name for s in img.snapshots()] == ["one"]
    clean(p)
    with qb.open(p, flags=0) as img:
        assert [s.name for s in img.snapshots()] == ["one"]
        for op in (img.snapshot_create, img.snapshot_apply, img.snapshot_delete):
            with pytest.raises(qb.InvalidParamError, match="read-only"):
                op("one")
    # Under O_SNAPSHOT the snapshots listed are the image's, which is read-only.
    with qb.open(p, flags=qb.O_RDWR | qb.O_SNAPSHOT) as img:
        assert [s.name for s in img.snapshots()] == ["one"]
        for op in (img.snapshot_create, img.snapshot_apply, img.snapshot_delete):
            with pytest.raises(qb.InvalidParamError, match="read-only"):
                op("one")
    img = qb.open(p, flags=0)
    img.close()
    with pytest.raises(qb.InvalidParamError, match="closed"):
        img.snapshots()
    assert [s["name"] for s in qemu_snapshots(p)] == ["one"]


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vdi", "vpc", "qed"])
def test_formats_without_internal_snapshots(tmp, fmt):
    p = tmp / f"x.{fmt}"
    qb.create(p, qb.options_class(qb.Format.from_str(fmt))(MiB))
    with qb.open(p) as img:
        assert img.snapshots() == [] and img.info().snapshots == ()
        with pytest.raises(qb.UnsupportedError, match="no internal snapshots"):
            img.snapshot_create("s")
        with pytest.raises(qb.UnsupportedError):
            img.snapshot_apply("s")
        with pytest.raises(qb.UnsupportedError):
            img.snapshot_delete("s")


def test_external_data_file_is_refused_as_by_qemu(tmp):
    p = make(tmp, size=MiB, data_file=str(tmp / "data.raw"))
    with qb.open(p) as img:
        with pytest.raises(qb.UnsupportedError, match="external data file"):
            img.snapshot_create("s")
    assert qemu_img("snapshot", "-c", "s", str(p), check=False).returncode == 1
    clean(p)


def test_refcount_limits_are_refused_without_a_leak(tmp):
    # 1-bit refcounts cannot count a shared cluster at all; 2-bit ones up to 3
    # references (the image and two snapshots). qemu-img fails there too, but
    # leaks the cluster it took for the L1 copy; we take nothing.
    one = make(tmp, "b1.qcow2", size=MiB, refcount_bits=1)
    with qb.open(one) as img:
        img.write(b"\x01" * 4096, 0)
        with pytest.raises(qb.UnsupportedError, match="refcount_bits=1"):
            img.snapshot_create("s")
    clean(one)
    small = make(tmp, "b2s.qcow2", size=MiB, refcount_bits=2)
    with qb.open(small) as img:
        img.write(b"\x02" * 4096, 0)
        img.snapshot_create("s1")
        img.snapshot_create("s2")
        with pytest.raises(qb.UnsupportedError, match="refcount_bits=2"):
            img.snapshot_create("s3")
    clean(small)
    two = make(tmp, "b2.qcow2", size=4 * MiB, refcount_bits=2, cluster_size=4096)
    with qb.open(two) as img:
        img.write(b"\x02" * 4096, 3 * MiB)  # in the second L2 table (2 MiB each)
        img.snapshot_create("s1")
        img.snapshot_create("s2")
        # The first table is the image's alone again: raising it succeeds,
        # the second one fails, and the first is lowered back.
        img.write(b"\x03" * 4096, 0)
        with pytest.raises(qb.UnsupportedError, match="refcount_bits=2"):
            img.snapshot_create("s3")
        assert [s.name for s in img.snapshots()] == ["s1", "s2"]
        img.write(b"\x04" * 4096, 0)  # still ours alone: written in place
    clean(two)
    assert content(two, tmp, "s2")[3 * MiB : 3 * MiB + 4096] == b"\x02" * 4096
    assert content(two, tmp)[:4096] == b"\x04" * 4096


def test_persistent_bitmaps_block_apply_as_in_qemu(tmp):
    p = make(tmp, size=MiB)
    qemu_img("bitmap", "--add", str(p), "b0")
    with qb.open(p) as img:
        img.snapshot_create("s")  # allowed, as in QEMU
        with pytest.raises(qb.UnsupportedError, match="bitmaps"):
            img.snapshot_apply("s")
        img.snapshot_delete("s")
    r = qemu_img("snapshot", "-c", "q", str(p))
    assert qemu_img("snapshot", "-a", "q", str(p), check=False).returncode == 1 and r.returncode == 0
    clean(p)


# --- a random walk against the model --------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_random_sequence_against_the_model_and_qemu_check(tmp, seed):
    rnd = random.Random(seed)
    size = 2 * MiB
    p = make(tmp, size=size, cluster_size=rnd.choice([4096, 65536]), refcount_bits=rnd.choice([8, 16, 64]))
    m = Model(size)
    names: List[str] = []
    serial = 0
    for step in range(40):
        with qb.open(p) as img:
            op = rnd.choice(["write", "write", "write", "zero", "create", "create", "apply", "delete"])
            if op == "write":
                n = rnd.choice([1, 511, 4096, 70000])
                m.write(img, rnd.randbytes(n), rnd.randrange(size - n))
            elif op == "zero":
                n = rnd.choice([512, 65536, 200000])
                m.zero(img, rnd.randrange(size - n), n)
            elif op == "create" and len(names) < 6:
                serial += 1
                img.snapshot_create(f"r{serial}")
                names.append(f"r{serial}")
                m.snaps[f"r{serial}"] = bytes(m.disk)
            elif op == "apply" and names:
                name = rnd.choice(names)
                img.snapshot_apply(name)
                m.disk = bytearray(m.snaps[name])
            elif op == "delete" and names:
                name = names.pop(rnd.randrange(len(names)))
                img.snapshot_delete(name)
                del m.snaps[name]
            assert img.read(size, 0) == m.disk, f"step {step}: {op}"
            assert [s.name for s in img.snapshots()] == names
        clean(p)
    for name in names:
        assert content(p, tmp, name) == m.snaps[name]
    assert content(p, tmp) == m.disk


def test_snapshot_while_other_threads_write(tmp):
    """Snapshot operations wait for writes in flight and stop new ones meanwhile:
    the image stays consistent whatever the interleaving."""
    p = make(tmp, size=4 * MiB, cluster_size=4096)
    stop = threading.Event()
    errors: List[BaseException] = []
    with qb.open(p) as img:

        def writer(k: int) -> None:
            try:
                i = 0
                while not stop.is_set():
                    img.write(bytes([k * 50 + i % 47 + 1]) * 4096, (k * 64 + i % 64) * 4096)
                    i += 1
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for i in range(6):
            img.snapshot_create(f"t{i}")
        img.snapshot_apply("t2")
        img.snapshot_delete("t0")
        stop.set()
        for t in threads:
            t.join()
        assert not errors
    clean(p)
    # Every cluster of every snapshot holds one whole write (or nothing): no
    # write was cut in two by a snapshot.
    for name in ("t1", "t3", "t4", "t5"):
        data = content(p, tmp, name)
        for c in range(3 * 64):
            assert len(set(data[c * 4096 : (c + 1) * 4096])) == 1, (name, c)


# --- info and the command line ---------------------------------------------------------------------


def test_info_lists_snapshots_like_qemu_img(tmp):
    p = make(tmp, size=MiB)
    with qb.open(p) as img:
        img.snapshot_create("alpha")
    qemu_img("snapshot", "-c", "beta", str(p))
    theirs = qemu_snapshots(p)
    r = subprocess.run([*qblock_cmd(), "info", "--output=json", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["snapshots"] == theirs
    r = subprocess.run([*qblock_cmd(), "info", str(p)], capture_output=True, text=True)
    with qb.open(p, flags=0) as img:
        table = snapshot_table(img.snapshots())
    assert "\n" + table + "\nFormat specific information:\n" in r.stdout
    # qemu-img's text, but for the protocol node it shows last.
    assert r.stdout == qemu_img("info", str(p)).stdout.split("Child node")[0]


def qblock(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*qblock_cmd(), "snapshot", *map(str, args)], capture_output=True, text=True)


def test_cli_matches_qemu_img(tmp):
    p = make(tmp, size=MiB)
    qemu_io(str(p), "write -P 0x61 0 64k")
    assert qblock("-c", "first", p).returncode == 0
    qemu_io(str(p), "write -P 0x62 0 4k")
    qemu_img("snapshot", "-c", "second", str(p))
    assert qblock("-q", "-c", "third", p).returncode == 0
    r = qblock("-l", p)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == qemu_img("snapshot", "-l", str(p)).stdout  # the same table, byte for byte
    assert r.stdout.startswith("Snapshot list:\nID      TAG ")
    assert qblock("-a", "first", p).returncode == 0
    assert content(p, tmp)[:65536] == b"\x61" * 65536
    assert qblock("-d", "second", p).returncode == 0
    clean(p)
    assert [s["name"] for s in qemu_snapshots(p)] == ["first", "third"]
    # -a takes an id too; -d, like qemu-img's, only a name.
    assert qblock("-a", "3", p).returncode == 0
    r, theirs = qblock("-d", "3", p), qemu_img("snapshot", "-d", "3", str(p), check=False)
    assert (r.returncode, theirs.returncode) == (1, 1)
    assert r.stderr == "qblock: Could not delete snapshot '3': snapshot not found\n"
    clean(p)


def test_cli_without_snapshots_prints_nothing(tmp):
    p = make(tmp, size=MiB)
    r = qblock("-l", p)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert qemu_img("snapshot", "-l", str(p)).stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["-a", "nope"], "no snapshot with the id or name 'nope'"),
        (["-d", "nope"], "snapshot not found"),
        (["-c", "dup"], "already has a snapshot named 'dup'"),
        (["-c", ""], "needs a name"),
        (["-f", "raw", "-c", "x"], "no internal snapshots"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(tmp, args, message):
    p = make(tmp, size=MiB)
    qemu_img("snapshot", "-c", "dup", str(p))
    r = qblock(*args, p)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("qblock: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    clean(p)


def test_cli_needs_exactly_one_operation(tmp):
    p = make(tmp, size=MiB)
    assert qblock(p).returncode == 2
    assert qblock("-l", "-c", "x", p).returncode == 2
