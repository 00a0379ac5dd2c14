"""Errors carry .code/.errno/.message; each thread's Broker records that
thread's errors and no other's."""

from __future__ import annotations

import pickle
import threading

import pytest

import libqblock as qb
from libqblock import errors

CLASSES = [
    (qb.InvalidParamError, -100, ValueError),
    (qb.InternalError, -2, None),
    (qb.NoMemoryError, -1, MemoryError),
    (qb.OutOfRangeError, -101, IndexError),
    (qb.UnsupportedError, -102, NotImplementedError),
    (qb.CorruptImageError, -103, None),
    (qb.ImageLockedError, -104, None),
]


@pytest.mark.parametrize("cls, code, builtin", CLASSES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_each_class_carries_code_errno_message(cls, code, builtin):
    e = cls("something failed", 5)
    assert isinstance(e, qb.QBlockError) and isinstance(e, Exception)
    if builtin is not None:
        assert isinstance(e, builtin)  # so generic handlers catch it too
    assert (e.code, e.errno, e.message, str(e)) == (code, 5, "something failed", "something failed")
    assert cls("no errno").errno == 0
    assert repr(e) == f"{cls.__name__}('something failed', errno=5)"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and (back.code, back.errno, back.message) == (code, 5, "something failed")


def test_codes_are_the_seeds():
    assert qb.QB_ERR_MEM_ERR == -1 and qb.QB_ERR_INTERNAL_ERR == -2
    assert qb.QB_ERR_INVALID_PARAM == -100 and qb.QB_ERR_BLOCK_OUT_OF_RANGE == -101
    assert {c.code for c in errors.ERROR_CLASSES} == {-1, -2, -100, -101, -102, -103, -104}
    assert qb.QBlockError.code == qb.QB_ERR_INTERNAL_ERR


def test_engine_errors_arrive_as_these_classes(tmp):
    with pytest.raises(qb.InternalError) as ei:
        qb.open(tmp / "absent.raw", flags=0)
    assert ei.value.errno == 2 and "absent.raw" in ei.value.message
    p = tmp / "a.raw"
    qb.create(p, qb.RawOptions(512))
    with qb.open(p) as img:
        with pytest.raises(qb.OutOfRangeError) as ei2:
            img.read(1, 512)
    assert ei2.value.code == -101 and ei2.value.errno == 0


def test_the_threads_broker_records_the_last_error():
    b = qb.Broker.current()
    assert qb.Broker.current() is b
    b.clear()
    assert (b.err_ret, b.err_no, b.err_msg, b.last_error) == (0, 0, "", "no error")
    with pytest.raises(qb.InvalidParamError):
        qb.RawOptions(-1)
    assert b.err_ret == -100 and "virt_size" in b.err_msg and b.err_no == 0
    qb.InternalError("disk on fire", 5)  # constructing records, as raising does
    assert (b.err_ret, b.err_no, b.last_error) == (-2, 5, "disk on fire (errno 5)")
    # success does not clear it (as in the seed)
    qb.RawOptions(1)
    assert b.err_ret == -2
    assert "err_ret=-2" in repr(b)


def test_errors_record_in_their_own_threads_broker_only():
    main = qb.Broker.current()
    main.clear()
    n = 8
    seen = {}
    ready = threading.Barrier(n)

    def worker(i):
        mine = qb.Broker.current()
        ready.wait()  # all threads alive at once, all raising concurrently
        for k in range(200):
            try:
                raise qb.OutOfRangeError(f"thread {i} error {k}", i)
            except qb.OutOfRangeError:
                pass
            assert mine.err_msg == f"thread {i} error {k}" and mine.err_no == i
        seen[i] = (mine, mine.err_ret, mine.err_no, mine.err_msg)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(v[0]) for v in seen.values()}) == n  # one broker per thread
    for i, (_, ret, no, msg) in seen.items():
        assert (ret, no, msg) == (-101, i, f"thread {i} error 199")
    assert main.err_ret == 0 and main.err_msg == ""  # nothing leaked into this thread's broker


def test_engine_errors_in_a_thread_stay_in_that_thread(tmp):
    main = qb.Broker.current()
    main.clear()
    out = {}

    def worker():
        try:
            qb.open(tmp / "nope.raw", flags=0)
        except qb.QBlockError:
            pass
        out["b"] = qb.Broker.current()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert out["b"] is not main and out["b"].err_ret == -2 and "nope.raw" in out["b"].err_msg
    assert main.err_ret == 0


def test_private_brokers_are_not_the_threads():
    b = qb.Broker()
    assert b is not qb.Broker.current()
    qb.InternalError("x")
    assert b.err_ret == 0
