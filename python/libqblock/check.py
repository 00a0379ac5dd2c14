"""Consistency checks and repairs of images: :func:`check`, as ``qemu-img check``.

qcow2, qed, vdi and vmdk (these two without repairs), parallels and vhdx are
checked, as qemu-img checks them. For qcow2 every reference its metadata makes is
counted and compared with the stored refcounts, and the copied flags with
the refcounts (see the README). Other formats raise
:class:`~libqblock.errors.UnsupportedError`, as ``qemu-img check`` refuses
them ("This image format does not support checks").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from . import _native
from ._qemu_order import qemu_order
from .errors import InvalidParamError, UnsupportedError
from .formats import Format
from .image import Where, _fmt_name, probe
from .location import Location

#: Formats whose driver checks its metadata: those qemu-img checks.
CHECKABLE = frozenset({Format.QCOW2, Format.QED, Format.VDI, Format.PARALLELS, Format.VHDX, Format.VMDK})
#: Of those, the ones a check can repair (qemu-img check -r on a vdi or vmdk
#: image says "This image format does not support checks").
REPAIRABLE = frozenset({Format.QCOW2, Format.QED, Format.PARALLELS, Format.VHDX})

_REPAIRS = {None: "none", "leaks": "leaks", "all": "all"}

#: qemu-img check --output=json's keys and the CheckResult field each comes
#: from; every key but those in _ALWAYS is left out when its value is 0. They
#: are printed in QEMU's dictionary order (``qemu_order``), as qemu-img does.
_JSON_KEYS = {
    "check-errors": "check_errors",
    "filename": "filename",
    "format": "format",
    "image-end-offset": "image_end_offset",
    "total-clusters": "total_clusters",
    "allocated-clusters": "allocated_clusters",
    "fragmented-clusters": "fragmented_clusters",
    "compressed-clusters": "compressed_clusters",
    "corruptions": "corruptions",
    "corruptions-fixed": "corruptions_fixed",
    "leaks": "leaks",
    "leaks-fixed": "leaks_fixed",
}
_ALWAYS = frozenset({"check-errors", "filename", "format"})


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check` found, counted as ``qemu-img check`` counts.

    With a repair that fixed something, the counts are those of the second
    check, after the repair (qemu-img's "Double checking the fixed image"),
    and ``leaks_fixed``/``corruptions_fixed`` say what the repair fixed.
    """

    #: The image as it was named to :func:`check`.
    filename: str
    format: Format
    #: Metadata errors that can lose data or break the image on later writes.
    corruptions: int = 0
    #: Clusters allocated but not used: wasted space, no harm to data.
    leaks: int = 0
    #: Failures of the check itself (refcounts that could not be read).
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    #: Where the clusters in use end in the image file.
    image_end_offset: Optional[int] = None
    #: The virtual size in clusters.
    total_clusters: Optional[int] = None
    #: Guest clusters allocated in this image (not its backing files).
    allocated_clusters: Optional[int] = None
    #: Allocated clusters not right after the one before them in the file.
    fragmented_clusters: Optional[int] = None
    compressed_clusters: Optional[int] = None
    #: One line per finding of the (final) check, worded as QEMU words it.
    messages: Tuple[str, ...] = ()
    #: The lines of the repairing pass, when there was one.
    repair_messages: Tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """No corruption, no leak and no check error (qemu-img check exits 0)."""
        return not (self.corruptions or self.leaks or self.check_errors)

    def to_qemu_json(self) -> Dict[str, Any]:
        """This result as ``qemu-img check --output=json`` prints it (same keys, same order)."""
        out: Dict[str, Any] = {}
        for key, attr in _JSON_KEYS.items():
            value = getattr(self, attr)
            if key == "format":
                value = str(value)
            if key in _ALWAYS or value:
                out[key] = value
        return qemu_order(out)

    def to_qemu_human(self) -> str:
        """The text ``qemu-img check`` prints on stdout for this result."""
        return self.repair_text() + self.summary_text()

    def repair_text(self) -> str:
        """qemu-img's lines between a repair and the second check ("" without one)."""
        if not (self.leaks_fixed or self.corruptions_fixed):
            return ""
        return ("The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n")

    def summary_text(self) -> str:
        """qemu-img's summary of the (final) check."""
        out = []
        if self.clean:
            out.append("No errors were found on the image.\n")
        if self.corruptions:
            out.append(f"\n{self.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if self.leaks:
            out.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if self.check_errors:
            out.append(f"\n{self.check_errors} internal errors have occurred during the check.\n")
        if self.total_clusters and self.allocated_clusters:
            a, t = self.allocated_clusters, self.total_clusters
            frag, comp = self.fragmented_clusters or 0, self.compressed_clusters or 0
            out.append(f"{a}/{t} = {a * 100.0 / t:.2f}% allocated, {frag * 100.0 / a:.2f}% fragmented, "
                       f"{comp * 100.0 / a:.2f}% compressed clusters\n")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)


