"""Hypothesis strategies: valid images of every writable format, backing chains,
and structured mutations of them.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ..errors import InvalidParamError
from ..formats import Format
from ..image import create
from ..image import open as open_image
from ..options import (
    CowOptions,
    ImageOptions,
    ParallelsOptions,
    Qcow2Options,
    QcowOptions,
    QedOptions,
    RawOptions,
    VdiOptions,
    VhdxOptions,
    VmdkOptions,
    VpcOptions,
)
from ._model import (
    BACKING_FORMATS,
    CONFIGURATIONS,
    Configuration,
    GeneratedChain,
    GeneratedImage,
    Plan,
    Write,
    build_chain,
    build_image,
    file_name,
)
from ._mutate import Mutation, MutatedImage, candidate_fields, flip_mutation, mutate_field

KiB, MiB = 1024, 1024 * 1024
#: The grain of every vmdk libqblock creates.
VMDK_GRAIN = 64 * KiB

FormatSpec = Union[str, Format]


def _configs(formats: Optional[Union[FormatSpec, Iterable[FormatSpec]]]) -> List[Configuration]:
    """Resolve format names, ``Format`` members and configuration names."""
    if formats is None:
        return list(CONFIGURATIONS.values())
    if isinstance(formats, (str, Format)):
        formats = [formats]
    out: List[Configuration] = []
    for f in formats:
        name = str(f)
        if name in CONFIGURATIONS and CONFIGURATIONS[name].fixed:
            out.append(CONFIGURATIONS[name])
        elif any(c.format == name for c in CONFIGURATIONS.values()):
            # A plain format name: its default configuration, the others'
            # options are drawn too (subformats, compression, snapshots).
            out.append(Configuration(name, name))
        else:
            known = sorted(set(CONFIGURATIONS) | {c.format for c in CONFIGURATIONS.values()})
            raise InvalidParamError(
                f"libqblock.testing cannot generate {name!r} images; choose from {', '.join(known)}")
    return out


def _pick(draw: st.DrawFn, fixed: Dict[str, object], key: str, strategy: st.SearchStrategy) -> object:
    return fixed[key] if key in fixed else draw(strategy)


def _options(draw: st.DrawFn, cfg: Configuration, size: int, overlay: bool) -> Tuple[ImageOptions, Dict[str, bool]]:
    """Draw an options object for ``cfg`` of ``size`` bytes, plus the qcow2 extras
    (compress, snapshots) the plan should use."""
    fx, fmt = cfg.fixed, cfg.format
    extras = {"compress": False, "snapshots": False}
    if fmt == "raw":
        return RawOptions(size, preallocation=draw(st.sampled_from(["off", "off", "falloc", "full"]))), extras
    if fmt == "qcow2":
        compat = _pick(draw, fx, "compat", st.sampled_from(["1.1", "1.1", "0.10"]))
        compress = bool(_pick(draw, fx, "compress", st.booleans())) and not overlay
        snapshots = bool(_pick(draw, fx, "snapshots", st.booleans()))
        ext = bool(_pick(draw, fx, "extended_l2", st.booleans())) and compat == "1.1"
        clusters = [16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB] if ext else [512, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB]
        if compress or snapshots or overlay:
            # libqblock places compressed clusters and snapshots far out in
            # the file with tiny clusters (megabytes for a 512-byte disk),
            # and an overlay's header and backing names need room.
            clusters = [c for c in clusters if c >= 4 * KiB]
        kw: Dict[str, object] = {"cluster_size": draw(st.sampled_from(clusters)), "compat": compat,
                                 "extended_l2": ext}
        if compat == "1.1":
            kw["lazy_refcounts"] = draw(st.booleans())
            # A snapshot shares every table: 1- and 2-bit refcounts may not count that.
            kw["refcount_bits"] = draw(st.sampled_from([4, 8, 16, 16, 32, 64] if snapshots else
                                                       [1, 2, 4, 8, 16, 16, 32, 64]))
            kw["compression_type"] = draw(st.sampled_from(["zlib", "zstd"]))
        if not compress and (not overlay or ext):
            kw["preallocation"] = draw(st.sampled_from(["off", "off", "metadata", "falloc", "full"]))
        extras.update(compress=compress, snapshots=snapshots)
        return Qcow2Options(size, **kw), extras  # type: ignore[arg-type]
    if fmt == "qcow":
        return QcowOptions(size), extras
    if fmt == "qed":
        return QedOptions(size, cluster_size=draw(st.sampled_from([4 * KiB, 8 * KiB, 64 * KiB])),
                          # QEMU 10 cannot open a qed of 1-cluster tables, even its own.
                          table_size=draw(st.sampled_from([2, 4, 16]))), extras
    if fmt == "cow":
        return CowOptions(size), extras
    if fmt == "vdi":
        return VdiOptions(size, static=bool(_pick(draw, fx, "static", st.booleans()))), extras
    if fmt == "vmdk":
        sub = "monolithicSparse" if overlay else _pick(draw, fx, "subformat",
                                                       st.sampled_from(["monolithicSparse", "streamOptimized"]))
        compat6 = draw(st.booleans())
        return VmdkOptions(size, subformat=str(sub), compat6=compat6,
                           adapter_type=draw(st.sampled_from(["ide", "lsilogic", "buslogic", "legacyESX"])),
                           zeroed_grain=draw(st.booleans()),
                           hwversion=None if compat6 else draw(st.sampled_from([None, "4", "7"]))), extras
    if fmt == "vpc":
        sub = _pick(draw, fx, "subformat", st.sampled_from(["dynamic", "fixed"]))
        return VpcOptions(size, subformat=str(sub), force_size=draw(st.booleans())), extras
    if fmt == "vhdx":
        sub = _pick(draw, fx, "subformat", st.sampled_from(["dynamic", "fixed"]))
        # A fixed image holds whole blocks, and block_size 0 picks 32 MiB ones.
        blocks = [1 * MiB, 2 * MiB] if sub == "fixed" else [0, 1 * MiB, 2 * MiB, 8 * MiB]
        return VhdxOptions(size, subformat=str(sub), block_size=draw(st.sampled_from(blocks)),
                           block_state_zero=draw(st.booleans())), extras
    if fmt == "parallels":
        return ParallelsOptions(size, cluster_size=draw(st.sampled_from([4 * KiB, 64 * KiB, 1 * MiB]))), extras
    raise ValueError(f"no options strategy for {fmt}")  # pragma: no cover - _configs refuses it first


def _unit(opts: ImageOptions) -> int:
    """The allocation unit writes are biased to."""
    fmt = str(opts.format)
    if fmt == "vmdk":
        return VMDK_GRAIN
    if fmt in ("vdi",):
        return MiB
    if fmt == "vpc":
        return 2 * MiB
    if fmt == "vhdx":
        return opts.block_size or MiB  # type: ignore[attr-defined]
    if fmt == "qcow":
        return 4 * KiB
    if fmt == "cow":
        return 512
    return int(getattr(opts, "cluster_size", 4 * KiB))


def _payload(draw: st.DrawFn, n: int) -> bytes:
    """``n`` bytes of one of a few shapes: a fill byte, a short repeated pattern
    (compressible), random bytes, zeroes."""
    kind = draw(st.sampled_from(["fill", "pattern", "random", "zeroes"]))
    if kind == "zeroes":
        return bytes(n)
    if kind == "fill":
        return bytes([draw(st.integers(1, 255))]) * n
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        return rng.randbytes(n)
    pat = rng.randbytes(rng.randint(1, 64))
    return (pat * (n // len(pat) + 1))[:n]


def _writes(draw: st.DrawFn, size: int, unit: int, max_writes: int) -> List[Write]:
    """Guest writes inside ``size``, offsets and lengths biased to unit boundaries."""
    out: List[Write] = []
    for _ in range(draw(st.integers(0, max_writes))):
        units = max(1, (size - 1) // unit + 1)
        off = draw(st.one_of(st.integers(0, size - 1), st.integers(0, units - 1).map(lambda k: k * unit)))
        off = min(off, size - 1)
        room = size - off
        n = draw(st.one_of(st.integers(1, min(room, 3 * unit, 256 * KiB)),
                           st.sampled_from([1, 512, unit, 2 * unit]).map(lambda x: min(x, room))))
        out.append((off, _payload(draw, n)))
    return out


def _grain_writes(draw: st.DrawFn, size: int, max_writes: int) -> List[Write]:
    """streamOptimized vmdk: whole grains only (the last may be short), each once."""
    grains = (size + VMDK_GRAIN - 1) // VMDK_GRAIN
    picked = draw(st.lists(st.integers(0, grains - 1), unique=True, max_size=min(max_writes, grains)))
    return [(g * VMDK_GRAIN, _payload(draw, min(VMDK_GRAIN, size - g * VMDK_GRAIN))) for g in picked]


def _size(draw: st.DrawFn, min_size: int, max_size: int, fmt: str) -> int:
    align = 1 if fmt == "raw" else 512
    lo = max(align, -(-min_size // align) * align)
    hi = max(lo, max_size // align * align)
    return draw(st.integers(lo // align, hi // align)) * align


def _vpc_size(opts: ImageOptions) -> int:
    """The size a vpc image really gets (CHS rounding without force_size):
    create one and ask, rather than repeat the driver's rule here."""
    with tempfile.TemporaryDirectory(prefix="qb-testing-") as d:
        p = Path(d) / "probe.vhd"
        create(str(p), opts)
        with open_image(str(p), "vpc", 0) as img:
            return img.virt_size


