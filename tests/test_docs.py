"""The generated API reference is up to date with the docstrings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_current():
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_api_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


def test_public_api_has_docstrings():
    import inspect

    import cosmic_tl

    missing = [
        n
        for n in cosmic_tl.__all__
        if callable(getattr(cosmic_tl, n)) and not inspect.getdoc(getattr(cosmic_tl, n))
    ]
    assert not missing, missing
