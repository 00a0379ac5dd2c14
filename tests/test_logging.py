"""The library's log: repairs, dirty images and slow paths reach `logging`
under the ``libqblock`` logger, with the image named; nothing is printed."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

import libqblock as qb

from conftest import qblock_cmd, qemu_img, qemu_io
from test_check import Meta, dirty_image, leak


def records(caplog: pytest.LogCaptureFixture, path: Path) -> List[Tuple[str, int, str]]:
    """(logger, level, message) of the records that name ``path``, in order."""
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records if str(path) in r.getMessage()]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="libqblock")
    return caplog


def test_a_dirty_qcow2_is_noted_read_only_and_repaired_read_write(tmp, log):
    p = dirty_image(tmp)
    qb.open(p, flags=0).close()
    assert records(log, p) == [("libqblock.qcow2", logging.INFO, f"'{p}' is dirty: its lazy refcounts were not "
                                "written back; read as it is (a read-write open repairs it)")]
    log.clear()
    qb.open(p).close()
    (rec,) = records(log, p)
    assert rec[:2] == ("libqblock.qcow2", logging.WARNING) and "repaired on open" in rec[2]
    assert "refcounts were rebuilt" in rec[2]
    assert not json.loads(qemu_img("info", "--output=json", str(p)).stdout)["dirty-flag"]
    log.clear()
    qb.open(p).close()  # clean now: nothing to say
    assert records(log, p) == []


def _set_qed_need_check(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(16)
        features = struct.unpack("<Q", f.read(8))[0]
        f.seek(16)
        f.write(struct.pack("<Q", features | 2))


def _set_parallels_in_use(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(44)
        f.write(struct.pack("<I", 0x746F6E59))  # "Ynot"


@pytest.mark.parametrize("name, options, make_dirty, repaired", [
    ("n.qed", qb.QedOptions(virt_size=4 << 20), _set_qed_need_check, "need-check flag was set"),
    ("u.hdd", qb.ParallelsOptions(virt_size=4 << 20), _set_parallels_in_use, "in-use flag"),
])
def test_a_dirty_image_is_noted_read_only_and_repaired_read_write(tmp, log, name, options, make_dirty, repaired):
    p = tmp / name
    qb.create(p, options)
    make_dirty(p)
    logger = f"libqblock.{options.format}"
    qb.open(p, flags=0).close()
    assert [r[:2] for r in records(log, p)] == [(logger, logging.INFO)]
    log.clear()
    qb.open(p).close()
    (rec,) = records(log, p)
    assert rec[:2] == (logger, logging.WARNING) and repaired in rec[2]
    log.clear()
    qb.open(p).close()
    assert records(log, p) == []


def test_a_dirty_extent_of_a_parallels_bundle_is_named(tmp, log):
    extent = tmp / "disk.hds"
    qb.create(extent, qb.ParallelsOptions(virt_size=1 << 20))
    _set_parallels_in_use(extent)
    descriptor = tmp / "DiskDescriptor.xml"
    descriptor.write_text(
        "<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\"><Disk_Parameters>"
        "<Disk_size>2048</Disk_size></Disk_Parameters><StorageData><Storage><Start>0</Start><End>2048</End>"
        "<Image><Type>Compressed</Type><File>disk.hds</File></Image></Storage></StorageData>"
        "</Parallels_disk_image>\n")
    qb.open(descriptor, flags=0).close()
    assert [r[:2] for r in records(log, extent)] == [("libqblock.parallels", logging.INFO)]
    log.clear()
    qb.open(descriptor).close()
    (rec,) = records(log, extent)
    assert rec[:2] == ("libqblock.parallels", logging.WARNING) and "in-use flag" in rec[2]


def test_a_vdi_block_count_repair_is_logged(tmp, log):
    p = tmp / "c.vdi"
    qb.create(p, qb.VdiOptions(virt_size=8 << 20))
    with qb.open(p) as img:
        img.write(b"v" * 4096, 0)
        img.write(b"w" * 4096, 2 << 20)
    with open(p, "r+b") as f:  # an allocation interrupted before the count was written
        f.seek(0x184)
        count = struct.unpack("<I", f.read(4))[0]
        f.seek(0x184)
        f.write(struct.pack("<I", count - 1))
    qb.open(p, flags=0).close()
    assert records(log, p) == []  # read-only: left as it is, nothing said
    qb.open(p).close()
    (rec,) = records(log, p)
    assert rec[:2] == ("libqblock.vdi", logging.WARNING) and "allocated blocks" in rec[2]
    assert qemu_img("check", str(p), check=False).returncode == 0


def test_check_repairs_are_logged(tmp, log):
    p = tmp / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "8M")
    qemu_io(str(p), "write -P 3 0 128k")
    leak(Meta(p))
    qb.check(p)  # a check without repair changes nothing and says nothing
    assert records(log, p) == []
    r = qb.check(p, repair="leaks")
    assert r.leaks_fixed == 1
    assert records(log, p) == [("libqblock.check", logging.WARNING,
                                f"'{p}': check repaired 1 leaked cluster(s) and 0 corruption(s)")]


def test_probing_raw_warns_when_writing_only(tmp, log):
    p = tmp / "disk.img"
    qb.create(p, qb.RawOptions(virt_size=1 << 20))
    qb.open(p).close()
    (rec,) = records(log, p)
    assert rec[:2] == ("libqblock.probe", logging.WARNING) and "pass fmt=" in rec[2]
    log.clear()
    qb.open(p, flags=0).close()
    assert [r[:2] for r in records(log, p)] == [("libqblock.probe", logging.DEBUG)]
    log.clear()
    qb.open(p, fmt="raw").close()
    qb.open(p, fmt="raw", flags=0).close()
    assert records(log, p) == []


def test_the_o_direct_bounce_path_is_noted_once_per_file(tmp, log):
    p = tmp / "d.qcow2"
    qb.create(p, qb.Qcow2Options(virt_size=1 << 20))
    with qb.open(p, flags=qb.O_RDWR | qb.O_NOCACHE) as img:
        img.write(b"q" * 100, 7)
        assert img.read(100, 7) == b"q" * 100
        img.read(3, 5)
    (rec,) = records(log, p)
    assert rec[:2] == ("libqblock.storage", logging.DEBUG) and "bounce buffers" in rec[2]


def test_kept_bitmaps_are_noted_on_a_writable_open(tmp, log):
    p = tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "8M")
    qemu_img("bitmap", "--add", str(p), "b0")
    qb.open(p, flags=0).close()
    assert records(log, p) == []
    qb.open(p).close()
    (rec,) = records(log, p)
    assert rec[:2] == ("libqblock.qcow2", logging.INFO) and "1 persistent bitmap(s)" in rec[2]


def test_a_failed_convert_logs_the_target_it_removed(tmp, log):
    src, dst = tmp / "s.qcow2", tmp / "t.qcow2"
    qb.create(src, qb.Qcow2Options(virt_size=4 << 20))

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qb.convert(src, dst, "qcow2", progress=stop)
    assert not dst.exists()
    (rec,) = records(log, dst)
    assert rec[:2] == ("libqblock.tools", logging.INFO) and "KeyboardInterrupt" in rec[2]


def test_records_from_another_thread_arrive(tmp, log):
    import threading

    p = dirty_image(tmp)
    t = threading.Thread(target=lambda: qb.open(p).close())
    t.start()
    t.join()
    assert [r[:2] for r in records(log, p)] == [("libqblock.qcow2", logging.WARNING)]


_CHILD = """
import logging, sys
import libqblock as qb
if sys.argv[2] == "configured":
    logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
