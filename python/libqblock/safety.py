"""Untrusted images: :func:`inspect` reports what an image names without opening it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from . import _native
from .formats import Format
from .image import Where, _fmt_name
from .location import Location, PathLike


@dataclass(frozen=True)
class Reference:
    """One file an image names, as :func:`inspect` found it in the image."""

    #: ``"backing"``, ``"data_file"`` (qcow2), ``"extent"`` (vmdk extents,
    #: parallels bundle images) or ``"parent_locator"`` (a VHD/VHDX parent
    #: candidate: the open tries them in turn).
    kind: str
    #: The name exactly as the image records it.
    name: str
    #: Where an open would look: the name joined to the image's folder (or
    #: the protocol location, e.g. ``"nbd://host/x"``).
    location: str
    #: The path an open would use; None for a protocol name.
    path: Optional[str]
    #: The path after symlinks; None for a protocol name or a path that
    #: cannot be resolved (``..`` below a missing folder).
    real_path: Optional[str]
    #: The protocol of a prefixed name (``"nbd"``, ``"json"``); a ``file:``
    #: prefix is dropped, not reported.
    protocol: Optional[str]
    #: The recorded name is an absolute path.
    absolute: bool
    #: ``real_path`` lies inside the image's folder or one of the allowed folders.
    inside: bool
    #: Something exists at ``path`` (found by a stat; nothing was opened).
    exists: bool
    #: The format recorded beside a backing file's name, if any.
    format: Optional[Format] = None


@dataclass(frozen=True)
class SafetyReport:
    """What :func:`inspect` learned from an image file alone."""

    location: Location
    format: Format
    virtual_size: int
    #: Facts about the image: ``encrypted``, ``dirty``, ``cluster_size`` and
    #: the format-specific ones as ``qemu-img info`` names them (for qcow2:
    #: ``compat``, ``lazy-refcounts``, ``corrupt``, ``data-file``, ...).
    features: Dict[str, Any] = field(default_factory=dict)
    #: Every file the image names, backing file first.
    references: Tuple[Reference, ...] = ()

    @property
    def confined(self) -> bool:
        """True when every reference stays inside the image's folder or the allowed ones."""
        return all(r.inside for r in self.references)

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict (``qblock inspect --output=json``)."""
        return {
            "filename": self.location.path if self.location.protocol == "file" else str(self.location),
            "format": str(self.format),
            "virtual-size": self.virtual_size,
            "features": self.features,
            "confined": self.confined,
            "references": [
                {
                    "kind": r.kind,
                    "name": r.name,
                    "location": r.location,
                    "path": r.path,
                    "real-path": r.real_path,
                    "protocol": r.protocol,
                    "absolute": r.absolute,
                    "inside": r.inside,
                    "exists": r.exists,
                    "format": None if r.format is None else str(r.format),
                }
                for r in self.references
            ],
        }


def _str(p: Optional["os.PathLike[str]"]) -> Optional[str]:
    return None if p is None else os.fspath(p)


def inspect(
    location: Where,
    *,
    allowed: Optional[Sequence[PathLike]] = None,
    fmt: Optional[Union[Format, str]] = None,
) -> SafetyReport:
    """Read the image at ``location`` alone and report every file it names.

    Nothing the image names is opened (a stat says whether it exists), so a
    reference to a FIFO, a device or a file of someone else's costs nothing;
    nor is the image locked (as ``qemu-img info -U``). ``inside`` is judged
    against the image's folder and the ``allowed`` folders, after symlinks:
    what ``open(..., references="confined", allowed_dirs=allowed)`` would
    accept. ``fmt`` None probes. A damaged image raises CorruptImageError as
    :func:`libqblock.open` would.
    """
    loc = Location.of(location)
    raw = _native.inspect(
        loc.protocol,
        loc.target,
        _fmt_name(fmt),
        allowed=[os.fsdecode(d) for d in (allowed or ())],
    )
    features: Dict[str, Any] = {
        "encrypted": raw["encrypted"],
        "dirty": raw["dirty"],
        "cluster_size": raw["cluster_size"],
    }
    features.update(raw["format_specific"])
    refs = tuple(
        Reference(
            kind=r["kind"],
            name=r["name"],
            location=r["location"],
            path=_str(r["path"]),
            real_path=_str(r["real_path"]),
            protocol=r["protocol"],
            absolute=r["absolute"],
            inside=r["inside"],
            exists=r["exists"],
            format=None if r["format"] is None else Format.from_str(r["format"]),
        )
        for r in raw["references"]
    )
    return SafetyReport(
        location=loc,
        format=Format.from_str(raw["format"]),
        virtual_size=raw["virtual_size"],
        features=features,
        references=refs,
    )
