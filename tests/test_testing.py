"""libqblock.testing: the generated images are valid (qemu-img checks them and
reads them as their content model says), chains read through, mutations change
exactly the field they name, and libqblock meets every mutation with a
QBlockError or a result, never another exception or a crash.

The budget comes from the environment: ``QBLOCK_TESTING_EXAMPLES`` (images
per configuration, default 4; mutations and chains scale with it). A longer
run: ``QBLOCK_TESTING_EXAMPLES=200 pytest tests/test_testing.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb
import reliability
import libqblock.testing as qbt

from conftest import qemu_img, qemu_info

KiB, MiB = 1024, 1024 * 1024
EXAMPLES = int(os.environ.get("QBLOCK_TESTING_EXAMPLES", "4"))
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
RUNNER = Path(__file__).resolve().parent / "mutant_runner.py"
CONFIGS = sorted(qbt.CONFIGURATIONS)


def _qemu_reads(path: Path, fmt: str, tmp: Path, *extra: str) -> bytes:
    out = tmp / "oracle.raw"
    qemu_img("convert", "-f", fmt, *extra, "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _assert_valid(img: qbt.GeneratedImage, path: Path, tmp: Path) -> None:
    """qemu-img agrees with the model (libqblock where qemu-img cannot read)."""
    fmt = img.format
    if fmt in qbt.QEMU_READS:
        info = qemu_info(str(path), "-f", fmt)
        assert info["format"] == fmt
        # QEMU rounds a raw file's size up to whole sectors (and reads zeroes there).
        pad = bytes(-img.virt_size % 512) if fmt == "raw" else b""
        assert info["virtual-size"] == img.virt_size + len(pad), (info, img)
        assert _qemu_reads(path, fmt, tmp) == img.content + pad, img
        if fmt == "raw":
            assert img.data == img.content
        if img.backing is not None:
            assert info["backing-filename"] == img.backing  # relative, as generated
    else:
        # QEMU dropped cow: a fresh read-only open by libqblock is the check.
        with qb.open(str(path), fmt, 0) as opened:
            assert opened.virt_size == img.virt_size
            assert opened.read(img.virt_size, 0) == img.content
    if fmt in qbt.QEMU_CHECKS:
        r = qemu_img("check", "--output=json", "-f", fmt, str(path), check=False)
        assert r.returncode == 0, (r.stdout, r.stderr, img)
        report = json.loads(r.stdout)
        assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
        if "compressed" in img.features:
            assert report.get("compressed-clusters", 0) > 0, report


@pytest.mark.parametrize("name", CONFIGS)
def test_generated_images_are_valid(name: str, tmp_path: Path) -> None:
    cfg = qbt.CONFIGURATIONS[name]
    seen: List[qbt.GeneratedImage] = []

    @settings(max_examples=EXAMPLES, **SETTINGS)
    @given(qbt.images(name, max_size=3 * MiB))
    def run(img: qbt.GeneratedImage) -> None:
        assert img.format == cfg.format
        assert isinstance(img.options, qb.options_class(cfg.format))
        for key, want in cfg.fixed.items():
            if key in ("compress", "snapshots"):
                assert ("compressed" if key == "compress" else "snapshots") in img.features
            else:
                assert getattr(img.options, key) == want
        path = img.write_to(tmp_path)
        try:
            _assert_valid(img, path, tmp_path)
            for sname, content in img.snapshots:
                assert _qemu_reads(path, "qcow2", tmp_path, "-l", f"snapshot.name={sname}") == content
        finally:
            path.unlink()
        seen.append(img)

    run()
    assert seen


def test_images_honour_sizes_and_formats() -> None:
    got: List[qbt.GeneratedImage] = []

    @settings(max_examples=3 * EXAMPLES, **SETTINGS)
    @given(qbt.images([qb.Format.QCOW2, "vmdk-stream", "raw"], min_size=64 * KiB, max_size=256 * KiB))
    def run(img: qbt.GeneratedImage) -> None:
        assert img.format in ("qcow2", "vmdk", "raw")
        assert 64 * KiB <= img.virt_size <= 256 * KiB
        if img.format == "vmdk":
            assert img.options.subformat == "streamOptimized"  # type: ignore[attr-defined]
        got.append(img)

    run()
    assert got


def test_bad_arguments_are_invalid_param_errors() -> None:
    with pytest.raises(qb.InvalidParamError, match="cannot generate 'luks'"):
        qbt.images("luks")
    with pytest.raises(qb.InvalidParamError, match="min_size"):
        qbt.images(max_size=100)
    with pytest.raises(qb.InvalidParamError, match="no backing file"):
        qbt.chains("vpc")
    with pytest.raises(qb.InvalidParamError, match="min_depth"):
        qbt.chains(min_depth=3, max_depth=2)


@pytest.mark.parametrize("top", sorted(qbt.BACKING_FORMATS))
def test_chains_read_through(top: str, tmp_path: Path) -> None:
    depths = set()

    @settings(max_examples=EXAMPLES, **SETTINGS)
    @given(qbt.chains(top, max_size=MiB))
    def run(chain: qbt.GeneratedChain) -> None:
        folder = tmp_path / "chain"
        folder.mkdir()
        try:
            path = chain.write_to(folder)
            assert chain.top.format == top and chain.layers[0].backing is None
            for below, above in zip(chain.layers, chain.layers[1:]):
                assert above.backing == below.name  # relative: the chain moved and still works
            # Every layer, not only the top, reads as its model.
            for layer in chain.layers:
                _assert_valid(layer, folder / layer.name, tmp_path)
            with qb.open(str(path), top, 0) as img:
                assert img.read(img.virt_size, 0) == chain.content
            depths.add(len(chain.layers))
        finally:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()

    run()
    assert depths and min(depths) >= 2


@settings(max_examples=15 * EXAMPLES, **SETTINGS)
@given(qbt.mutated_images(max_size=MiB))
def test_mutations_change_the_field_they_name(m: qbt.MutatedImage) -> None:
    before, after, mut = m.original.data, m.data, m.mutation
    assert len(after) == len(before)
    assert mut.old != mut.new and mut.description
    assert after != before
    spans = [(o, mut.width) for o in mut.offsets] + list(mut.fixups)
    for o in mut.offsets:
        assert int.from_bytes(before[o : o + mut.width], mut.byteorder) == mut.old, mut
        assert int.from_bytes(after[o : o + mut.width], mut.byteorder) == mut.new, mut
    # Nothing else moved: put the old bytes back in the field and the
    # recomputed checksums, and the image is the original again.
    restored = bytearray(after)
    for o, n in spans:
        restored[o : o + n] = before[o : o + n]
    assert restored == before, mut


def test_checksums_are_recomputed() -> None:
    """A VHD footer and a VHDX header stay sound after a mutation (so the parser
    gets past them), checked against the specs' algorithms written out here."""
    vpc = qbt.build_image(qbt.Plan(qb.VpcOptions(3 * MiB, force_size=True), ((0, b"x" * 4096),)))
    f = next(x for x in qbt.candidate_fields(vpc) if x.name == "footer.disk_type")
    data = qbt.mutate_field(vpc, f, 4, "differencing").data  # type: ignore[union-attr]
    for start in (0, len(data) - 512):
        footer = bytearray(data[start : start + 512])
        stored = int.from_bytes(footer[64:68], "big")
        footer[64:68] = bytes(4)
        assert stored == ~sum(footer) & 0xFFFFFFFF
        assert int.from_bytes(data[start + 60 : start + 64], "big") == 4
    assert qbt.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    vhdx = qbt.build_image(qbt.Plan(qb.VhdxOptions(MiB, block_size=MiB)))
    for name, value, length in (("header.log_length", 4096, 4096), ("region_table.entry_count", 0, 65536)):
        f = next(x for x in qbt.candidate_fields(vhdx) if x.name == name)
        m = qbt.mutate_field(vhdx, f, value, "test")
        assert m is not None and m.fixups
        for at, _ in m.fixups:
            block = bytearray(m.data[at - 4 : at - 4 + length])
            stored = int.from_bytes(block[4:8], "little")
            block[4:8] = bytes(4)
            assert stored == _crc32c_bitwise(bytes(block)), name


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C bit by bit, straight from its definition (slow, independent)."""
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def _run_mutants(manifest: tuple, tmp: Path, timeout: float = 240) -> List[Dict[str, str]]:
    """Run the mutants in a child process; a crash, a hang or an exception
    that is not a QBlockError fails the test, naming the mutation."""
    mf = tmp / "manifest.pkl"
    mf.write_bytes(pickle.dumps(manifest))
    try:
        r = subprocess.run([sys.executable, str(RUNNER), str(mf)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        lines = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"libqblock hung on a mutant; last lines: {lines.splitlines()[-2:]}")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    last = rows[-1] if rows else {}
    assert r.returncode == 0, f"exit {r.returncode} on {last}: {r.stderr[-2000:]}"
    done = [x for x in rows if "done" in x]
    assert len(done) * 2 == len(rows), "a mutant started and never finished"
    return done


def test_mutated_images_never_crash_libqblock(tmp_path: Path) -> None:
    """A Hypothesis sample of mutants of every configuration, run in one child process."""
    originals: List[bytes] = []
    mutants: List[Tuple[int, str, str, List[Tuple[int, bytes]]]] = []
    for name in CONFIGS:

        @settings(max_examples=2 * EXAMPLES, **SETTINGS)
        @given(qbt.images(name, max_size=MiB).flatmap(
            lambda i: st.tuples(st.just(i), st.lists(qbt.mutations(i), min_size=1, max_size=3))))
        def collect(drawn: Tuple[qbt.GeneratedImage, List[qbt.Mutation]]) -> None:
            img, muts = drawn
            originals.append(img.data)
            for m in muts:
                spans = [(o, m.width) for o in m.offsets] + list(m.fixups)
                patches = [(o, m.data[o : o + n]) for o, n in spans]
                mutants.append((len(originals) - 1, img.format, m.description, patches))

        collect()
    done = _run_mutants(("patches", str(tmp_path), originals, mutants), tmp_path)
    assert len(done) == len(mutants)
    assert {d["done"].split()[0] for d in done} == {c.format for c in qbt.CONFIGURATIONS.values()}


def _image(name: str) -> qbt.GeneratedImage:
    """One small image per configuration with tables to point elsewhere:
    data at the start, in the middle and at the end."""
    pat = bytes(range(256)) * 256  # 64 KiB, compressible
    size = 3 * MiB if name.startswith("vpc") else MiB + 64 * KiB
    opts = {
        "raw": qb.RawOptions(size), "qcow2": qb.Qcow2Options(size, cluster_size=4096),
        "qcow2-v2": qb.Qcow2Options(size, compat="0.10"), "qcow2-compressed": qb.Qcow2Options(size),
        "qcow2-snapshots": qb.Qcow2Options(size), "qcow2-extl2": qb.Qcow2Options(size, extended_l2=True),
        "qcow": qb.QcowOptions(size), "qed": qb.QedOptions(size, cluster_size=4096), "cow": qb.CowOptions(size),
        "vdi": qb.VdiOptions(size), "vdi-static": qb.VdiOptions(size, static=True), "vmdk": qb.VmdkOptions(size),
        "vmdk-stream": qb.VmdkOptions(size, subformat="streamOptimized"), "vpc": qb.VpcOptions(size, force_size=True),
        "vpc-fixed": qb.VpcOptions(size, subformat="fixed", force_size=True),
        "vhdx": qb.VhdxOptions(size, block_size=MiB),
        "vhdx-fixed": qb.VhdxOptions(size, subformat="fixed", block_size=MiB),
        "parallels": qb.ParallelsOptions(size, cluster_size=64 * KiB),
    }[name]
    writes = ((0, pat), (MiB, pat[: 64 * KiB]), (size - 512, b"\xee" * 512))
    if name == "vmdk-stream":
        writes = ((0, pat), (MiB, pat[: size - MiB]))
    if name == "qcow2-compressed":
        return qbt.build_image(qbt.Plan(opts, writes[2:], compressed_writes=writes[:2]))
    return qbt.build_image(qbt.Plan(opts, writes, snapshot_after=(1,) if name == "qcow2-snapshots" else ()))


#: Fields that, pointed past the end of the file, libqblock must call a
#: CorruptImageError (at open, info, read or check). A qcow2 data cluster
#: (``l2[0][0]``) past the end is not one: it reads as zeroes, as in QEMU.
PAST_EOF_IS_CORRUPT = {
    "qcow2": ["header.l1_table_offset", "header.refcount_table_offset", "l1[0]"],
    "qcow2-v2": ["header.l1_table_offset", "l1[0]"],
    "qcow2-compressed": ["header.l1_table_offset", "l2[0][0] (compressed)"],
    "qcow2-snapshots": ["header.snapshots_offset", "snapshot[0].l1_table_offset"],
    "qcow2-extl2": ["l1[0]"],
    "qcow": ["header.l1_table_offset", "l1[0]", "l2[0][0]"],
    "qed": ["header.l1_table_offset", "l1[0]", "l2[0][0]"],
    "vdi": ["header.offset_bmap", "bmap[0]"],
    "vdi-static": ["header.offset_bmap", "bmap[0]"],
    "vmdk": ["header.gd_offset", "gd[0]", "gt[0][0]"],
    "vmdk-stream": ["header.gd_offset", "gt[0][0]"],
    "vpc": ["footer.data_offset", "dyn.table_offset", "bat[0]"],
    "vhdx": ["region_table.bat.file_offset", "region_table.metadata.file_offset", "bat[0]"],
    "vhdx-fixed": ["region_table.bat.file_offset", "bat[0]"],
    "parallels": ["header.data_off", "bat[0]"],
}


_Q2_HUGE = ["header.size", "header.l1_size", "header.cluster_bits", "header.refcount_table_clusters"]
_VDI_HUGE = ["header.disk_size", "header.blocks_in_image", "header.block_size"]
_VMDK_HUGE = ["header.capacity", "header.grain_size", "header.num_gtes_per_gt"]
_VHDX_HUGE = ["region_table.entry_count", "metadata.entry_count"]
#: Sizes and counts that, pushed to the field's largest value, libqblock must
#: call a CorruptImageError.
HUGE_IS_CORRUPT = {
    "qcow2": _Q2_HUGE, "qcow2-v2": _Q2_HUGE, "qcow2-compressed": _Q2_HUGE, "qcow2-snapshots": _Q2_HUGE,
    "qcow2-extl2": _Q2_HUGE,
    "qcow": ["header.size", "header.cluster_bits"],
    "qed": ["header.image_size", "header.table_size", "header.cluster_size"],
    "cow": ["header.size"],
    "vdi": _VDI_HUGE, "vdi-static": _VDI_HUGE,
    "vmdk": _VMDK_HUGE, "vmdk-stream": _VMDK_HUGE,
    "vpc": ["footer.current_size", "dyn.max_table_entries"], "vpc-fixed": ["footer.current_size"],
    "vhdx": _VHDX_HUGE, "vhdx-fixed": _VHDX_HUGE,
    "parallels": ["header.bat_entries", "header.nb_sectors"],
}


def test_every_structured_mutation(tmp_path: Path) -> None:
    """Every field value the locators offer, on one image per configuration
    (one child process for all): a QBlockError or a result, never anything
    else; the named past-EOF and huge cases are CorruptImageError."""
    images = {name: _image(name) for name in CONFIGS}
    for name, img in images.items():
        fields = {f.name for f in qbt.candidate_fields(img)}
        if name == "raw":
            assert not fields  # raw has no metadata: byte flips only
        for want in PAST_EOF_IS_CORRUPT.get(name, []) + HUGE_IS_CORRUPT.get(name, []):
            assert want in fields, (name, want, sorted(fields))
    done = _run_mutants(("all", str(tmp_path), list(images.values())), tmp_path)
    assert len(done) == sum(len(f.values) for img in images.values() for f in qbt.candidate_fields(img))
    reliability.count("hostile: structured mutations of every format opened, read and checked", len(done))
    reliability.count("hostile: structured mutations refused with a clear error (the rest read)",
                      sum(1 for d in done if d["outcome"] != "ok"))
    at = 0
    for name, img in images.items():
        n = sum(len(f.values) for f in qbt.candidate_fields(img))
        mine, at = done[at : at + n], at + n
        cases = [(f, qbt.PAST_EOF) for f in PAST_EOF_IS_CORRUPT.get(name, [])]
        cases += [(f, qbt.HUGE) for f in HUGE_IS_CORRUPT.get(name, [])]
        for want, label in cases:
            hits = [d for d in mine if d["field"] == want and d["label"] == label]
            assert hits, (name, want, label)
            for d in hits:
                assert d["outcome"] == "CorruptImageError", (name, d)


def test_readme_example_runs(tmp_path: Path) -> None:
    """The README's example, as a script (Hypothesis refuses to run a test
    function from inside another test, so in a child process)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### libqblock for fuzzers") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("\n```", start)]
    assert "qbt.images(" in code and "qbt.mutated_images(" in code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_without_hypothesis() -> None:
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "import libqblock\n"
        "try:\n"
        "    import libqblock.testing\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install libqblock[testing]" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, libqblock; print('hypothesis' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
