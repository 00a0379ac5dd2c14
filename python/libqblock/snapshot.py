"""Internal snapshots (qcow2): :class:`SnapshotInfo` and the operations behind
``Image.snapshots``, ``Image.snapshot_create``, ``Image.snapshot_apply`` and
``Image.snapshot_delete``.

A snapshot records the whole disk as it is when it is taken; later writes
copy the clusters they change, so the snapshot keeps reading the same bytes
until it is deleted. Applying one makes the disk read as the snapshot again
(and take the size it had then); what was written since is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from . import _native

if TYPE_CHECKING:  # pragma: no cover - only for the annotations
    from .image import Image

_NS = 1_000_000_000


@dataclass(frozen=True)
class SnapshotInfo:
    """One internal snapshot, as ``qemu-img snapshot -l`` lists it.

    ``id`` is the number the image gave it (as a string, QEMU's rule: one more
    than the largest id present); ``date_sec``/``date_nsec`` when it was
    taken (Unix time); ``vm_clock_nsec`` the guest clock of a VM snapshot
    (0 for a disk-only one); ``vm_state_size`` the bytes of saved VM state
    (0 for a disk-only one); ``icount`` the instruction count QEMU's record
    and replay stores, None when none was recorded.
    """

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: Optional[int] = None

    @property
    def vm_clock_sec(self) -> int:
        """Whole seconds of the guest clock (``qemu-img info``'s ``vm-clock-sec``)."""
        return self.vm_clock_nsec // _NS

    @property
    def date(self) -> float:
        """When the snapshot was taken, as a Unix timestamp with its fraction."""
        return self.date_sec + self.date_nsec / _NS

    @classmethod
    def from_qemu_info(cls, d: Dict[str, Any]) -> "SnapshotInfo":
        """The snapshot an entry of ``qemu-img info --output=json``'s ``snapshots`` describes."""
        return cls(d["id"], d["name"], d["vm-state-size"], d["date-sec"], d["date-nsec"],
                   d["vm-clock-sec"] * _NS + d["vm-clock-nsec"], d.get("icount"))

    def to_qemu_info(self) -> Dict[str, Any]:
        """This snapshot as one entry of ``qemu-img info --output=json``'s ``snapshots``.

        As QEMU splits it, ``vm-clock-nsec`` there is only the part of the
        clock below one second; ``icount`` is left out when none was recorded.
        """
        d: Dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_sec,
            "vm-clock-nsec": self.vm_clock_nsec % _NS,
        }
        if self.icount is not None:
            d["icount"] = self.icount
        return d


def _info(t: Tuple[str, str, int, int, int, int, Optional[int]]) -> SnapshotInfo:
    return SnapshotInfo(*t)


def list_snapshots(image: "Image") -> List[SnapshotInfo]:
    """The image's internal snapshots, oldest first (none for formats without them)."""
    return [_info(t) for t in _native.snapshot_list(image._n)]


def create_snapshot(image: "Image", name: str) -> SnapshotInfo:
    """Record the image's current content as a new snapshot called ``name``; returns it.

    Raises InvalidParamError for an empty, over-long (more than 255 bytes) or
    already used name, or a read-only image; UnsupportedError for a format
    without internal snapshots, a qcow2 image with an external data file or
    with 1-bit refcounts.
    """
    return _info(_native.snapshot_create(image._n, name))


def apply_snapshot(image: "Image", id_or_name: str) -> None:
    """Make the image read as the snapshot with this id (tried first) or name.

    What was written since the snapshot is dropped, and the image takes the
    virtual size it had then (as ``qemu-img snapshot -a``). Raises
    InvalidParamError when no snapshot has that id or name.
    """
    _native.snapshot_apply(image._n, id_or_name)


def delete_snapshot(image: "Image", id_or_name: str) -> None:
    """Delete the snapshot with this id (tried first) or name, freeing what only it used."""
    _native.snapshot_delete(image._n, id_or_name)
