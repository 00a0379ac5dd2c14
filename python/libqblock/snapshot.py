"""Internal snapshots (qcow2): :class:`SnapshotInfo` and the operations behind
``Image.snapshots``, ``Image.snapshot_create``, ``Image.snapshot_apply`` and
``Image.snapshot_delete``, plus the table ``qemu-img snapshot -l`` prints.

A snapshot records the whole disk as it is when it is taken; later writes
copy the clusters they change, so the snapshot keeps reading the same bytes
until it is deleted. Applying one makes the disk read as the snapshot again
(and take the size it had then); what was written since is dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

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


def _size(n: int) -> str:
    """A byte count as QEMU's size_to_str prints it: ``0 B``, ``1.5 KiB``, ``12 MiB``.

    Like QEMU, a unit is used from 1000 of the one below (1000 bytes is ``0.977 KiB``).
    """
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C's division, which truncates towards zero
    return f"{n / (1 << (i * 10)):0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[i]}B"


def _clock(nsec: int) -> str:
    """The VM clock as qemu-img prints it: hours (at least four digits), minutes, seconds, milliseconds."""
    secs = nsec // _NS
    return f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{nsec // 1_000_000 % 1000:03d}"


#: qemu-img's columns: ID, TAG, VM_SIZE, DATE, VM_CLOCK, ICOUNT (printf widths -7, -16, 8, 19, 15, 10).
_ROW = "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}"


def snapshot_table(snapshots: Sequence[SnapshotInfo]) -> str:
    """The lines ``qemu-img snapshot -l`` prints for these snapshots (dates in local time)."""
    lines = ["Snapshot list:", _ROW.format("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        icount = "" if s.icount is None else str(s.icount)
        lines.append(_ROW.format(s.id, s.name, _size(s.vm_state_size), date, _clock(s.vm_clock_nsec), icount))
    return "\n".join(lines)
