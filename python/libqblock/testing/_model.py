"""Generated images and chains, built through libqblock itself (no Hypothesis here).

A *plan* (options plus the writes to make) becomes real image bytes by
creating the image in a temporary folder with :func:`libqblock.create`,
writing through :meth:`libqblock.Image.write` (or :func:`libqblock.convert`
with ``compress=True`` for compressed qcow2 clusters) and reading the file
back. The guest content is modelled alongside as plain bytes, so whoever
parses the image can compare what they read with it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from ..formats import Format
from ..image import create as _create
from ..image import open as _open
from ..flags import O_RDWR
from ..options import ImageOptions
from ..tools import convert as _convert
from ..check import check as _check

#: One guest write: (offset, bytes).
Write = Tuple[int, bytes]

#: Formats ``qemu-img`` reads (QEMU dropped cow in 2.2).
QEMU_READS: FrozenSet[str] = frozenset({"raw", "qcow2", "qcow", "qed", "vdi", "vmdk", "vpc", "vhdx", "parallels"})
#: Formats ``qemu-img check`` checks.
QEMU_CHECKS: FrozenSet[str] = frozenset({"qcow2", "qed", "vdi", "vmdk", "vhdx", "parallels"})
#: Formats that record a backing file, and the formats their backing file may have here.
BACKING_FORMATS: Dict[str, Tuple[str, ...]] = {
    "qcow2": ("qcow2", "raw", "qed", "qcow"),
    "qcow": ("qcow", "qcow2", "raw"),
    "qed": ("qed", "qcow2", "raw"),
    "cow": ("cow", "raw"),
    "vmdk": ("vmdk",),
}

_EXT = {"vpc": "vhd", "parallels": "hdd"}


def file_name(fmt: str, stem: str = "image") -> str:
    """The file name a generated image of ``fmt`` gets (``image.qcow2``, ``image.vhd``...)."""
    return f"{stem}.{_EXT.get(fmt, fmt)}"


@dataclass(frozen=True)
class GeneratedImage:
    """One valid image made by libqblock, with what it must read as.

    ``data`` is the image file's bytes; ``content`` the guest disk it holds
    (``len(content)`` is the virtual size, backing files included in what it
    reads); ``options`` the options object it was created with; ``writes``
    the guest writes made, in order; ``snapshots`` the internal snapshots
    (name, content at the time) oldest first; ``features`` what the image
    actually has, as found after building it (``"compressed"``,
    ``"snapshots"``, ``"backing"``, ``"subformat=..."``...); ``name`` the
    file name it expects (its overlays name it); ``backing`` the relative
    name of its backing file, if any.
    """

    format: str
    options: ImageOptions
    data: bytes = field(repr=False)
    content: bytes = field(repr=False)
    writes: Tuple[Write, ...] = field(default=(), repr=False)
    snapshots: Tuple[Tuple[str, bytes], ...] = field(default=(), repr=False)
    features: FrozenSet[str] = frozenset()
    name: str = "image"
    backing: Optional[str] = None

    @property
    def virt_size(self) -> int:
        """The virtual disk size in bytes (the content model's length)."""
        return len(self.content)

    def write_to(self, folder: Union[str, "os.PathLike[str]"], name: Optional[str] = None) -> Path:
        """Write the image file into ``folder`` (as ``name``, default :attr:`name`); returns its path.

        An image with a backing file needs that file beside it: write the
        whole :class:`GeneratedChain` instead.
        """
        p = Path(folder) / (name or self.name)
        p.write_bytes(self.data)
        return p

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """Hypothesis prints failing examples with this: the short repr, not megabytes of bytes."""
        p.text(repr(self))

    def __repr__(self) -> str:
        feats = ",".join(sorted(self.features))
        return (f"GeneratedImage({self.format}, {len(self.data)} bytes, virt_size={self.virt_size}, "
                f"{len(self.writes)} writes, features={{{feats}}}, options={self.options!r})")


@dataclass(frozen=True)
class GeneratedChain:
    """A backing chain: ``layers[0]`` is the base, ``layers[-1]`` the top.

    Each layer names the one below by a relative file name, so the chain
    works wherever :meth:`write_to` puts it. Each layer's ``content`` is what
    it reads with the layers below it; :attr:`content` is the top's.
    """

    layers: Tuple[GeneratedImage, ...]

    @property
    def top(self) -> GeneratedImage:
        """The topmost overlay."""
        return self.layers[-1]

    @property
    def content(self) -> bytes:
        """What the top of the chain reads as."""
        return self.layers[-1].content

    def write_to(self, folder: Union[str, "os.PathLike[str]"]) -> Path:
        """Write every layer into ``folder``; returns the top's path."""
        for layer in self.layers:
            layer.write_to(folder)
        return Path(folder) / self.top.name

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """Hypothesis prints failing examples with this."""
        p.text(repr(self))

    def __repr__(self) -> str:
        return "GeneratedChain(" + " <- ".join(f"{x.name}({x.format}, {x.virt_size})" for x in self.layers) + ")"


@dataclass(frozen=True)
class Plan:
    """What to build: options, writes and the qcow2 extras.

    ``writes`` are made in order; with ``compress`` the writes of
    ``compressed_writes`` are laid down first and converted into compressed
    clusters, the others written plainly afterwards; ``snapshot_after``
    lists write counts after which a snapshot is taken (qcow2 only).
    """

    options: ImageOptions
    writes: Tuple[Write, ...] = ()
    compressed_writes: Tuple[Write, ...] = ()
    snapshot_after: Tuple[int, ...] = ()
    name: str = ""


def _apply(model: bytearray, w: Write) -> None:
    off, data = w
    model[off : off + len(data)] = data


def build_image(plan: Plan, folder: Optional[Path] = None, base_content: bytes = b"") -> GeneratedImage:
    """Build the image a plan describes and return it with its model.

    Made in ``folder`` (a new temporary folder, removed afterwards, when
    None); an overlay's backing file must already be in ``folder`` under the
    relative name its options give, and ``base_content`` is what that
    backing file reads as. Raises a :class:`libqblock.QBlockError` when
    libqblock refuses the plan.
    """
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="qb-testing-") as d:
            return build_image(plan, Path(d), base_content)
    opts = plan.options
    fmt = str(opts.format)
    name = plan.name or file_name(fmt)
    path = folder / name
    if path.exists():
        path.unlink()
    features = set()
    snaps: List[Tuple[str, bytes]] = []
    if plan.compressed_writes:
        # Compressed clusters come only from convert -c: lay the content out
        # in a raw file, convert it, then open the result for the rest.
        src = folder / (name + ".src.raw")
        src_model = bytearray(opts.virt_size)
        for w in plan.compressed_writes:
            _apply(src_model, w)
        src.write_bytes(bytes(src_model))
        try:
            _convert(str(src), str(path), opts, source_format=Format.RAW, compress=True)
        finally:
            src.unlink()
    else:
        _create(str(path), opts)
    with _open(str(path), fmt, O_RDWR) as img:
        model = bytearray(img.virt_size)
        n = min(len(base_content), len(model))
        model[:n] = base_content[:n]
        for w in plan.compressed_writes:
            _apply(model, w)
        pending = sorted(plan.snapshot_after)

        def snapshot() -> None:
            sname = f"snap{len(snaps) + 1}"
            img.snapshot_create(sname)
            snaps.append((sname, bytes(model)))

        for i, w in enumerate(plan.writes):
            while pending and pending[0] <= i:
                pending.pop(0)
                snapshot()
            img.write(w[1], w[0])
            _apply(model, w)
        for _ in pending:
            snapshot()
    if snaps:
        features.add("snapshots")
    backing = getattr(opts, "backing", None)
    if backing is not None:
        features.add("backing")
    if fmt == "qcow2":
        r = _check(str(path), format=fmt)
        if r.compressed_clusters:
            features.add("compressed")
        features.add(f"compat={opts.compat}")  # type: ignore[attr-defined]
        if opts.extended_l2:  # type: ignore[attr-defined]
            features.add("extended_l2")
    sub = getattr(opts, "subformat", None)
    if sub is not None:
        features.add(f"subformat={sub}")
    if fmt == "vdi":
        features.add("static" if opts.static else "dynamic")  # type: ignore[attr-defined]
    return GeneratedImage(
        format=fmt,
        options=opts,
        data=path.read_bytes(),
        content=bytes(model),
        writes=tuple(plan.compressed_writes) + tuple(plan.writes),
        snapshots=tuple(snaps),
        features=frozenset(features),
        name=name,
        backing=None if backing is None else str(backing),
    )


