"""repr() of every public object says what it is.

The public classes are found by walking the package, so a class added
without a sample here fails the coverage test.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any, Callable, Dict, List

import pytest

import libqblock as qb
import libqblock.capi as capi
from libqblock import _native, faults
from libqblock.fileio import ImageStream

DEFAULT_REPR = re.compile(r"^<[\w.]+ object at 0x[0-9a-f]+>$")
#: A nested default repr: an object, function or method shown as its address.
ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")


def _public_classes() -> Dict[str, type]:
    found: Dict[str, type] = {}
    names = ["libqblock"] + [f"libqblock.{m.name}" for m in pkgutil.walk_packages(qb.__path__) if m.name != "__main__"]
    for name in names:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not inspect.isclass(obj) or not obj.__module__.startswith("libqblock"):
                continue
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Dict[type, List[Any]]:
    """At least one live object of every public class, made by the real calls."""
    import libqblock.testing as qbt

    d = tmp_path_factory.mktemp("repr")
    base, top = d / "base.qcow2", d / "top.qcow2"
    qb.create(base, qb.Qcow2Options(virt_size=1 << 20))
    qb.create(top, qb.Qcow2Options(virt_size=1 << 20, backing=str(base.name)))
    img = qb.open(top, flags=qb.O_RDWR)
    img.write(b"x" * 512, 0)
    snap = img.snapshot_create("before")
    ro = qb.open(base, flags=0)
    closed = qb.open(base, flags=0)
    closed.close()
    stream = ro.stream()

    broker = capi.qb_broker_new()
    state = capi.qb_state_new(broker)
    loc = capi.qb_loc_info_new(broker)
    assert state is not None and loc is not None
    loc.prot_type, loc.filename = capi.QB_PROT_FILE, str(base)
    assert capi.qb_open(broker, state, loc, None, 0) == 0
    rc, static = capi.qb_info_image_static_get(broker, state)
    fmt = capi.qb_fmt_info_new(broker)
    empty_state = capi.qb_state_new(broker)

    plan = faults.arm(d / "faulty", "count")
    faults.disarm(plan)

    generated = qbt.build_image(qbt.Plan(qb.Qcow2Options(virt_size=1 << 20), writes=((0, b"y" * 4096),)))
    mutation = qbt.all_mutations(generated)[0]
    chain = qbt.build_chain([qbt.Plan(qb.RawOptions(virt_size=1 << 20))])

    out: Dict[type, List[Any]] = {
        qb.Image: [img, ro, closed],
        _native.Image: [img._n, closed._n],
        ImageStream: [stream],
        qb.StaticInfo: [img.info()],
        qb.BlockStatus: [img.block_status(0, 1 << 20)],
        qb.Location: [qb.Location.file(base), qb.Location.nbd("host", 10809, "disk")],
        qb.Format: list(qb.Format),
        qb.OpenFlag: [qb.OpenFlag.RDWR, qb.OpenFlag.RDWR | qb.OpenFlag.SNAPSHOT],
        qb.Broker: [qb.Broker(), broker],
        type(snap): [snap],
        type(qb.compare(base, base)): [qb.compare(base, top, force_share=True)],
        type(qb.check(base)): [qb.check(base)],
        type(qb.measure(qb.Qcow2Options, size=1 << 30)): [qb.measure(qb.Qcow2Options, size=1 << 30)],
        type(qb.inspect(top)): [qb.inspect(top)],
        type(qb.inspect(top).references[0]): list(qb.inspect(top).references),
        capi.QBlockState: [state, empty_state],
        capi.QBlockLocationInfo: [loc],
        capi.QBlockFormatInfo: [fmt],
        capi.QBlockFmtOptionsUN: [fmt.o_fmt],
        capi.QBlockStaticInfo: [static],
        faults.FaultPlan: [plan],
        qbt.Configuration: list(qbt.CONFIGURATIONS.values())[:3],
        qbt.Plan: [qbt.Plan(qb.RawOptions(virt_size=512))],
        qbt.GeneratedImage: [generated],
        qbt.GeneratedChain: [chain],
        qbt.Field: qbt.candidate_fields(generated)[:5],
        qbt.Mutation: [mutation],
        qbt.MutatedImage: [qbt.MutatedImage(generated, mutation)],
    }
    for cls in _public_classes().values():
        if issubclass(cls, qb.QBlockError):
            out[cls] = [cls("the message", 5)]
        elif issubclass(cls, qb.ImageOptions):
            out[cls] = [cls(virt_size=1 << 20)] if cls is not qb.ImageOptions else [qb.RawOptions(virt_size=512)]
    yield out
    stream.close()
    capi.qb_close(broker, state)
    img.close()
    ro.close()


def test_every_public_class_has_a_sample(samples: Dict[type, List[Any]]) -> None:
    missing = sorted(name for name, cls in _public_classes().items() if cls not in samples)
    assert not missing, f"public classes without a repr sample: {missing}"


def _samples(samples: Dict[type, List[Any]]) -> List[Any]:
    return [obj for objs in samples.values() for obj in objs]


def test_no_repr_is_the_default_and_each_names_its_class(samples: Dict[type, List[Any]]) -> None:
    for cls, objs in samples.items():
        assert objs, cls
        for obj in objs:
            text = repr(obj)
            assert not DEFAULT_REPR.match(text), text
            assert type(obj).__name__ in text, (type(obj), text)
            # Nothing nested prints as a bare address either (a function, a native object).
            assert not ADDRESS.search(text), text
            assert len(text) < 4000, (cls, len(text))


def test_an_image_repr_says_where_what_how_big_and_how_open(samples: Dict[type, List[Any]]) -> None:
    img, ro, closed = samples[qb.Image]
    assert repr(img) == f"<libqblock.Image {img.location} qcow2 1048576 bytes read-write>"
    assert repr(ro).endswith("qcow2 1048576 bytes read-only>")
    assert repr(closed).endswith(" closed>")
    native = repr(img._n)
    assert native.startswith("<libqblock._native.Image qcow2 ") and native.endswith("top.qcow2 1048576 bytes read-write>")
    assert repr(closed._n) == "<libqblock._native.Image closed>"


def test_the_big_payloads_stay_out_of_the_reprs(samples: Dict[type, List[Any]]) -> None:
    import libqblock.testing as qbt

    (generated,) = samples[qbt.GeneratedImage]
    assert len(generated.data) > 4000 and "bytes" in repr(generated)
    state = samples[capi.QBlockState][0]
    assert "open <libqblock.Image" in repr(state)


def test_value_reprs_round_trip(samples: Dict[type, List[Any]]) -> None:
    loc = samples[qb.Location][0]
    assert loc.target in repr(loc) and eval(repr(loc), {"Location": qb.Location}) == loc
    err = samples[qb.CorruptImageError][0]
    assert repr(err) == "CorruptImageError('the message', errno=5)"
