"""libqblock.capi: the seed's qb_* call shapes, negative codes instead of
exceptions, errors recorded in the broker handed in, lifetimes checked."""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest

import libqblock as qb
from libqblock import capi as c

MiB = 1 << 20


@pytest.fixture
def broker():
    b = c.qb_broker_new()
    yield b


def file_loc(broker, path):
    loc = c.qb_loc_info_new(broker)
    assert loc.prot_type == c.QB_PROT_NONE
    loc.prot_type = c.QB_PROT_FILE
    loc.filename = str(path)
    return loc


def raw_fmt(broker, size):
    fmt = c.qb_fmt_info_new(broker)
    assert fmt.fmt_type is c.QB_FMT_NONE
    fmt.fmt_type = c.QB_FMT_RAW
    fmt.o_fmt.o_raw.virt_size = size
    return fmt


@pytest.fixture
def opened(tmp, broker):
    """A broker, an open state on a new 1 MiB raw image, and its path."""
    path = tmp / "c.raw"
    qbs = c.qb_state_new(broker)
    loc = file_loc(broker, path)
    assert c.qb_create(broker, qbs, loc, raw_fmt(broker, MiB), 0) == 0
    assert c.qb_open(broker, qbs, loc, None, c.LIBQBLOCK_O_RDWR) == 0
    yield broker, qbs, path
    if qbs.is_open:
        c.qb_close(broker, qbs)


def test_the_seed_sequence(tmp, broker):
    # qb_broker_new, qb_state_new, qb_create, qb_open, qb_write, qb_read,
    # qb_flush, qb_check_allocation, qb_info_image_static_get, qb_close,
    # qb_state_delete, qb_broker_delete: the seed's own example, in Python.
    qbs = c.qb_state_new(broker)
    loc = file_loc(broker, tmp / "seed.raw")
    fmt = raw_fmt(broker, 4 * MiB)
    assert c.qb_create(broker, qbs, loc, fmt, 0) == 0
    assert not qbs.is_open  # create does not open
    assert c.qb_open(broker, qbs, loc, fmt, c.LIBQBLOCK_O_RDWR) == 0
    assert c.qb_write(broker, qbs, b"libqblock", 9, 12345) == 9
    buf = bytearray(16)
    assert c.qb_read(broker, qbs, buf, 11, 12344) == 11
    assert bytes(buf) == b"\0libqblock\0" + b"\0" * 5
    assert c.qb_flush(broker, qbs) == 0
    assert c.qb_check_allocation(broker, qbs, 0, 4 * MiB) == (0, 1, 4 * MiB)
    ret, info = c.qb_info_image_static_get(broker, qbs)
    assert ret == 0
    assert info.virt_size == 4 * MiB and info.sector_size == 512 and info.encrypt is False
    assert info.loc.prot_type == c.QB_PROT_FILE and info.loc.filename == str(tmp / "seed.raw")
    assert info.fmt.fmt_type is c.QB_FMT_RAW and info.fmt.options().virt_size == 4 * MiB
    assert info.backing_loc is None and info.info.format is qb.Format.RAW
    assert c.qb_info_image_static_delete(broker, info) == 0
    assert c.qb_close(broker, qbs) == 0
    assert c.qb_state_delete(broker, qbs) == 0
    assert c.qb_loc_info_delete(broker, loc) == 0 and c.qb_fmt_info_delete(broker, fmt) == 0
    assert c.qb_broker_delete(broker) == 0
    assert broker.err_ret == 0 and c.qb_error_get_human_str(broker) == "no error"
    assert (tmp / "seed.raw").read_bytes()[12345:12354] == b"libqblock"


# --- errors are codes, recorded in the broker handed in ------------------------------


def test_errors_return_codes_and_record_in_the_given_broker(tmp, broker):
    other = c.qb_broker_new()
    qbs = c.qb_state_new(broker)
    ret = c.qb_open(broker, qbs, file_loc(broker, tmp / "missing.raw"), None, 0)
    assert ret == c.QB_ERR_INTERNAL_ERR == qb.InternalError.code
    assert broker.err_ret == ret and c.qb_error_get_errno(broker) == 2
    text = c.qb_error_get_human_str(broker)
    assert "missing.raw" in text and "errno 2" in text
    assert other.err_ret == 0 and c.qb_error_get_human_str(other) == "no error"
    assert not qbs.is_open


