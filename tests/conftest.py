"""Shared fixtures: qemu-img/qemu-io as the oracle, temporary images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


def _require(tool: Any, name: str) -> str:
    # CI installs qemu-utils, so a missing oracle is a failure, not a skip.
    if tool is None:
        pytest.fail(f"{name} is required for the tests (apt-get install qemu-utils)")
    return tool


def qemu_img(*args: str, check: bool = True, cwd: Any = None) -> subprocess.CompletedProcess:
    return subprocess.run([_require(QEMU_IMG, "qemu-img"), *args], capture_output=True, text=True, check=check,
                          cwd=cwd)


def qemu_io(path: str, *cmds: str, fmt: str = "qcow2", cwd: Any = None) -> str:
    args = [_require(QEMU_IO, "qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, path], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0 or "error" in r.stderr.lower() or "failed" in r.stdout.lower():
        raise AssertionError(f"qemu-io failed: {r.stdout}{r.stderr}")
    return r.stdout


def qblock_cmd() -> List[str]:
    """The qblock command installed for this interpreter (not a version
    manager's shim on PATH, which may pick another environment), else
    ``python -m libqblock``."""
    exe = os.path.join(os.path.dirname(sys.executable), "qblock")
    if os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("qblock")
    return [found] if found else [sys.executable, "-m", "libqblock"]


def qemu_info(path: str, *extra: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", *extra, path).stdout)


def qemu_map(path: str, *extra: str) -> List[dict]:
    return json.loads(qemu_img("map", "--output=json", *extra, path).stdout)


def qemu_raw_bytes(path: str, tmp: Path, *extra: str) -> bytes:
    out = tmp / f"oracle-{os.getpid()}-{abs(hash(path))}.raw"
    qemu_img("convert", *extra, "-O", "raw", path, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_check(path: str) -> dict:
    r = qemu_img("check", "--output=json", path, check=False)
    assert r.returncode == 0, f"qemu-img check failed ({r.returncode}): {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the reliability figures the tests gathered (tests/reliability.py)."""
    import reliability

    if not reliability.FIGURES:
        return
    terminalreporter.section("reliability figures")
    for what, n in sorted(reliability.FIGURES.items()):
        terminalreporter.write_line(f"{n:>8,}  {what}")
    out = os.environ.get("QBLOCK_RELIABILITY_JSON")
    if out:
        Path(out).write_text(json.dumps(dict(reliability.FIGURES), indent=1, sort_keys=True) + "\n")