def build_chain(plans: Sequence[Plan], folder: Optional[Path] = None) -> GeneratedChain:
    """Build a backing chain, base first; each plan's options name the layer below by its file name."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="qb-testing-") as d:
            return build_chain(plans, Path(d))
    layers: List[GeneratedImage] = []
    content = b""
    for plan in plans:
        layer = build_image(plan, folder, content)
        layers.append(layer)
        content = layer.content
    return GeneratedChain(tuple(layers))


@dataclass(frozen=True)
class Configuration:
    """A named writable configuration: a format and fixed option values.

    :func:`libqblock.testing.images` draws the remaining options itself;
    these names are what ``formats=`` accepts besides plain format names.
    """

    name: str
    format: str
    fixed: Dict[str, object] = field(default_factory=dict)


#: Every writable configuration the strategies cover, by name.
CONFIGURATIONS: Dict[str, Configuration] = {
    c.name: c
    for c in (
        Configuration("raw", "raw"),
        Configuration("qcow2", "qcow2"),
        Configuration("qcow2-v2", "qcow2", {"compat": "0.10"}),
        Configuration("qcow2-compressed", "qcow2", {"compress": True}),
        Configuration("qcow2-snapshots", "qcow2", {"snapshots": True}),
        Configuration("qcow2-extl2", "qcow2", {"extended_l2": True, "compat": "1.1"}),
        Configuration("qcow", "qcow"),
        Configuration("qed", "qed"),
        Configuration("cow", "cow"),
        Configuration("vdi", "vdi", {"static": False}),
        Configuration("vdi-static", "vdi", {"static": True}),
        Configuration("vmdk", "vmdk", {"subformat": "monolithicSparse"}),
        Configuration("vmdk-stream", "vmdk", {"subformat": "streamOptimized"}),
        Configuration("vpc", "vpc", {"subformat": "dynamic"}),
        Configuration("vpc-fixed", "vpc", {"subformat": "fixed"}),
        Configuration("vhdx", "vhdx", {"subformat": "dynamic"}),
        Configuration("vhdx-fixed", "vhdx", {"subformat": "fixed"}),
        Configuration("parallels", "parallels"),
    )
}
