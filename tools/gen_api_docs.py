"""Generate docs/api.md from the docstrings and signatures of cosmic_tl's public API.

python tools/gen_api_docs.py          # rewrite docs/api.md
python tools/gen_api_docs.py --check  # exit 1 if docs/api.md is out of date
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import cosmic_tl

OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python tools/gen_api_docs.py`; do not edit by hand.",
        "",
    ]
    by_module: dict[str, list[str]] = {}
    for name in sorted(cosmic_tl.__all__, key=str.lower):
        obj = getattr(cosmic_tl, name)
        module = getattr(obj, "__module__", None) or "cosmic_tl"
        if not module.startswith("cosmic_tl"):
            continue
        by_module.setdefault(module, []).append(name)
    for module in sorted(by_module):
        lines += [f"## `{module}`", ""]
        for name in by_module[module]:
            obj = getattr(cosmic_tl, name)
            kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
            sig = _signature(obj) if kind != "constant" else ""
            lines += [f"### `{name}{sig}`", "", f"*{kind}*", ""]
            doc = inspect.getdoc(obj) if kind != "constant" else None
            if doc:
                lines += [doc, ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run python tools/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