def _plan(draw: st.DrawFn, cfg: Configuration, size: int, max_writes: int, overlay: bool,
          name: str = "", backing: Optional[Tuple[str, str]] = None) -> Plan:
    opts, extras = _options(draw, cfg, size, overlay)
    if backing is not None:
        bname, bfmt = backing
        kw: Dict[str, object] = {"backing": bname}
        if cfg.format != "cow":
            kw["backing_fmt"] = Format.from_str(bfmt)
        opts = dataclasses.replace(opts, **kw)  # type: ignore[arg-type]
    real = size
    if cfg.format == "vpc" and not opts.force_size:  # type: ignore[attr-defined]
        real = _vpc_size(opts)
    unit = _unit(opts)
    if cfg.format == "vmdk" and opts.subformat == "streamOptimized":  # type: ignore[attr-defined]
        return Plan(opts, tuple(_grain_writes(draw, real, max_writes)), name=name)
    compressed: List[Write] = []
    if extras["compress"]:
        # One whole cluster of compressible bytes that later writes leave
        # alone, so the image surely holds a compressed cluster.
        k = draw(st.integers(0, max(0, real // unit - 1)))
        keep = (k * unit, min(unit, real - k * unit))
        fill = bytes([draw(st.integers(1, 255))])
        # Last, so the other compressed writes cannot overwrite it.
        compressed = _writes(draw, real, unit, max(0, max_writes // 2)) + [(keep[0], fill * keep[1])]
    writes = _writes(draw, real, unit, max_writes)
    if compressed:
        a, n = keep
        writes = [w for w in writes if w[0] + len(w[1]) <= a or w[0] >= a + n]
    snaps: Tuple[int, ...] = ()
    if extras["snapshots"]:
        count = draw(st.integers(1, 2))
        snaps = tuple(sorted(draw(st.lists(st.integers(0, len(writes)), min_size=count, max_size=count))))
    return Plan(opts, tuple(writes), tuple(compressed), snaps, name=name)


@st.composite
def _image(draw: st.DrawFn, configs: Sequence[Configuration], min_size: int, max_size: int,
           max_writes: int) -> GeneratedImage:
    cfg = draw(st.sampled_from(configs))
    size = _size(draw, min_size, max_size, cfg.format)
    return build_image(_plan(draw, cfg, size, max_writes, overlay=False))


def images(
    formats: Optional[Union[FormatSpec, Iterable[FormatSpec]]] = None,
    *,
    min_size: int = 512,
    max_size: int = 4 * MiB,
    max_writes: int = 6,
) -> st.SearchStrategy[GeneratedImage]:
    """Valid images of the writable formats, as :class:`GeneratedImage` values.

    ``formats``: format names (``"qcow2"``, a :class:`libqblock.Format`) or
    configuration names from :data:`CONFIGURATIONS` (``"qcow2-compressed"``,
    ``"vmdk-stream"``, ``"vpc-fixed"``...); None for all of them. Options are
    drawn as well (cluster sizes, compat, refcount widths, extended L2,
    preallocation, subformats, block sizes...), qcow2 images may hold
    compressed clusters and internal snapshots. The virtual size lies between
    ``min_size`` and ``max_size`` (vpc rounds it to a CHS geometry unless
    ``force_size``); at most ``max_writes`` guest writes are made. Every image
    is created by libqblock in a temporary folder that is gone afterwards.
    """
    if min_size > max_size or max_size < 512:
        raise InvalidParamError(f"need 512 <= min_size <= max_size, got {min_size} and {max_size}")
    return _image(_configs(formats), min_size, max_size, max_writes)


def _chain_formats(top: str, depth: int, draw: st.DrawFn) -> List[str]:
    """Layer formats, top first: each layer below one that records a backing file."""
    out = [top]
    while len(out) < depth:
        below = BACKING_FORMATS[out[-1]]
        if len(out) < depth - 1:
            below = tuple(f for f in below if f in BACKING_FORMATS)  # it needs a backing file itself
        out.append(draw(st.sampled_from(below)))
    return out


@st.composite
def _chain(draw: st.DrawFn, tops: Sequence[str], min_depth: int, max_depth: int, max_size: int,
           max_writes: int) -> GeneratedChain:
    top = draw(st.sampled_from(tops))
    fmts = list(reversed(_chain_formats(top, draw(st.integers(min_depth, max_depth)), draw)))
    size = _size(draw, 512, max_size, "cow")
    plans: List[Plan] = []
    for i, fmt in enumerate(fmts):
        # qcow2, qed and qcow overlays may be larger or smaller than what
        # they stand on (it reads as zeroes past its end); the others keep its size.
        if i and fmt in ("qcow2", "qed", "qcow") and draw(st.booleans()):
            size = _size(draw, 512, max_size, fmt)
        backing = (plans[-1].name, str(plans[-1].options.format)) if plans else None
        plans.append(_plan(draw, Configuration(fmt, fmt), size, max_writes, overlay=bool(i),
                           name=file_name(fmt, f"layer{i}"), backing=backing))
    return build_chain(plans)


def chains(
    formats: Optional[Union[FormatSpec, Iterable[FormatSpec]]] = None,
    *,
    min_depth: int = 2,
    max_depth: int = 3,
    max_size: int = 2 * MiB,
    max_writes: int = 4,
) -> st.SearchStrategy[GeneratedChain]:
    """Backing chains of ``min_depth`` to ``max_depth`` images, as :class:`GeneratedChain`.

    ``formats`` picks the top's format among those that record a backing file
    (qcow2, qcow, qed, cow, vmdk; None for all); the layers below get formats
    the one above may stand on (raw only as the base). Every layer names the
    next by a relative file name, so the chain works wherever it is written.
    """
    if min_depth < 1 or max_depth < min_depth:
        raise InvalidParamError(f"need 1 <= min_depth <= max_depth, got {min_depth} and {max_depth}")
    names = list(BACKING_FORMATS) if formats is None else [
        str(f) for f in ([formats] if isinstance(formats, (str, Format)) else formats)]
    for n in names:
        if n not in BACKING_FORMATS:
            raise InvalidParamError(f"{n!r} images have no backing file; chains() takes {', '.join(BACKING_FORMATS)}")
    return _chain(names, min_depth, max_depth, max_size, max_writes)


@st.composite
def _mutation(draw: st.DrawFn, image: GeneratedImage, structured: bool) -> Mutation:
    fields = candidate_fields(image)
    if structured and fields and draw(st.integers(0, 9)) < 8:
        f = draw(st.sampled_from(fields))
        if f.values and draw(st.integers(0, 4)) < 4:
            label, value = draw(st.sampled_from(f.values))
        else:
            label, value = "an arbitrary value", draw(st.integers(0, (1 << (8 * f.width)) - 1))
        m = mutate_field(image, f, value, label)
        if m is not None:
            return m
    off = draw(st.integers(0, len(image.data) - 1))
    return flip_mutation(image, off, draw(st.integers(1, 255)))


def mutations(image: GeneratedImage, *, structured: bool = True) -> st.SearchStrategy[Mutation]:
    """Structured mutations of one image, as :class:`Mutation` values.

    Most change one field the format's parser reads: a header field pushed
    out of range (sizes, cluster bits, table offsets past the end of the
    file, huge counts) or a table entry (L1/L2, refcount table, block map,
    BAT, grain directory and tables) pointed past the end, onto the header,
    onto another table or off its alignment; checksums covering the field are
    recomputed so the parser gets past them. The rest flip a byte anywhere.
    ``structured=False`` gives byte flips only.
    """
    return _mutation(image, structured)


def fuzz_settings(**overrides: Any) -> settings:
    """Hypothesis settings suited to these strategies: no deadline (building
    an image takes milliseconds to a second, which Hypothesis's default 200 ms
    deadline would call flaky) and no "too slow" or "data too large" health
    checks; ``overrides`` are passed on (``max_examples=500``...)."""
    kw: Dict[str, Any] = {"deadline": None,
                          "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    kw.update(overrides)
    return settings(**kw)


def mutated_images(
    formats: Optional[Union[FormatSpec, Iterable[FormatSpec]]] = None, **kwargs: int
) -> st.SearchStrategy[MutatedImage]:
    """Images from :func:`images` (same arguments) each with one mutation, as :class:`MutatedImage`."""
    return images(formats, **kwargs).flatmap(lambda img: mutations(img).map(lambda m: MutatedImage(img, m)))