def test_out_of_range_read_and_write(opened):
    broker, qbs, _ = opened
    buf = bytearray(10)
    assert c.qb_read(broker, qbs, buf, 10, MiB - 5) == c.QB_ERR_BLOCK_OUT_OF_RANGE
    assert broker.err_ret == -101 and "beyond" in broker.err_msg
    assert c.qb_write(broker, qbs, b"x" * 10, 10, MiB - 5) == c.QB_ERR_BLOCK_OUT_OF_RANGE
    assert c.qb_read(broker, qbs, buf, 5, MiB - 5) == 5  # the last bytes are fine


def test_bad_parameters_are_invalid_param_codes(opened, tmp):
    broker, qbs, _ = opened
    assert c.qb_read(broker, qbs, bytearray(4), 5, 0) == c.QB_ERR_INVALID_PARAM  # len > buf
    assert "larger than buf" in broker.err_msg
    assert c.qb_read(broker, qbs, b"read-only", 4, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_read(broker, qbs, bytearray(4), -1, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_read(broker, qbs, bytearray(4), 4, -1) == c.QB_ERR_INVALID_PARAM  # negative offset
    assert c.qb_write(broker, qbs, b"abc", 4, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_write(broker, qbs, 12345, 4, 0) == c.QB_ERR_INVALID_PARAM  # not a buffer
    assert c.qb_open(broker, c.QBlockState(), 42, None, 0) == c.QB_ERR_INVALID_PARAM  # loc
    assert c.qb_open(broker, c.QBlockState(), c.QBlockLocationInfo(), None, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_open(broker, "not a state", tmp / "c.raw", None, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_open(broker, c.QBlockState(), tmp / "c.raw", None, 1 << 20) == c.QB_ERR_INVALID_PARAM  # flag
    assert "unknown flag bits" in broker.err_msg
    assert c.qb_open(broker, c.QBlockState(), tmp / "c.raw", "nosuch", 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_check_allocation(broker, qbs, MiB, 1) == (c.QB_ERR_BLOCK_OUT_OF_RANGE, 0, 0)


def test_read_only_open_refuses_writes(opened):
    broker, qbs, path = opened
    ro = c.qb_state_new(broker)
    assert c.qb_open(broker, ro, c.QBlockLocationInfo(c.QB_PROT_FILE, str(path)), None, 0) == 0
    assert c.qb_write(broker, ro, b"x", 1, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_close(broker, ro) == 0


def test_create_errors(tmp, broker):
    qbs = c.qb_state_new(broker)
    loc = file_loc(broker, tmp / "x.img")
    fmt = c.qb_fmt_info_new(broker)
    assert c.qb_create(broker, qbs, loc, fmt, 0) == c.QB_ERR_INVALID_PARAM  # QB_FMT_NONE
    fmt.fmt_type = c.QB_FMT_QCOW2
    fmt.o_fmt.o_qcow2.virt_size = MiB
    fmt.o_fmt.o_qcow2.cluster_size = 3000
    assert c.qb_create(broker, qbs, loc, fmt, 0) == c.QB_ERR_INVALID_PARAM
    assert "cluster_size" in c.qb_error_get_human_str(broker)
    fmt.fmt_type = c.QB_FMT_VMDK
    fmt.o_fmt.o_vmdk.virt_size = MiB
    fmt.o_fmt.o_vmdk.subformat = "streamOptimised"  # (sic)
    assert c.qb_create(broker, qbs, loc, fmt, 0) == c.QB_ERR_INVALID_PARAM
    assert "subformat" in broker.err_msg
    nbd = c.QBlockLocationInfo(c.QB_PROT_NBD, host="localhost", port=10809, export="e")
    assert c.qb_create(broker, qbs, nbd, raw_fmt(broker, MiB), 0) == c.QB_ERR_UNSUPPORTED
    assert broker.err_ret == -102
    assert c.qb_create(broker, qbs, loc, "raw", 0) == c.QB_ERR_INVALID_PARAM
    assert not (tmp / "x.img").exists()


def test_create_with_backing_loc(tmp, broker):
    base = tmp / "base.raw"
    qb.create(base, qb.RawOptions(MiB))
    fmt = c.qb_fmt_info_new(broker)
    fmt.fmt_type = c.qb_str2fmttype("qed")
    slot = fmt.o_fmt.o_qed
    assert slot.backing_loc.prot_type == c.QB_PROT_NONE and slot.table_size == 4
    slot.backing_loc = c.QBlockLocationInfo(c.QB_PROT_FILE, filename=str(base))
    slot.backing_fmt = qb.Format.RAW
    o = fmt.to_options()
    assert isinstance(o, qb.QedOptions) and o.backing == qb.Location.file(base) and o.virt_size == 0
    assert c.qb_create(broker, c.qb_state_new(broker), tmp / "top.qed", fmt, 0) == 0
    with qb.open(tmp / "top.qed", flags=0) as img:
        info = img.info()
        assert info.format is qb.Format.QED and info.virt_size == MiB  # size 0 took the backing's
        assert info.backing_location == qb.Location.file(base) and info.backing_format is qb.Format.RAW


def test_every_seed_format_has_an_option_member(broker):
    fmt = c.qb_fmt_info_new(broker)
    for name in ("cow", "qed", "qcow", "qcow2", "raw", "rbd", "sheepdog", "vdi", "vmdk", "vpc", "vhdx"):
        slot = getattr(fmt.o_fmt, "o_" + name)
        assert slot.virt_size == 0
        fmt.fmt_type = c.qb_str2fmttype(name)
        assert fmt.options() is slot
    assert fmt.o_fmt.o_vmdk.subformat == "monolithicSparse" and fmt.o_fmt.o_vdi.static is False
    assert fmt.o_fmt.o_qcow2.compat == "1.1" and fmt.o_fmt.o_qcow.encrypt is False
    assert fmt.o_fmt.o_sheepdog.preallocation == "off" and fmt.o_fmt.o_vpc.subformat == "dynamic"


# --- lifetimes: out of order is an error, never undefined ---------------------------


def test_out_of_order_lifetimes(opened):
    broker, qbs, path = opened
    loc = c.QBlockLocationInfo(c.QB_PROT_FILE, filename=str(path))
    assert c.qb_open(broker, qbs, loc, None, 0) == c.QB_ERR_INVALID_PARAM  # already open
    assert "open" in broker.err_msg
    assert c.qb_state_delete(broker, qbs) == c.QB_ERR_INVALID_PARAM  # still open
    assert c.qb_broker_delete(broker) == c.QB_ERR_INVALID_PARAM  # still has a state
    assert not broker.deleted and "state" in broker.err_msg
    assert c.qb_close(broker, qbs) == 0
    assert c.qb_close(broker, qbs) == c.QB_ERR_INVALID_PARAM  # not open
    assert c.qb_read(broker, qbs, bytearray(1), 1, 0) == c.QB_ERR_INVALID_PARAM
    assert c.qb_flush(broker, qbs) == c.QB_ERR_INVALID_PARAM
    assert c.qb_info_image_static_get(broker, qbs) == (c.QB_ERR_INVALID_PARAM, None)
    # a closed state can be opened again
    assert c.qb_open(broker, qbs, loc, None, 0) == 0 and c.qb_close(broker, qbs) == 0
    assert c.qb_state_delete(broker, qbs) == 0
    assert c.qb_state_delete(broker, qbs) == c.QB_ERR_INVALID_PARAM  # twice
    assert c.qb_open(broker, qbs, loc, None, 0) == c.QB_ERR_INVALID_PARAM  # deleted
    assert "deleted" in broker.err_msg
    assert c.qb_broker_delete(broker) == 0
    assert broker.deleted
    # a deleted broker records nothing and is refused
    assert c.qb_broker_delete(broker) == c.QB_ERR_INVALID_PARAM
    assert c.qb_state_new(broker) is None and c.qb_loc_info_new(broker) is None and c.qb_fmt_info_new(broker) is None
    before = (broker.err_ret, broker.err_msg)
    assert c.qb_flush(broker, qbs) == c.QB_ERR_INVALID_PARAM
    assert (broker.err_ret, broker.err_msg) == before


def test_non_broker_is_refused():
    assert c.qb_flush(None, c.QBlockState()) == c.QB_ERR_INVALID_PARAM  # type: ignore[arg-type]
    assert c.qb_state_new(object()) is None  # type: ignore[arg-type]
    assert c.qb_check_allocation(None, None, 0, 1) == (c.QB_ERR_INVALID_PARAM, 0, 0)  # type: ignore[arg-type]
    assert c.qb_error_get_human_str(None) == "invalid broker"  # type: ignore[arg-type]
    assert c.qb_error_get_errno(None) == 0  # type: ignore[arg-type]


def test_close_leaves_a_closed_state(opened):
    broker, qbs, _ = opened
    assert c.qb_close(broker, qbs) == 0
    assert not qbs.is_open and qbs.image is None


# --- buffers -------------------------------------------------------------------------


def test_read_into_any_writable_buffer(opened, tmp):
    broker, qbs, _ = opened
    pattern = bytes(range(256)) * 16
    assert c.qb_write(broker, qbs, memoryview(pattern), 4096, 8192) == 4096
    a = np.zeros(512, dtype=np.uint32)  # 2048 bytes, read as bytes
    assert c.qb_read(broker, qbs, a, 2048, 8192) == 2048
    assert a.tobytes() == pattern[:2048]
    mv = memoryview(bytearray(100))
    assert c.qb_read(broker, qbs, mv[10:], 50, 8192 + 1) == 50
    assert bytes(mv[10:60]) == pattern[1:51] and bytes(mv[:10]) == b"\0" * 10
    with mmap.mmap(-1, 4096) as m:
        assert c.qb_read(broker, qbs, m, 4096, 8192) == 4096
        assert m[:] == pattern
    assert c.qb_read(broker, qbs, np.zeros((4, 4), dtype=np.uint8)[:, :2], 4, 0) == c.QB_ERR_INVALID_PARAM
    assert "contiguous" in broker.err_msg
    # write from the first len bytes of a larger buffer
    assert c.qb_write(broker, qbs, np.arange(8, dtype=np.uint16), 4, 0) == 4
    out = bytearray(8)
    c.qb_read(broker, qbs, out, 8, 0)
    assert bytes(out) == b"\0\0\1\0\0\0\0\0"
    assert c.qb_read(broker, qbs, bytearray(), 0, MiB) == 0  # zero bytes at the end


def test_check_allocation_is_64_bit(tmp, broker):
    p = tmp / "big.raw"
    qb.create(p, qb.RawOptions(6 << 40))
    qbs = c.qb_state_new(broker)
    assert c.qb_open(broker, qbs, str(p), None, c.LIBQBLOCK_O_RDWR) == 0
    assert c.qb_write(broker, qbs, b"z", 1, (5 << 40) + 3) == 1
    buf = bytearray(1)
    assert c.qb_read(broker, qbs, buf, 1, (5 << 40) + 3) == 1 and buf == b"z"
    assert c.qb_check_allocation(broker, qbs, 1 << 40, 5 << 40) == (0, 1, 5 << 40)
    assert c.qb_close(broker, qbs) == 0


# --- names, flags and threads --------------------------------------------------------


def test_format_names_both_ways():
    for f in qb.Format:
        assert c.qb_str2fmttype(c.qb_fmttype2str(f)) is f
    assert c.qb_fmttype2str(c.QB_FMT_QCOW2) == "qcow2" and c.qb_str2fmttype("VMDK") is c.QB_FMT_VMDK
    assert c.qb_str2fmttype("nosuch") is c.QB_FMT_NONE and c.qb_fmttype2str(c.QB_FMT_NONE) == "none"


def test_seed_flag_names():
    assert c.LIBQBLOCK_O_RDWR == 0x0002 and c.LIBQBLOCK_O_SNAPSHOT == 0x0008
    assert c.LIBQBLOCK_O_NOCACHE == 0x0020 and c.LIBQBLOCK_O_CACHE_WB == 0x0040
    assert c.LIBQBLOCK_O_NO_BACKING == 0x0100 and c.LIBQBLOCK_O_NO_FLUSH == 0x0200
    assert c.LIBQBLOCK_O_VALID_MASK == 0x036A


def test_nocache_open_through_capi(opened):
    broker, _, path = opened
    qbs = c.qb_state_new(broker)
    assert c.qb_open(broker, qbs, file_loc(broker, path), None, c.LIBQBLOCK_O_RDWR | c.LIBQBLOCK_O_NOCACHE) == 0
    assert c.qb_write(broker, qbs, b"\x31" * 3, 3, 1001) == 3
    assert c.qb_close(broker, qbs) == 0
    assert path.read_bytes()[1000:1005] == b"\x00\x31\x31\x31\x00"


def test_snapshot_open_through_capi_discards_writes(opened):
    broker, _, path = opened
    before = path.read_bytes()
    qbs = c.qb_state_new(broker)
    flags = c.LIBQBLOCK_O_RDWR | c.LIBQBLOCK_O_SNAPSHOT
    assert c.qb_open(broker, qbs, file_loc(broker, path), None, flags) == 0
    assert c.qb_write(broker, qbs, b"\x77" * 512, 512, 0) == 512
    buf = bytearray(512)
    assert c.qb_read(broker, qbs, buf, 512, 0) == 512 and bytes(buf) == b"\x77" * 512
    assert c.qb_close(broker, qbs) == 0
    assert path.read_bytes() == before


def test_location_info_round_trip():
    for loc in (
        qb.Location.file("/a/b.qcow2"),
        qb.Location.nbd("10.0.0.1", 10810, "disk"),
        qb.Location.rbd("pool", "img", "snap", "/etc/ceph/ceph.conf"),
        qb.Location.http("https://example.invalid/x.qcow2"),
    ):
        assert c.QBlockLocationInfo.from_location(loc).to_location() == loc


def test_brokers_are_independent_across_threads(tmp):
    # One broker per thread, each failing differently: nothing crosses over.
    results = {}

    def worker(i):
        b = c.qb_broker_new()
        qbs = c.qb_state_new(b)
        ret = c.qb_open(b, qbs, str(tmp / f"missing-{i}.raw"), None, 0)
        results[i] = (ret, c.qb_error_get_human_str(b))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (ret, text) in results.items():
        assert ret == c.QB_ERR_INTERNAL_ERR and f"missing-{i}.raw" in text


# --- any sequence of calls: the codes follow the lifetimes, the data the model -------------

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule  # noqa: E402

SIZE = 64 * 1024


class CapiLifetimes(RuleBasedStateMachine):
    """States are opened, closed and deleted in any order on one raw image;
    every call's code is what the lifetime rules say, and reads through any
    open state return the bytes the model holds."""

    states = Bundle("states")

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = str(Path(self.dir.name) / "m.raw")
        qb.create(self.path, qb.RawOptions(SIZE))
        self.broker = c.qb_broker_new()
        self.model = bytearray(SIZE)
        self.status = {}  # id(state) -> "closed" | "open" | "deleted"
        self.broker_deleted = False

    def teardown(self):
        self.dir.cleanup()

    def _expect(self, ret, ok_value, allowed):
        if self.broker_deleted:
            assert ret == c.QB_ERR_INVALID_PARAM
            return False
        if allowed:
            assert ret == ok_value, (ret, self.broker.err_msg)
            return True
        assert ret == c.QB_ERR_INVALID_PARAM and self.broker.err_ret == c.QB_ERR_INVALID_PARAM
        return False

    @rule(target=states)
    def new_state(self):
        s = c.qb_state_new(self.broker)
        if self.broker_deleted:
            assert s is None
            s = c.QBlockState()  # a stray state, never registered
            self.status[id(s)] = "stray"
            return s
        self.status[id(s)] = "closed"
        return s

    @rule(s=states)
    def open(self, s):
        ret = c.qb_open(self.broker, s, self.path, None, c.LIBQBLOCK_O_RDWR)
        if self._expect(ret, 0, self.status[id(s)] in ("closed", "stray")):
            self.status[id(s)] = "open"

    @rule(s=states)
    def close(self, s):
        if self._expect(c.qb_close(self.broker, s), 0, self.status[id(s)] == "open"):
            self.status[id(s)] = "closed"

    @rule(s=states)
    def delete(self, s):
        if self._expect(c.qb_state_delete(self.broker, s), 0, self.status[id(s)] in ("closed", "stray")):
            self.status[id(s)] = "deleted"

    @rule(s=states, off=st.integers(0, SIZE), data=st.binary(min_size=1, max_size=3000))
    def write(self, s, off, data):
        ret = c.qb_write(self.broker, s, data, len(data), off)
        if self.broker_deleted:
            assert ret == c.QB_ERR_INVALID_PARAM
        elif self.status[id(s)] != "open":
            assert ret == c.QB_ERR_INVALID_PARAM
        elif off + len(data) > SIZE:
            assert ret == c.QB_ERR_BLOCK_OUT_OF_RANGE
        else:
            assert ret == len(data)
            self.model[off : off + len(data)] = data

    @rule(s=states, off=st.integers(0, SIZE), n=st.integers(0, 3000))
    def read(self, s, off, n):
        buf = bytearray(n)
        ret = c.qb_read(self.broker, s, buf, n, off)
        if self.broker_deleted or self.status[id(s)] != "open":
            assert ret == c.QB_ERR_INVALID_PARAM
        elif off + n > SIZE:
            assert ret == c.QB_ERR_BLOCK_OUT_OF_RANGE
        else:
            assert ret == n and buf == self.model[off : off + n]

    @rule()
    def delete_broker(self):
        live = [v for v in self.status.values() if v in ("closed", "open")]
        ret = c.qb_broker_delete(self.broker)
        if self._expect(ret, 0, not live):
            self.broker_deleted = True

    @invariant()
    def broker_flag(self):
        assert self.broker.deleted == self.broker_deleted


TestCapiLifetimes = CapiLifetimes.TestCase
TestCapiLifetimes.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_all_lists_the_public_names():
    public = {n for n in vars(c) if n.startswith(("qb_", "QB_", "LIBQBLOCK_", "QBlock")) and n != "QBlockError"}
    assert public == set(c.__all__)
