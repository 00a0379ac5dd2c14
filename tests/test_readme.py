"""The README's commands are what CI and users run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list:
    return re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command():
    run_cmd, test_cmd = _commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci.splitlines()
    assert "qblock create" in run_cmd and "qblock info" in run_cmd


def _format_rows() -> dict:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## What works today") : text.index("## Speed")]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("format", "---"):
            for name in cells[0].split(","):
                rows[name.strip().split(" ")[0]] = cells
    return rows


def test_the_format_table_says_what_the_engine_serves():
    import libqblock as qb

    rows = _format_rows()
    for fmt in qb.Format:
        if fmt is qb.Format.NONE:
            continue
        row = rows[str(fmt)]
        readable = fmt in qb.supported_formats()
        creatable = fmt in qb.supported_formats(write=True)
        assert (row[2] != "`UnsupportedError`") == readable, (fmt, row)
        assert (row[4] not in ("`UnsupportedError`", "—")) == creatable, (fmt, row)