qb.open(sys.argv[1]).close()
print("done")
"""


@pytest.mark.parametrize("configured", [False, True])
def test_nothing_is_printed_unless_logging_is_configured(tmp, configured):
    p = dirty_image(tmp)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(p), "configured" if configured else "quiet"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr
    if configured:
        assert r.stderr.startswith(f"libqblock.qcow2 WARNING '{p}' repaired on open:"), r.stderr
    else:
        assert r.stderr == ""


def test_the_cli_shows_warnings_and_more_with_v(tmp):
    p = dirty_image(tmp)
    quiet = subprocess.run([*qblock_cmd(), "info", str(p)], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""  # the info-level note is not shown
    verbose = subprocess.run([*qblock_cmd(), "-v", "info", str(p)], capture_output=True, text=True)
    assert verbose.returncode == 0 and verbose.stderr == f"qblock: INFO: '{p}' is dirty: its lazy refcounts were " \
        "not written back; read as it is (a read-write open repairs it)\n"
    assert verbose.stdout == quiet.stdout
    raw = tmp / "disk.img"
    qb.create(raw, qb.RawOptions(virt_size=1 << 20))
    for flags, shown in (("-v", False), ("-vv", True)):
        r = subprocess.run([*qblock_cmd(), flags, "info", str(raw)], capture_output=True, text=True)
        assert r.returncode == 0
        assert (f"qblock: DEBUG: no format was given for '{raw}'" in r.stderr) == shown, (flags, r.stderr)
    leaky = tmp / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(leaky), "8M")
    qemu_io(str(leaky), "write -P 3 0 128k")
    leak(Meta(leaky))
    # check reports its repairs in qemu-img's words; the record shows with -v.
    r = subprocess.run([*qblock_cmd(), "check", "-r", "leaks", str(leaky)], capture_output=True, text=True)
    assert r.returncode == 0 and "Repairing cluster" in r.stderr and "WARNING" not in r.stderr, r.stderr
    leak(Meta(leaky))
    r = subprocess.run([*qblock_cmd(), "-v", "check", "-r", "leaks", str(leaky)], capture_output=True, text=True)
    assert r.returncode == 0
    assert f"qblock: WARNING: '{leaky}': check repaired 1 leaked cluster(s) and 0 corruption(s)\n" in r.stderr
