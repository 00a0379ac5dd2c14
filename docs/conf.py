"""Sphinx configuration of libqblock's documentation site.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` and run
its examples with ``python -m sphinx -W -b doctest docs docs/_build/doctest``
(tests/test_docs.py does both). The pages document the installed
``libqblock`` package (``pip install -e .`` from this repository).
"""

from __future__ import annotations

import libqblock

project = "libqblock"
author = "the libqblock developers"
copyright = "the libqblock developers"
version = release = libqblock.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinxarg.ext",
]

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "Disk images from Python, with a Rust engine"}
html_static_path: list = []
# The site is plain reStructuredText; no page links out to other projects.
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
# The docstrings are plain reStructuredText (no Google or NumPy sections).
autodoc_default_options = {"show-inheritance": True}

# Every example runs in a folder of its own, made fresh for each group of
# each page and removed after it, so no example writes into the repository
# and none sees another's files. Images are made by libqblock itself: no
# example needs qemu-img.
doctest_global_setup = """
import os as _os
import shutil as _shutil
import tempfile as _tempfile
import libqblock as qb
_doc_cwd = _os.getcwd()
_doc_tmp = _tempfile.mkdtemp(prefix="qblock-doc-")
_os.chdir(_doc_tmp)
"""
doctest_global_cleanup = """
_os.chdir(_doc_cwd)
_shutil.rmtree(_doc_tmp, ignore_errors=True)
"""
# ``>>>`` lines outside doctest directives are tested too.
doctest_test_doctest_blocks = "default"
# Exception messages are compared too (Sphinx's default flags would ignore
# everything after the exception's class name).
import doctest as _doctest  # noqa: E402

doctest_default_flags = _doctest.ELLIPSIS | _doctest.DONT_ACCEPT_TRUE_FOR_1
