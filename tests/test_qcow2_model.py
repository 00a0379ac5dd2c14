"""Random write / write_zeroes / discard / flush / reopen sequences through libqblock on
qcow2 images we create, against a bytearray model; then `qemu-img check`
must be clean and `qemu-img compare` must find the image identical to the
model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from conftest import qemu_check, qemu_img, qemu_io

KiB, MiB = 1024, 1024 * 1024
SIZE = 3 * MiB + 512

CONFIGS = {
    "default": dict(),
    "c512-rc64": dict(cluster_size=512, refcount_bits=64),  # refcount table relocations
    "c512-rc1": dict(cluster_size=512, refcount_bits=1),
    "c4k-rc2": dict(cluster_size=4096, refcount_bits=2),
    "v2": dict(compat="0.10", cluster_size=4096),
    "extl2": dict(extended_l2=True, cluster_size=16 * KiB),
    "lazy-zstd-rc8": dict(lazy_refcounts=True, compression_type="zstd", refcount_bits=8),
    "prealloc-metadata": dict(preallocation="metadata", cluster_size=8192),
    "backing": dict(cluster_size=4096),
    "backing-extl2": dict(cluster_size=32 * KiB, extended_l2=True),
    "data-file": dict(cluster_size=4096),
    "data-file-raw": dict(cluster_size=4096),
}

offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.sampled_from([0, 511, 512, 4095, 4096, 65535, 65536, MiB - 1, 2 * MiB + 1, SIZE - 1]),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 150 * KiB), st.integers(1, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 300 * KiB), st.just(0)),
        st.tuples(st.just("discard"), offsets, st.integers(1, 300 * KiB), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


def make_image(d: Path, name: str):
    opts = dict(CONFIGS[name])
    model = bytearray(SIZE)
    p = d / "img.qcow2"
    if name.startswith("backing"):
        base = d / "base.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(base), str(SIZE - 4096))
        qemu_io(str(base), "write -P 0xba 0 1M", "write -P 0xbb 2M 512k")
        model[0:MiB] = b"\xba" * MiB
        model[2 * MiB : 2 * MiB + 512 * KiB] = b"\xbb" * (512 * KiB)
        opts.update(backing=str(base), backing_fmt=qb.Format.QCOW2)
    if name.startswith("data-file"):
        opts.update(data_file=str(d / "img.data"), data_file_raw=name.endswith("raw"))
    qb.create(p, qb.Qcow2Options(SIZE, **opts))
    return p, model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_ops_against_model(name):
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            d = Path(td)
            p, model = make_image(d, name)
            img = qb.open(p)
            try:
                for op, off, n, v in seq:
                    n = min(n, SIZE - off)
                    if op == "write":
                        img.write(bytes([v]) * n, off)
                        model[off : off + n] = bytes([v]) * n
                    elif op == "zero":
                        img.write_zeroes(off, n)
                        model[off : off + n] = bytes(n)
                    elif op == "discard":
                        # Whole clusters inside the range read as zeroes
                        # afterwards (v3 zero flag over a backing file).
                        img.discard(off, n)
                        cs = CONFIGS[name].get("cluster_size", 65536)
                        a, b = -(-off // cs) * cs, (off + n) // cs * cs
                        if a < b:
                            model[a:b] = bytes(b - a)
                    elif op == "flush":
                        img.flush()
                    else:
                        img.close()
                        img = qb.open(p)
                assert img.read(SIZE, 0) == bytes(model)
            finally:
                if not img.closed:
                    img.close()
            r = qemu_check(str(p))
            assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r
            raw = d / "model.raw"
            raw.write_bytes(bytes(model))
            c = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(p), str(raw), check=False)
            assert c.returncode == 0, c.stdout + c.stderr

    run()


# --- the other way: QEMU writes at random, we read and map --------------------

QEMU_CONFIGS = {
    "c4k": ("cluster_size=4096", False),
    "extl2-backing": ("cluster_size=32k,extended_l2=on", True),
    "c512-backing": ("cluster_size=512", True),
    "v2-backing": ("compat=0.10,cluster_size=8192", True),
}
QSIZE = 2 * MiB

qemu_ops = st.lists(
    st.tuples(
        st.sampled_from(["write -P {v}", "write -z", "write -z -u", "discard"]),
        st.integers(0, QSIZE - 1),
        st.integers(1, 200 * KiB),
        st.integers(1, 255),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.parametrize("name", sorted(QEMU_CONFIGS))
def test_random_qemu_writes_read_and_map_like_qemu(name):
    from conftest import qemu_map, qemu_raw_bytes

    from test_qcow2 import strip

    opts, backing = QEMU_CONFIGS[name]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(qemu_ops)
    def run(seq):
        with tempfile.TemporaryDirectory() as td:
            d = Path(td)
            p = d / "img.qcow2"
            args = ["create", "-f", "qcow2", "-o", opts]
            if backing:
                base = d / "base.raw"
                base.write_bytes(b"\x5b" * (QSIZE - 3 * 512))
                args += ["-b", str(base), "-F", "raw"]
            qemu_img(*args, str(p), str(QSIZE))
            cmds = []
            for op, off, n, v in seq:
                off &= ~511  # qemu-io zero/discard want sector alignment
                n = max(512, min(n & ~511, QSIZE - off))
                cmds.append(f"{op.format(v=v)} {off} {n}")
            qemu_io(str(p), *cmds)
            expected = qemu_raw_bytes(str(p), d)
            with qb.open(p, flags=0) as img:
                assert img.read(QSIZE, 0) == expected
                assert strip([e.to_qemu_map() for e in img.map()]) == strip(qemu_map(str(p)))

    run()
