"""Notebooks are stored without outputs: `python -m itaclip_core.explore strip|check notebooks/*.ipynb`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence





__all__ = [
    'notebook_problems', 'strip_notebook', 'main',
]

def notebook_problems(path: str | Path) -> list[str]:
    """What a committed notebook must not hold: outputs, execution counts, stored widget state."""
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    problems = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"{path}: cell {number} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"{path}: cell {number} has an execution count")
    if "widgets" in notebook.get("metadata", {}):
        problems.append(f"{path}: the notebook stores widget state")
    return problems


def strip_notebook(path: str | Path) -> bool:
    """Remove outputs, execution counts and run metadata from a notebook file; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        metadata = cell.get("metadata", {})
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            metadata.pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    for key in ("papermill", "widgets"):
        notebook.get("metadata", {}).pop(key, None)
    stripped = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if stripped != text:
        path.write_text(stripped, encoding="utf-8")
    return stripped != text


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m itaclip_core.explore strip|check NOTEBOOK...`: strip outputs, or fail when any are stored."""
    parser = argparse.ArgumentParser(prog="python -m itaclip_core.explore",
                                     description="Keep notebooks free of outputs before committing them.")
    parser.add_argument("action", choices=("strip", "check"), help="strip: remove outputs; check: list them")
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebook files")
    args = parser.parse_args(argv)
    if args.action == "strip":
        for path in args.notebooks:
            if strip_notebook(path):
                print(f"stripped {path}")
        return 0
    problems = [problem for path in args.notebooks for problem in notebook_problems(path)]
    for problem in problems:
        print(problem)
    if problems:
        print("run: python -m itaclip_core.explore strip " + " ".join(str(p) for p in args.notebooks))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
