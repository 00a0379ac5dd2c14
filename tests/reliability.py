"""Reliability figures gathered while the tests run (crash points survived,
hypothesis examples, hostile images rejected), printed by pytest at the end
(see ``pytest_terminal_summary`` in conftest.py) and written to
``$QBLOCK_RELIABILITY_JSON`` when that is set."""

from __future__ import annotations

from collections import Counter

FIGURES: Counter = Counter()


def count(what: str, n: int = 1) -> None:
    """Add ``n`` to the figure named ``what``."""
    FIGURES[what] += n
