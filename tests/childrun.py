"""Run hostile-image probes in a child process, so that a crash, a hang or a
runaway allocation fails one test instead of killing pytest."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any, Dict

import pytest


def run_result_child(code: str, params: Dict[str, Any], name: str, *, timeout: float, address_space: int) -> dict:
    """Run ``code`` (which reads ``json.loads(sys.argv[1])`` and prints a line
    ``RESULT <json>``) with ``params`` in a child limited to ``address_space``
    bytes and no core dumps; its result. A timeout fails the test as a HANG,
    a death or a missing result as a CRASH, naming ``name``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    try:
        r = subprocess.run(
            [sys.executable, "-c", code, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit,
            env=dict(os.environ, RUST_BACKTRACE="0"),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: HANG (no answer within {timeout} s)")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        pytest.fail(f"{name}: CRASH (status {r.returncode})\n{r.stdout[-1000:]}\n{r.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])
