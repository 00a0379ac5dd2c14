"""Fault injection for crash-consistency tests.

The engine can put a fault-injecting layer under every file of a folder: it
counts the mutating operations that reach those files (writes, zero writes,
allocations, truncations, flushes; reads are not counted) and strikes one
of them::

    with libqblock.faults.armed(folder, "cut", at=17, unflushed="random", seed=3) as plan:
        ...  # open images under `folder`, write, flush: operation 17 cuts the power
    plan.fired, plan.ops

``kind``:

* ``"count"``: nothing happens; ``plan.ops`` sizes a workload (a dry run).
* ``"fail"``: that operation fails with EIO (an :class:`InternalError` with
  ``errno`` 5) and changes nothing; later ones work.
* ``"drop"``: that operation reports success and changes nothing (a disk
  that lies).
* ``"cut"``: power is cut: that operation and every later one fail with
  EIO. With ``unflushed="keep"`` every write issued before the cut stays
  (a killed process: the kernel keeps its cache); with ``"lose"`` or
  ``"random"`` writes are held, as a disk's volatile cache holds them, until
  a flush makes them durable, and at the cut none, or a seeded random subset
  in any order, reach the file.

Files opened (or created) under the folder while it is armed share the
plan, so the count runs across an image's data files and extents as one
disk's would. Files opened before arming, or outside the folder, are not
touched. This is a testing tool: a cut leaves open images unusable, and they
should be closed (errors ignored) before the folder is examined.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Literal, Union
from contextlib import contextmanager

from . import _native

FaultKind = Literal["count", "fail", "drop", "cut"]
Unflushed = Literal["keep", "lose", "random"]


@dataclass
class FaultPlan:
    """What an armed plan has seen: updated while armed and when disarmed."""

    folder: str
    ops: int = 0  #: mutating operations counted so far
    fired: bool = False  #: whether the chosen operation was reached

    def refresh(self) -> "FaultPlan":
        """Read the plan's counters now (while it is armed)."""
        s = _native.fault_status(self.folder)
        if s is not None:
            self.ops, self.fired = s
        return self


def arm(
    folder: Union[str, "os.PathLike[str]"],
    kind: FaultKind,
    at: int = 0,
    *,
    unflushed: Unflushed = "keep",
    seed: int = 0,
) -> FaultPlan:
    """Arm a plan on ``folder`` (replacing one armed there); see the module's doc."""
    if at < 0:
        raise ValueError("at must be >= 0")
    path = os.fspath(folder)
    _native.fault_arm(path, kind, at, unflushed, seed)
    return FaultPlan(path)


def disarm(plan: FaultPlan) -> FaultPlan:
    """Disarm the plan's folder; files opened from now on are plain again."""
    s = _native.fault_disarm(plan.folder)
    if s is not None:
        plan.ops, plan.fired = s
    return plan


@contextmanager
def armed(
    folder: Union[str, "os.PathLike[str]"],
    kind: FaultKind,
    at: int = 0,
    *,
    unflushed: Unflushed = "keep",
    seed: int = 0,
) -> Iterator[FaultPlan]:
    """:func:`arm` for the ``with`` block, disarmed at its end."""
    plan = arm(folder, kind, at, unflushed=unflushed, seed=seed)
    try:
        yield plan
    finally:
        disarm(plan)
