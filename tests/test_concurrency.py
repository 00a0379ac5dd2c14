"""Concurrency and the life of an Image, for every writable format: threads
writing disjoint (not cluster-aligned) ranges of one Image end with the disk
a serial run makes, without deadlock and with a clean ``qemu-img check``;
a closed image refuses use (two readers of one qcow2 at once: test_threads.py),
closes again harmlessly; an image dropped without ``close()`` is flushed,
written back and unlocked."""

from __future__ import annotations

import gc
import random
import subprocess
import threading
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

import libqblock as qb

from conftest import qemu_img
from crash_workload import CONFIGS, Config, make_image

MiB = 1 << 20
THREADS = 4
DEADLINE = 120.0  # seconds: a thread still running then is a deadlock
ROUNDS = 4  # a lost table update in vmdk showed on about one run in eight


def _slot(cfg: Config, size: int, t: int) -> Tuple[int, int]:
    """Thread ``t``'s range: a quarter of the disk, its edges 1.5 KiB off the
    units so neighbours share clusters (and their read-modify-writes)."""
    per = size // THREADS
    start = 0 if t == 0 else t * per + 1536
    end = size if t == THREADS - 1 else (t + 1) * per + 1536
    return start, end


def _steps(cfg: Config, size: int, t: int) -> List[Tuple[str, int, bytes]]:
    rng = random.Random(t * 7919 + len(cfg.fmt))
    start, end = _slot(cfg, size, t)
    out: List[Tuple[str, int, bytes]] = []
    for i in range(40):
        off = rng.randrange(start, end - 512) // 512 * 512
        n = min(rng.choice([512, 4096, cfg.unit, cfg.unit + 1536, 3 * 4096]), end - off)
        kind = "zero" if i % 7 == 6 else "write"
        out.append((kind, off, rng.randbytes(n) if kind == "write" else bytes(n)))
        if i % 10 == 9:
            out.append(("flush", 0, b""))
    return out


def _apply(img: qb.Image, steps: List[Tuple[str, int, bytes]]) -> None:
    for kind, off, data in steps:
        if kind == "write":
            img.write(data, off)
            assert img.read(len(data), off) == data
        elif kind == "zero":
            img.write_zeroes(off, len(data))
        else:
            img.flush()




@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_threads_writing_one_image_end_as_a_serial_run(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    serial, initial = make_image(cfg, tmp_path / "s")
    threaded, _ = make_image(cfg, tmp_path / "t")
    size = len(initial)
    plans = [_steps(cfg, size, t) for t in range(THREADS)]

    with qb.open(str(serial), cfg.fmt, qb.O_RDWR | qb.O_CACHE_WB) as img:
        for p in plans:
            _apply(img, p)

    with qb.open(str(serial), cfg.fmt, 0) as a:
        want = a.read(size, 0)
    # Races show up on some runs only: a few rounds, each on a fresh image.
    for round_ in range(ROUNDS):
        if round_:
            threaded, _ = make_image(cfg, tmp_path / f"t{round_}")
        _threaded_run(cfg, threaded, plans)
        with qb.open(str(threaded), cfg.fmt, 0) as b:
            assert b.read(size, 0) == want, f"{name}: threads and a serial run disagree (round {round_})"
        if cfg.qemu_check:
            r = qemu_img("check", "-f", cfg.fmt, str(threaded), check=False)
            assert r.returncode == 0, r.stdout + r.stderr
    if cfg.fmt != "cow":  # QEMU dropped cow
        r = qemu_img("compare", "-f", cfg.fmt, "-F", cfg.fmt, str(serial), str(threaded), check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def _threaded_run(cfg: Config, path: Path, plans: List[List[Tuple[str, int, bytes]]]) -> None:
    errors: List[BaseException] = []
    img = qb.open(str(path), cfg.fmt, qb.O_RDWR | qb.O_CACHE_WB)
    go = threading.Barrier(len(plans))

    def run(p: List[Tuple[str, int, bytes]]) -> None:
        try:
            go.wait()
            _apply(img, p)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(p,), daemon=True) for p in plans]
    for w in workers:
        w.start()
    for w in workers:
        w.join(DEADLINE)
    assert not any(w.is_alive() for w in workers), f"{cfg.fmt}: threads still running after {DEADLINE} s: deadlock"
    assert not errors, errors[0]
    img.close()


CALLS: List[Tuple[str, Callable[[qb.Image], object]]] = [
    ("read", lambda i: i.read(1, 0)),
    ("readinto", lambda i: i.readinto(bytearray(1), 0)),
    ("write", lambda i: i.write(b"x", 0)),
    ("write_zeroes", lambda i: i.write_zeroes(0, 512)),
    ("discard", lambda i: i.discard(0, 512)),
    ("flush", lambda i: i.flush()),
    ("truncate", lambda i: i.truncate(2 * MiB)),
    ("block_status", lambda i: i.block_status(0, 512)),
    ("check_allocation", lambda i: i.check_allocation(0, 512)),
    ("map", lambda i: list(i.map())),
    ("info", lambda i: i.info()),
    ("virt_size", lambda i: i.virt_size),
]


@pytest.mark.parametrize("call", [c for _, c in CALLS], ids=[n for n, _ in CALLS])
def test_a_closed_image_refuses_every_call_and_closes_again_harmlessly(
        call: Callable[[qb.Image], object], tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    qb.create(str(p), qb.Qcow2Options(MiB))
    img = qb.open(str(p), "qcow2", qb.O_RDWR)
    img.close()
    with pytest.raises(qb.InvalidParamError, match="closed"):
        call(img)
    img.close()
    assert img.closed


def _writable_by_qemu(path: Path, fmt: str) -> bool:
    r = subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 1 0 512", str(path)], capture_output=True, text=True)
    return r.returncode == 0 and "failed" not in (r.stdout + r.stderr).lower()


@pytest.mark.parametrize("name", ["qcow2", "qed", "vdi", "vmdk", "vhdx", "parallels", "vpc", "qcow"])
def test_an_image_dropped_without_close_is_closed(name: str, tmp_path: Path) -> None:
    """Written, never flushed nor closed, then dropped: the data is there,
    QEMU can take the image for writing, and its check finds it clean (the
    clusters held for allocation given back, a dirty marker cleared)."""
    cfg = CONFIGS[name]
    p, _ = make_image(cfg, tmp_path / "d")
    img = qb.open(str(p), cfg.fmt, qb.O_RDWR | qb.O_CACHE_WB)
    data = bytes(range(256)) * 64
    img.write(data, 8192)
    assert not _writable_by_qemu(p, cfg.fmt), "our open does not keep QEMU out"
    del img
    gc.collect()
    assert _writable_by_qemu(p, cfg.fmt), "the dropped image still holds its lock"
    if cfg.qemu_check:
        r = qemu_img("check", "-f", cfg.fmt, str(p), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    with qb.open(str(p), cfg.fmt, 0) as again:
        assert again.read(len(data), 8192) == data
