"""The documentation site (docs/) builds without a warning, its examples run,
and it covers what the code has: a page per format with every option field,
every subcommand of the CLI, every public name."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import libqblock as qb
from libqblock import cli
from libqblock.options import OPTION_CLASSES, option_fields

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FORMATS = DOCS / "formats"
#: Doctests the pages hold today (244 when this floor was set): fewer means
#: examples were lost or a page stopped being tested.
MIN_DOCTESTS = 230


def _tree(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts)


def _sphinx(builder: str, out: Path) -> subprocess.CompletedProcess:
    before = _tree(DOCS)
    r = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", builder,
         "-d", str(out / "doctrees"), str(DOCS), str(out / builder)],
        capture_output=True, text=True, cwd=str(out), timeout=600,
    )
    assert _tree(DOCS) == before, "the build wrote into the repository"
    return r


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    r = _sphinx("html", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out / "html"


def test_html_builds_without_warnings(html):
    # -W makes any warning fail the build, which the fixture asserts; here:
    # the pages are there and autodoc rendered members, not empty pages.
    for page in ["index", "quickstart", "api", "api-modules", "errors", "capi", "cli", "protocols"]:
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text()
    assert 'id="libqblock.Image.read"' in api and 'id="libqblock.Image.snapshot_create"' in api
    assert "OutOfRangeError past the end" in api  # Image.read's docstring
    assert 'id="libqblock.capi.qb_open"' in (html / "capi.html").read_text()


def test_doctests_run_and_pass(tmp_path):
    r = _sphinx("doctest", tmp_path)
    report = (tmp_path / "doctest" / "output.txt").read_text()
    assert r.returncode == 0, report[-5000:] + r.stderr[-3000:]
    m = re.search(r"Doctest summary\n=+\n\s*(\d+) tests?\n\s*(\d+) failures? in tests\n"
                  r"\s*(\d+) failures? in setup code\n\s*(\d+) failures? in cleanup code", report)
    assert m, report[-2000:]
    ran, failed, setup, cleanup = map(int, m.groups())
    assert (failed, setup, cleanup) == (0, 0, 0)
    assert ran >= MIN_DOCTESTS, f"only {ran} doctests ran (floor {MIN_DOCTESTS})"


def _option_rows(text: str) -> Dict[str, List[str]]:
    """The rows of a page's option tables (a ``list-table`` whose first row
    is ``field | type | default | qemu-img -o | meaning``): field -> cells."""
    rows: Dict[str, List[str]] = {}
    for m in re.finditer(r"^\.\. list-table::.*\n((?:(?:   .*)?\n)*)", text, re.M):
        parts = re.split(r"^   \* - ", m.group(1), flags=re.M)[1:]
        table = [[" ".join(c.split()) for c in re.split(r"^     - ", p, flags=re.M)] for p in parts]
        if not table or table[0][:3] != ["field", "type", "default"]:
            continue
        for cells in table[1:]:
            name = re.fullmatch(r"``(\w+)``", cells[0])
            assert name, f"an option row without a field name: {cells}"
            assert name.group(1) not in rows, f"{name.group(1)} is documented twice"
            rows[name.group(1)] = cells
    return rows


def _format_page(fmt: qb.Format) -> Path:
    return FORMATS / f"{fmt.value}.rst"


@pytest.mark.parametrize("fmt", [f for f in qb.Format if f is not qb.Format.NONE], ids=str)
def test_every_format_has_a_page_in_the_toctree(fmt):
    page = _format_page(fmt)
    assert page.is_file(), f"no page for {fmt}: {page}"
    toctree = (FORMATS / "index.rst").read_text().split(".. toctree::", 1)[1]
    assert re.search(rf"^   {fmt.value}$", toctree, re.M), f"{fmt} is not in formats/index's toctree"
    text = page.read_text()
    assert f"Format.{fmt.name}" in text
    if fmt not in qb.supported_formats(write=True):
        assert "UnsupportedError" in text or "read-only" in text or "read only" in text


@pytest.mark.parametrize("fmt", sorted(OPTION_CLASSES, key=str), ids=str)
def test_every_option_field_is_documented_on_its_format_page(fmt):
    cls = OPTION_CLASSES[fmt]
    text = _format_page(fmt).read_text()
    assert cls.__name__ in text
    rows = _option_rows(text)
    fields = option_fields(cls)
    assert set(rows) == set(fields), (
        f"{fmt} page: missing {sorted(set(fields) - set(rows))}, stale {sorted(set(rows) - set(fields))}")
    defaults = cls.__dataclass_fields__  # type: ignore[attr-defined]
    for name, cells in rows.items():
        assert len(cells) == 5 and all(cells), f"{fmt}.{name}: a row has five cells: {cells}"
        _, _type, default, qemu, _meaning = cells
        assert default == f"``{defaults[name].default!r}``", f"{fmt}.{name}: default {default}"
        m = re.fullmatch(r"``([\w.-]+)``", qemu)
        if m and "." not in m.group(1):
            # The documented -o name is one `qblock create -o` maps to this field.
            assert cli._parse_o([f"{m.group(1)}=1"]) == {name: "1"}, f"{fmt}.{name}: -o {m.group(1)}"


def _subcommands() -> List[str]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def test_every_subcommand_is_in_the_cli_reference(html):
    page = (html / "cli.html").read_text()
    names = _subcommands()
    assert len(names) >= 17
    for name in names:
        assert f'id="qblock-{name}"' in page, f"qblock {name} is missing from cli.html"


def test_every_public_name_is_documented(html):
    ids = set()
    for page in html.rglob("*.html"):
        ids.update(re.findall(r'id="([^"]+)"', page.read_text()))
    missing = [n for n in qb.__all__ if f"libqblock.{n}" not in ids and f"module-libqblock.{n}" not in ids]
    assert not missing, f"not in the API reference: {missing}"
    from libqblock import capi

    missing = [n for n in capi.__all__ if f"libqblock.capi.{n}" not in ids]
    assert not missing, f"not in the capi reference: {missing}"
