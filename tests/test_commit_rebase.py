"""commit, rebase and resize, each against qemu-img's own on a copy of the same images."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest

import libqblock as qb
from libqblock import backing as qbb

from conftest import qemu_check, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

MiB = 1 << 20
K64 = 64 << 10


def qcow2(path: Path, size: int = 4 * MiB, backing: Path = None, **o: str) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    for k, v in o.items():
        args += ["-o", f"{k}={v}"]
    qemu_img(*args, str(path), str(size))
    return path


def chain(tmp: Path) -> List[Path]:
    """base <- mid <- top, each with its own writes (data, a zero cluster, a partial cluster)."""
    base = qcow2(tmp / "base.qcow2")
    qemu_io(str(base), "write -P 0x11 0 1M", "write -P 0x12 3M 64k")
    mid = qcow2(tmp / "mid.qcow2", backing=base)
    qemu_io(str(mid), "write -P 0x21 512k 128k", "write -z 3M 64k")
    top = qcow2(tmp / "top.qcow2", backing=mid)
    qemu_io(str(top), "write -P 0x31 4096 1000", "write -P 0x32 2M 192k", "write -z 512k 64k")
    return [base, mid, top]


def copy_chain(paths: List[Path], dest: Path) -> List[Path]:
    dest.mkdir()
    out = []
    for p in paths:
        shutil.copy(p, dest / p.name)
        out.append(dest / p.name)
    return out


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def own_extents(path: Path) -> List[dict]:
    """The extents the image allocates itself (depth 0)."""
    return [e for e in qemu_map(str(path)) if e["depth"] == 0 and e["present"]]


def test_commit_into_the_backing_file_as_qemu_img(tmp):
    ours = chain(tmp)
    theirs = copy_chain(ours, tmp / "theirs")
    before = qemu_raw_bytes(str(ours[2]), tmp)
    assert qbb.commit(ours[2]) is True
    qemu_img("commit", "-q", str(theirs[2]))
    assert same_content(ours[1], theirs[1]), "the committed mid image differs from qemu-img's"
    assert qemu_raw_bytes(str(ours[1]), tmp) == before
    assert qemu_raw_bytes(str(ours[2]), tmp) == before  # the emptied top reads through
    assert own_extents(ours[2]) == [] == own_extents(theirs[2])
    for p in ours:
        c = qemu_check(str(p))
        assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0
    assert same_content(ours[0], theirs[0])  # the base below was not touched


def test_commit_keep_and_deeper_base(tmp):
    ours = chain(tmp)
    theirs = copy_chain(ours, tmp / "theirs")
    before = qemu_raw_bytes(str(ours[2]), tmp)
    own = own_extents(ours[2])
    assert qbb.commit(ours[2], base=ours[0]) is False  # a deeper base keeps the top's data
    qemu_img("commit", "-q", "-b", str(theirs[0]), str(theirs[2]))
    assert same_content(ours[0], theirs[0])
    assert qemu_raw_bytes(str(ours[0]), tmp) == before
    assert own_extents(ours[2]) == own
    assert qbb.commit(ours[2], keep=True) is False
    assert own_extents(ours[2]) == own and qemu_raw_bytes(str(ours[1]), tmp) == before


def test_commit_grows_a_smaller_base(tmp):
    base = qcow2(tmp / "base.qcow2", 2 * MiB)
    qemu_io(str(base), "write -P 1 0 2M")
    top = qcow2(tmp / "top.qcow2", 4 * MiB, backing=base)
    qemu_io(str(top), "write -P 2 3M 64k")
    want = qemu_raw_bytes(str(top), tmp)
    qbb.commit(top)
    assert qemu_info(str(base))["virtual-size"] == 4 * MiB
    assert qemu_raw_bytes(str(base), tmp) == want


def test_commit_errors(tmp):
    lone = qcow2(tmp / "lone.qcow2")
    with pytest.raises(qb.InvalidParamError, match="no backing file"):
        qbb.commit(lone)
    ours = chain(tmp)
    with pytest.raises(qb.InvalidParamError, match="not in the backing chain"):
        qbb.commit(ours[2], base=lone)


def test_commit_progress_and_cancel(tmp):
    ours = chain(tmp)
    seen = []
    qbb.commit(ours[2], keep=True, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (4 * MiB, 4 * MiB)

    def stop(done, total):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        qbb.commit(ours[2], progress=stop)
    assert own_extents(ours[2])  # cancelled before anything was emptied


@pytest.mark.parametrize("target", ["other", "none"])
def test_safe_rebase_keeps_the_content(tmp, target):
    ours = chain(tmp)
    other = qcow2(tmp / "other.qcow2")
    qemu_io(str(other), "write -P 0x11 0 512k", "write -P 0x77 1M 1M")  # shares the first half of base's 1 MiB
    theirs = copy_chain(ours + [other], tmp / "theirs")
    before = qemu_raw_bytes(str(ours[2]), tmp)
    name = other.name if target == "other" else None
    qbb.rebase(ours[2], name, backing_format="qcow2" if name else None)
    args = ["-b", other.name, "-F", "qcow2"] if name else ["-b", ""]
    qemu_img("rebase", "-q", *args, str(theirs[2]))
    assert qemu_raw_bytes(str(ours[2]), tmp) == before
    assert same_content(ours[2], theirs[2])
    i = qemu_info(str(ours[2]))
    assert i.get("backing-filename") == name and i.get("backing-filename-format") == ("qcow2" if name else None)
    c = qemu_check(str(ours[2]))
    assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0
    if name:
        # Only what differs was copied: [64k, 512k) reads 0x11 in both chains.
        assert not any(e["start"] < 512 << 10 and e["start"] + e["length"] > K64 for e in own_extents(ours[2]))


def test_unsafe_rebase_changes_only_the_name(tmp):
    ours = chain(tmp)
    own = own_extents(ours[2])
    qbb.rebase(ours[2], "base.qcow2", backing_format="qcow2", unsafe=True)
    i = qemu_info(str(ours[2]))
    assert i["backing-filename"] == "base.qcow2" and i["backing-filename-format"] == "qcow2"
    assert own_extents(ours[2]) == own
    qemu_check(str(ours[2]))
    qbb.rebase(ours[2], "", unsafe=True)
    assert "backing-filename" not in qemu_info(str(ours[2]))


def test_rebase_keeps_other_header_extensions(tmp):
    top = qcow2(tmp / "top.qcow2", backing=qcow2(tmp / "base.qcow2"))
    qemu_img("bitmap", "--add", str(top), "b0")
    qemu_io(str(top), "write -P 5 0 64k")
    qcow2(tmp / "elsewhere.qcow2")
    qbb.rebase(top, "elsewhere.qcow2", backing_format="qcow2", unsafe=True)
    i = qemu_info(str(top))
    assert [b["name"] for b in i["format-specific"]["data"]["bitmaps"]] == ["b0"]
    assert i["backing-filename"] == "elsewhere.qcow2"
    assert qemu_img("check", str(top)).returncode == 0


def test_rebase_errors(tmp):
    ours = chain(tmp)
    with pytest.raises(qb.InvalidParamError, match="format"):
        qbb.rebase(ours[2], "base.qcow2")
    with pytest.raises(qb.QBlockError, match="new backing file"):
        qbb.rebase(ours[2], "missing.qcow2", backing_format="qcow2")
    assert qemu_info(str(ours[2]))["backing-filename"] == "mid.qcow2"  # untouched
    small = qcow2(tmp / "small.qcow2", 4 * MiB, cluster_size="512", backing=ours[1])
    with pytest.raises(qb.UnsupportedError, match="first cluster"):
        qbb.rebase(small, "x" * 1000, backing_format="qcow2", unsafe=True)
    assert qemu_info(str(small))["backing-filename"] == "mid.qcow2"
    raw = tmp / "r.raw"
    qb.create(raw, qb.RawOptions(MiB))
    with pytest.raises(qb.UnsupportedError, match="backing file"):
        qbb.rebase(raw, "base.qcow2", backing_format="qcow2", unsafe=True)


@pytest.mark.parametrize("fmt, new", [("qcow2", 6 * MiB + 512), ("raw", 5 * MiB), ("raw", MiB)])
def test_resize_as_qemu_img(tmp, fmt, new):
    ours, theirs = tmp / f"o.{fmt}", tmp / f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(ours), "2M")
    qemu_io(str(ours), "write -P 9 0 2M", fmt=fmt)
    shutil.copy(ours, theirs)
    qb.tools.resize(ours, new, format=fmt, shrink=new < 2 * MiB)
    qemu_img("resize", "-q", "-f", fmt, *(["--shrink"] if new < 2 * MiB else []), str(theirs), str(new))
    assert qemu_info(str(ours))["virtual-size"] == qemu_info(str(theirs))["virtual-size"]
    assert qemu_raw_bytes(str(ours), tmp, "-f", fmt) == qemu_raw_bytes(str(theirs), tmp, "-f", fmt)


def test_resize_refuses_to_shrink_unless_asked(tmp):
    p = tmp / "s.raw"
    qb.create(p, qb.RawOptions(2 * MiB))
    with pytest.raises(qb.InvalidParamError, match="shrink"):
        qb.tools.resize(p, MiB)
    assert p.stat().st_size == 2 * MiB
    with pytest.raises(qb.InvalidParamError):
        qb.tools.resize(p, -1)


@pytest.mark.parametrize("cluster", ["512", "65536"])
def test_qcow2_shrink_then_grow_reads_zeroes_past_the_old_end(tmp, cluster):
    p = qcow2(tmp / "s.qcow2", 4 * MiB, cluster_size=cluster)
    qemu_io(str(p), "write -P 7 0 4M")
    qb.tools.resize(p, MiB + 1024, shrink=True)
    assert qemu_info(str(p))["virtual-size"] == MiB + 1024
    c = qemu_check(str(p))
    assert c.get("leaks", 0) == 0 and c.get("corruptions", 0) == 0
    assert c["allocated-clusters"] == -(-(MiB + 1024) // int(cluster))  # the dropped clusters are unmapped
    qb.tools.resize(p, 3 * MiB)
    data = qemu_raw_bytes(str(p), tmp)
    assert data[: MiB + 1024] == b"\7" * (MiB + 1024)
    assert data[MiB + 1024 :] == bytes(2 * MiB - 1024)  # nothing of the old data comes back
    qemu_check(str(p))
    with pytest.raises(qb.InvalidParamError, match="multiple of 512"):
        qb.tools.resize(p, 3 * MiB + 1)


def test_growing_an_overlay_hides_the_backing_file_past_its_old_end(tmp):
    base = qcow2(tmp / "base.qcow2", 4 * MiB)
    qemu_io(str(base), "write -P 3 0 4M")
    top = qcow2(tmp / "top.qcow2", 2 * MiB, backing=base)
    theirs = tmp / "theirs.qcow2"
    shutil.copy(top, theirs)
    qb.tools.resize(top, 6 * MiB)
    qemu_img("resize", "-q", str(theirs), str(6 * MiB))
    ours_data, theirs_data = qemu_raw_bytes(str(top), tmp), qemu_raw_bytes(str(theirs), tmp)
    assert ours_data == theirs_data and ours_data[2 * MiB :] == bytes(4 * MiB)


def test_shrink_refusals(tmp):
    p = qcow2(tmp / "b.qcow2", 4 * MiB)
    qemu_img("bitmap", "--add", str(p), "b0")
    with pytest.raises(qb.UnsupportedError, match="bitmaps"):
        qb.tools.resize(p, MiB, shrink=True)
    assert qemu_info(str(p))["virtual-size"] == 4 * MiB
    v = tmp / "v.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(v), "4M")
    qemu_io(str(v), "write -P 1 3M 1M", fmt="vdi")
    with pytest.raises(qb.UnsupportedError):
        qb.tools.resize(v, 2 * MiB, shrink=True)
    assert qemu_raw_bytes(str(v), tmp)[3 * MiB :] == b"\1" * MiB  # nothing was zeroed on the way
