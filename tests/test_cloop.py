"""cloop (compressed loop images, version 2.0), read-only. qemu-img cannot
create them, so images are built here (preamble, block size, offset table,
zlib blocks) beside the plain disk, and read both by us and by `qemu-img
convert -O raw`; the corpus image comes from QEMU's own tests.

Opening a cloop image writable is refused with UnsupportedError (QEMU's
cloop refuses read-write use too), so no write lock is taken.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path
from typing import List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from childrun import run_result_child
from conftest import CORPUS, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def build(disk: bytes, block_size: int, blocks: Optional[List[bytes]] = None, level: int = 6) -> bytes:
    """A cloop image of `disk` (a whole number of blocks), or of the given
    compressed blocks."""
    if blocks is None:
        assert len(disk) % block_size == 0
        blocks = [zlib.compress(disk[i : i + block_size], level) for i in range(0, len(disk), block_size)]
    head = MAGIC.ljust(128, b"\0") + struct.pack(">II", block_size, len(blocks))
    off = len(head) + 8 * (len(blocks) + 1)
    offsets = []
    for b in blocks:
        offsets.append(off)
        off += len(b)
    offsets.append(off)
    return head + struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(blocks)


def pattern(n: int, seed: int) -> bytes:
    return bytes(((i * 13 + seed) ^ (i >> 10) ^ (i >> 3)) & 0xFF for i in range(n))


def write(tmp: Path, name: str, b: bytes) -> Path:
    p = tmp / name
    p.write_bytes(b)
    return p


def test_corpus_image_reads_as_qemu_reads_it(tmp):
    src = CORPUS / "images" / "qemu" / "simple-pattern.cloop"
    if not src.exists():
        pytest.skip("corpus image qemu/simple-pattern.cloop not found")
    p = write(tmp, "simple-pattern.cloop", src.read_bytes())
    want = qemu_raw_bytes(str(p), tmp)
    assert qb.probe(p) is qb.Format.CLOOP
    with qb.open(p, flags=0) as img:
        info = img.info()
        assert info.format is qb.Format.CLOOP and qemu_info(str(p))["format"] == "cloop"
        assert img.virt_size == len(want) == 1 << 20
        assert info.cluster_size is None and info.backing_location is None
        assert img.read(len(want), 0) == want
        for off, n in [(1, 1), (511, 2), (4095, 70000), (len(want) - 1, 1)]:
            assert img.read(n, off) == want[off : off + n]


CASES = {
    "512-byte-blocks": (pattern(40 * 512, 1), 512),
    "64k-blocks": (pattern(5 * 64 * KiB, 2), 64 * KiB),
    "256k-blocks-zeroes-and-data": (bytes(256 * KiB) + pattern(256 * KiB, 3) + bytes(256 * KiB), 256 * KiB),
    "incompressible-blocks": (os.urandom(6 * 4096), 4096),
    "no-blocks": (b"", 4096),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_built_image_reads_like_qemu_and_the_model(tmp, name):
    model, bs = CASES[name]
    p = write(tmp, f"{name}.cloop", build(model, bs, level=0 if "incompressible" in name else 6))
    assert qemu_raw_bytes(str(p), tmp) == model
    assert qemu_info(str(p))["virtual-size"] == len(model)
    with qb.open(p, flags=0) as img:
        assert img.virt_size == len(model)
        assert img.read(len(model), 0) == model
        if model:
            for off, n in [(0, 1), (bs - 1, 2), (bs + 7, 3 * bs), (len(model) - 5, 5)]:
                n = min(n, len(model) - off)
                assert img.read(n, off) == model[off : off + n], (off, n)
            ext = list(img.map())
            # Every block is compressed: one extent of compressed data
            # (QEMU, without block status, reports one data extent).
            assert [(e.length, e.data, e.compressed, e.allocated) for e in ext] == [(len(model), True, True, True)]
            assert [e["data"] for e in qemu_map(str(p))] == [True]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("cloop")
    model = pattern(48 * 4096, 9)
    p = d / "r.cloop"
    p.write_bytes(build(model, 16 * KiB))
    img = qb.open(p, flags=0)
    yield img, model
    img.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_reads_match_the_model(image, data):
    img, model = image
    off = data.draw(st.integers(0, len(model) - 1))
    n = data.draw(st.integers(1, len(model) - off))
    assert img.read(n, off) == model[off : off + n]


def test_concurrent_reads(image):
    img, model = image
    errors: List[str] = []

    def worker(seed: int) -> None:
        x = seed
        for _ in range(200):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            off = x % len(model)
            n = min(1 + x % 5000, len(model) - off)
            if img.read(n, off) != model[off : off + n]:
                errors.append(f"{off}+{n}")

    ts = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_writable_open_is_refused_and_writes_change_nothing(tmp):
    b = build(pattern(8192, 1), 4096)
    p = write(tmp, "ro.cloop", b)
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(p)
    assert "read-only" in ei.value.message
    with qb.open(p, flags=0) as img:
        with pytest.raises(qb.QBlockError):
            img.write(b"x", 0)
    assert p.read_bytes() == b


def test_creating_is_unsupported(tmp):
    class CloopOptions(qb.ImageOptions):
        format = qb.Format.CLOOP

    with pytest.raises(qb.UnsupportedError):
        qb.create(tmp / "new.cloop", CloopOptions(MiB))


def test_other_cloop_versions_are_unsupported_not_raw(tmp):
    b = bytearray(build(pattern(8192, 1), 4096))
    b[12:13] = b"4"  # "#V4.0 Format"
    p = write(tmp, "v4.cloop", bytes(b))
    assert qb.probe(p) is qb.Format.CLOOP
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(p, flags=0)
    assert "4.0" in ei.value.message


def test_cloop_as_a_backing_file(tmp):
    model = bytearray(pattern(16 * 4096, 4))
    base = write(tmp, "base.cloop", build(bytes(model), 4096))
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base.name, "-F", "cloop", str(top))
    qemu_io(str(top), "write -P 0x11 5000 100")
    model[5000:5100] = b"\x11" * 100
    assert qemu_raw_bytes(str(top), tmp) == bytes(model)
    with qb.open(top, flags=0) as img:
        assert img.read(img.virt_size, 0) == bytes(model)
        st_ = img.block_status(8 * 4096, 4096)
        assert st_.depth == 1 and st_.compressed and not st_.allocated


# --- hostile images, each opened in a limited child process -------------------------

TIMEOUT = 20
ADDRESS_SPACE = 1 << 30
MAX_RSS_KIB = 256 * 1024

CHILD = r"""
import json, resource, sys
p = json.loads(sys.argv[1])
out = {"exc": None, "msg": None, "stage": "import"}
try:
    import libqblock as qb
    out["stage"] = "open"
    img = qb.open(p["path"], fmt=p["fmt"], flags=0)
    out["stage"] = "info"
    img.info()
    v = img.virt_size
    for off in range(0, v, max(1 << 20, v // 64)):
        out["stage"] = f"read {off}"
        img.read(min(1 << 20, v - off), off)
    out["stage"] = "map"
    for _ in img.map():
        pass
    img.close()
    out["stage"] = None
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:400]
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
print("RESULT " + json.dumps(out), flush=True)
"""



def run_child(path: Path, fmt: str = "cloop") -> dict:
    params = {"path": str(path), "fmt": fmt}
    res = run_result_child(CHILD, params, path.name, timeout=TIMEOUT, address_space=ADDRESS_SPACE)
    assert res["rss_kib"] < MAX_RSS_KIB, res
    return res


def _good() -> bytes:
    return build(pattern(4 * 4096, 5), 4096)


def _u32(at: int, v: int) -> bytes:
    b = bytearray(_good())
    struct.pack_into(">I", b, at, v)
    return bytes(b)


def _off(i: int, v: int) -> bytes:
    b = bytearray(_good())
    struct.pack_into(">Q", b, 136 + 8 * i, v)
    return bytes(b)


def _blocks(blocks: List[bytes], bs: int = 4096) -> bytes:
    return build(b"", bs, blocks)


HOSTILE = {
    "truncated-header": lambda: _good()[:130],
    "block-size-zero": lambda: _u32(128, 0),
    "block-size-not-sector-multiple": lambda: _u32(128, 1000),
    "block-size-over-64m": lambda: _u32(128, (64 << 20) + 512),
    "block-count-over-offsets-cap": lambda: _u32(132, 0xFFFFFFFF),
    "offset-table-past-eof": lambda: _u32(132, 1 << 24),
    "first-block-inside-table": lambda: _off(0, 0),
    "offsets-decrease": lambda: _off(2, 200),
    "block-over-128m": lambda: _off(4, (1 << 40)),
    "last-offset-past-eof": lambda: _off(4, len(_good()) + 1),
    "empty-block": lambda: _blocks([zlib.compress(bytes(4096)), b"", zlib.compress(bytes(4096))]),
    "block-not-zlib": lambda: _blocks([b"\x00garbage-garbage-garbage"]),
    "block-inflates-short": lambda: _blocks([zlib.compress(bytes(2048))]),
    "block-inflates-long": lambda: _blocks([zlib.compress(bytes(8192))]),
    "block-stream-truncated": lambda: _blocks([zlib.compress(pattern(4096, 1))[:-6]]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_corrupt(tmp, name):
    p = write(tmp, f"{name}.cloop", HOSTILE[name]())
    res = run_child(p)
    assert res["exc"] == "CorruptImageError", f"{name}: {res}"