def check(location: Where, *, format: Optional[Union[Format, str]] = None,  # noqa: A002 - qemu-img's name
          repair: Optional[str] = None, force_share: bool = False) -> CheckResult:
    """Check an image's metadata, as ``qemu-img check [-r leaks|all]``.

    ``format`` None probes it. ``repair`` None only reports (the image is
    opened read-only); ``"leaks"`` frees leaked clusters; ``"all"`` also
    fixes corruptions (for qcow2, a refcount of 0 under a used cluster makes
    it rebuild the whole refcount structure). A repair opens the image
    read-write, so ImageLockedError while another process (a VM, qemu-io)
    has it open, and, when it fixed something, is followed by a
    second check whose counts the result carries. The backing chain is not
    opened: only this file is checked. A dirty or corrupt-marked qcow2 is
    reported as it is on disk, and marked clean once a repair leaves no
    corruption.

    Raises UnsupportedError for a format that cannot be checked (or, vdi and
    vmdk, repaired), InvalidParamError for an unknown ``repair``,
    CorruptImageError when the image cannot even be opened, when the check
    cannot complete (a vmdk grain past its extent file) or when (qcow2, with
    ``repair="leaks"``) it needs a rebuild only ``repair="all"`` does, and
    NoMemoryError/UnsupportedError when its metadata is beyond the check's
    limits.

    ``force_share`` (``qemu-img check -U``) checks an image another process
    may have open for writing (what is read may then be changing); a
    repair cannot share, so it raises InvalidParamError with one.
    """
    if repair not in _REPAIRS:
        raise InvalidParamError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    if force_share and repair is not None:
        raise InvalidParamError("force_share (-U) cannot be used with a repair, which writes the image")
    loc = Location.of(location)
    fmt = probe(loc) if format is None else Format.from_str(str(_fmt_name(format)))
    if fmt not in CHECKABLE or (repair is not None and fmt not in REPAIRABLE):
        raise UnsupportedError(f"This image format does not support checks ({fmt}"
                               f"{' repairs' if fmt in CHECKABLE else ''})")
    name, first, second = _native.check_image(loc.protocol, loc.target, str(fmt), _REPAIRS[repair],
                                              force_share=force_share)
    filename = os.fsdecode(os.fspath(location)) if isinstance(location, (str, bytes, os.PathLike)) else loc.target
    if second is None:
        return _result(str(filename), name, first)
    return _result(str(filename), name, second, fixed=first)


def _result(filename: str, fmt: str, r: Mapping[str, Any], fixed: Optional[Mapping[str, Any]] = None) -> CheckResult:
    fields = {k: v for k, v in r.items() if k != "messages"}
    repair_messages: Tuple[str, ...] = ()
    if fixed is not None:
        fields["leaks_fixed"] = fixed["leaks_fixed"]
        fields["corruptions_fixed"] = fixed["corruptions_fixed"]
        repair_messages = tuple(fixed["messages"])
    return CheckResult(filename=filename, format=Format.from_str(fmt), messages=tuple(r["messages"]),
                       repair_messages=repair_messages, **fields)

