"""The docs: generated API reference up to date, public API documented, links resolve."""

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


def test_readme_and_docs_links_resolve():
    """Every relative link and image in README.md and docs/*.md points at a file that exists."""
    import re

    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
