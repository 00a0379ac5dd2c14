"""One Image shared by many threads; readinto into every kind of writable
buffer; the GIL released during I/O (shown by observation, not by timing)."""

from __future__ import annotations

import array
import mmap
import random
import threading

import numpy as np
import pytest

import libqblock as qb

MiB = 1 << 20


def _run(threads):
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class _Worker(threading.Thread):
    """A thread that keeps its exception for the main thread to re-raise."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None

    def run(self):
        try:
            self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e


def _check(workers):
    _run(workers)
    for w in workers:
        if w.error is not None:
            raise w.error


# --- concurrent reads and writes against a model ------------------------------------------


N_THREADS = 8
SLOT = 512 * 1024


def _alphabet(owner):
    # Bytes thread `owner` writes: b % 9 == owner + 1, so a byte seen anywhere
    # tells which thread wrote it (0 = never written).
    return np.arange(owner + 1, 256, 9, dtype=np.uint8)


def test_many_threads_share_one_image(tmp):
    p = tmp / "shared.raw"
    size = N_THREADS * SLOT
    qb.create(p, qb.RawOptions(size))
    img = qb.open(p, flags=qb.O_RDWR | qb.O_CACHE_WB)
    models = [np.zeros(SLOT, dtype=np.uint8) for _ in range(N_THREADS)]
    start = threading.Barrier(N_THREADS)

    def worker(tid):
        rng = random.Random(tid)
        nprng = np.random.default_rng(tid)
        model, base, alpha = models[tid], tid * SLOT, _alphabet(tid)
        start.wait()
        for step in range(400):
            op = rng.random()
            off = rng.randrange(SLOT)
            length = rng.randrange(1, min(SLOT - off, 20000) + 1)
            if op < 0.4:  # unaligned write inside the own slot
                data = alpha[nprng.integers(0, len(alpha), length)]
                kind = step % 3
                src = data.tobytes() if kind == 0 else (memoryview(data) if kind == 1 else data)
                assert img.write(src, base + off) == length
                model[off : off + length] = data
            elif op < 0.7:  # read back own data: must equal the model exactly
                if step % 2:
                    got = np.frombuffer(img.read(length, base + off), dtype=np.uint8)
                else:
                    got = np.empty(length, dtype=np.uint8)
                    assert img.readinto(got, base + off) == length
                np.testing.assert_array_equal(got, model[off : off + length])
            else:  # read across the whole disk: every byte is 0 or its owner's
                o = rng.randrange(size - 65536)
                got = np.frombuffer(img.read(65536, o), dtype=np.uint8)
                owners = (np.arange(o, o + 65536) // SLOT).astype(np.uint8)
                ok = (got == 0) | (got % 9 == owners + 1)
                assert ok.all(), f"thread {tid}: foreign bytes at {o + int(np.argmin(ok))}"
            if step % 97 == 0:
                img.flush()

    _check([_Worker(worker, t) for t in range(N_THREADS)])
    whole = np.concatenate(models)
    np.testing.assert_array_equal(np.frombuffer(img.read(size, 0), dtype=np.uint8), whole)
    img.close()
    assert p.read_bytes() == whole.tobytes()


def test_concurrent_allocation_queries_and_info(tmp):
    p = tmp / "q.raw"
    qb.create(p, qb.RawOptions(64 * MiB))
    with qb.open(p) as img:
        img.write(b"x" * MiB, 8 * MiB)

        def worker(i):
            for _ in range(200):
                assert img.check_allocation(0, 64 * MiB) == (True, 64 * MiB)
                assert img.info().virt_size == 64 * MiB
                assert sum(e.length for e in img.map()) == 64 * MiB
                assert img.read(2, 9 * MiB - 1) == b"x\0"

        _check([_Worker(worker, i) for i in range(6)])


def test_close_while_other_threads_read(tmp):
    # Closing under concurrent readers: each read either completes with the
    # right bytes or raises InvalidParamError ("closed"); nothing else.
    p = tmp / "c.raw"
    qb.create(p, qb.RawOptions(4 * MiB))
    with qb.open(p) as w:
        w.write(b"\x5a" * (4 * MiB), 0)
    img = qb.open(p, flags=0)
    running = threading.Barrier(5)

    def reader():
        running.wait()
        while True:
            try:
                assert img.read(MiB, 3 * MiB) == b"\x5a" * MiB
            except qb.InvalidParamError:
                return

    workers = [_Worker(reader) for _ in range(4)]
    for w in workers:
        w.start()
    running.wait()
    img.close()
    for w in workers:
        w.join()
        assert w.error is None, w.error
    assert img.closed


# --- readinto fills any writable buffer in place ---------------------------------------------


@pytest.fixture
def patterned(tmp):
    p = tmp / "pat.raw"
    data = bytes(range(256)) * 64  # 16 KiB
    qb.create(p, qb.RawOptions(len(data)))
    with qb.open(p) as img:
        img.write(data, 0)
    img = qb.open(p, flags=0)
    yield img, data
    img.close()


def test_readinto_bytearray(patterned):
    img, data = patterned
    b = bytearray(1000)
    assert img.readinto(b, 77) == 1000 and b == data[77:1077]


def test_readinto_memoryview_slice_touches_only_the_slice(patterned):
    img, data = patterned
    backing = bytearray(b"\xee" * 300)
    mv = memoryview(backing)
    assert img.readinto(mv[100:200], 5) == 100
    assert backing[100:200] == data[5:105]
    assert backing[:100] == b"\xee" * 100 and backing[200:] == b"\xee" * 100


def test_readinto_numpy_uint8(patterned):
    img, data = patterned
    a = np.zeros(4096, dtype=np.uint8)
    assert img.readinto(a, 0) == 4096
    np.testing.assert_array_equal(a, np.frombuffer(data[:4096], dtype=np.uint8))


@pytest.mark.parametrize("dtype", [np.uint32, np.float64, np.int16])
def test_readinto_numpy_other_dtypes_fill_their_bytes(patterned, dtype):
    img, data = patterned
    a = np.zeros(100, dtype=dtype)
    n = a.nbytes
    assert img.readinto(a, 256) == n  # returns bytes, not elements
    assert a.tobytes() == data[256 : 256 + n]
    np.testing.assert_array_equal(a, np.frombuffer(data[256 : 256 + n], dtype=dtype))


def test_readinto_numpy_2d_and_a_contiguous_row(patterned):
    img, data = patterned
    a = np.zeros((4, 16), dtype=np.uint8)
    assert img.readinto(a, 0) == 64 and a.tobytes() == data[:64]
    assert img.readinto(a[2], 1000) == 16
    assert a[2].tobytes() == data[1000:1016] and a[3].tobytes() == data[48:64]


def test_readinto_refuses_non_contiguous_and_read_only(patterned):
    img, _ = patterned
    a = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises((BufferError, ValueError, TypeError)):
        img.readinto(a[:, ::2], 0)
    with pytest.raises((BufferError, TypeError)):
        img.readinto(b"read-only", 0)
    ro = np.zeros(8, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises((BufferError, ValueError, TypeError)):
        img.readinto(ro, 0)
    np.testing.assert_array_equal(a, 0)


def test_readinto_anonymous_and_file_mmap(patterned, tmp):
    img, data = patterned
    with mmap.mmap(-1, 8192) as m:
        assert img.readinto(m, 4096) == 8192 and m[:] == data[4096:12288]
    f = tmp / "mapped.bin"
    f.write_bytes(b"\0" * 4096)
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 4096) as m:
        assert img.readinto(m, 100) == 4096
        m.flush()
    assert f.read_bytes() == data[100:4196]


def test_readinto_array_array(patterned):
    img, data = patterned
    a = array.array("I", [0] * 64)
    assert img.readinto(a, 8) == 256 and a.tobytes() == data[8:264]


def test_readinto_past_the_end_leaves_an_error(patterned):
    img, data = patterned
    b = bytearray(10)
    with pytest.raises(qb.OutOfRangeError):
        img.readinto(b, len(data) - 5)


# --- the GIL is released during I/O ------------------------------------------------------------


BIG = 128 * MiB


@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory):
    p = tmp_path_factory.mktemp("gil") / "big.raw"
    qb.create(p, qb.RawOptions(BIG))  # a hole: reads as zeroes, costs no disk
    return p


def _partially_filled(buf):
    # The first byte already read (no longer 0xff), the last not yet.
    return buf[0] != 0xFF and buf[-1] == 0xFF


def test_python_runs_while_a_read_is_in_progress(big_sparse):
    """Another thread sees the destination buffer half-filled: it executed
    Python code while readinto was inside the engine, which is only possible
    if the GIL was released for the I/O."""
    buf = np.empty(BIG, dtype=np.uint8)
    seen = threading.Event()
    stop = threading.Event()
    sampler_running = threading.Event()
    ticks = [0]

    def sampler():
        sampler_running.set()
        while not stop.is_set():
            ticks[0] += 1
            if _partially_filled(buf):
                seen.set()
                return

    with qb.open(big_sparse, flags=0) as img:
        for _ in range(20):  # each attempt is a full 128 MiB read
            buf.fill(0xFF)
            sampler_running.clear()
            t = threading.Thread(target=sampler)
            t.start()
            sampler_running.wait()
            assert img.readinto(buf, 0) == BIG
            stop.set()
            t.join()
            stop.clear()
            assert buf[0] == 0 and buf[-1] == 0  # the read completed
            if seen.is_set():
                break
    assert seen.is_set(), "no other thread ran Python code during a 128 MiB read: the GIL was held"
    assert ticks[0] > 0


def test_python_runs_while_a_write_is_in_progress(tmp):
    """Another thread sees the image file half written (first byte new, last
    byte old) while write() is inside the engine."""
    import os

    p = tmp / "w.raw"
    qb.create(p, qb.RawOptions(BIG))
    data = np.full(BIG, 0xAB, dtype=np.uint8)
    seen = threading.Event()
    stop = threading.Event()
    running = threading.Event()
    fd = os.open(p, os.O_RDONLY)
    try:
        with qb.open(p, flags=qb.O_RDWR | qb.O_CACHE_WB) as img:
            for attempt in range(20):
                old, new = (b"\0", b"\xab") if attempt % 2 == 0 else (b"\xab", b"\0")
                src = data if attempt % 2 == 0 else np.zeros(BIG, dtype=np.uint8)

                def sampler():
                    running.set()
                    while not stop.is_set():
                        if os.pread(fd, 1, 0) == new and os.pread(fd, 1, BIG - 1) == old:
                            seen.set()
                            return

                running.clear()
                t = threading.Thread(target=sampler)
                t.start()
                running.wait()
                assert img.write(src, 0) == BIG
                stop.set()
                t.join()
                stop.clear()
                if seen.is_set():
                    break
    finally:
        os.close(fd)
    assert seen.is_set(), "no other thread ran Python code during a 128 MiB write: the GIL was held"


@pytest.fixture(scope="module")
def qcow2_data(tmp_path_factory):
    """A qcow2 whose every cluster holds data: reads go through its tables."""
    p = tmp_path_factory.mktemp("gil") / "data.qcow2"
    qb.create(p, qb.Qcow2Options(BIG))
    with qb.open(p, "qcow2", qb.O_RDWR | qb.O_CACHE_WB) as img:
        chunk = (bytes(range(1, 256)) * (MiB // 255 + 1))[:MiB]
        for off in range(0, BIG, MiB):
            img.write(chunk, off)
    return p


@pytest.mark.parametrize("which", ["big_sparse", "qcow2_data"])
def test_concurrent_reads_do_not_serialize(which, request):
    """Two reads of one Image are seen in progress at the same moment (the
    qcow2's metadata locks do not serialize them either)."""
    path = request.getfixturevalue(which)
    half = BIG // 2
    a = np.empty(half, dtype=np.uint8)
    b = np.empty(half, dtype=np.uint8)
    both = threading.Event()
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            if _partially_filled(a) and _partially_filled(b):
                both.set()
                return

    with qb.open(path, flags=0) as img:
        for _ in range(30):
            a.fill(0xFF)
            b.fill(0xFF)
            go = threading.Barrier(3)

            def reader(buf, off):
                go.wait()
                img.readinto(buf, off)

            readers = [threading.Thread(target=reader, args=(a, 0)), threading.Thread(target=reader, args=(b, half))]
            s = threading.Thread(target=sampler)
            s.start()
            for r in readers:
                r.start()
            go.wait()
            for r in readers:
                r.join()
            stop.set()
            s.join()
            stop.clear()
            if both.is_set():
                break
    assert both.is_set(), "two reads were never in progress together: reads serialize"
