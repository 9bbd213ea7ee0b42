"""A notebook run: the shared parameters, output folders, seeds, figures under stable names, the results JSON."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from itaclip_core.model.random import is_random_spec


__all__ = [
    'PARAMETER_NAMES', 'project_root', 'resolve_path', 'is_random_model', 'to_jsonable', 'NotebookRun',
    'start_notebook',
]

# The parameters every notebook defines in its `parameters` cell (papermill injects values after that cell).
PARAMETER_NAMES = ("MODEL", "WEIGHTS", "PRESET", "OVERRIDES", "DATASET", "DATA_ROOT", "NUM_IMAGES", "DEVICE", "SEED",
                   "OUT_DIR", "FIGURES_DIR", "IMAGE", "CLASSES")  # fmt: skip
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository root in a checkout



def project_root() -> Path:
    """The checkout holding the package (where `notebooks/`, `figures/` and `data/` live), else the working folder."""
    return _PACKAGE_ROOT if (_PACKAGE_ROOT / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | Path, must_exist: bool = True, what: str = "path") -> Path:
    """An absolute path for a notebook parameter.

    Args:
        path: absolute, or relative to the working folder or to `project_root()` (tried in that order).
        must_exist: an input: raise when neither location holds it. Otherwise an output: relative paths are
            placed under `project_root()`.
        what: the parameter's name, for the error message.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if must_exist and not candidate.exists():
            raise FileNotFoundError(f"{what} {candidate} does not exist: check the notebook parameter {what}")
        return candidate
    if not must_exist:
        return project_root() / candidate
    for base in (Path.cwd(), project_root()):
        if (base / candidate).exists():
            return (base / candidate).resolve()
    raise FileNotFoundError(
        f"{what} {str(path)!r} was found neither in {Path.cwd()} nor in {project_root()}: set the notebook "
        f"parameter {what} to an existing path"
    )


def is_random_model(model: str | None, weights: str | None = None) -> bool:
    """True when the parameters name a random CLIP (`random-tiny`, ...), whose outputs mean nothing."""
    return is_random_spec(str(weights if weights else model))


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become None, numpy and torch scalars and arrays become Python values,
    tuples lists, paths strings, dataclasses dicts."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


@dataclass
class NotebookRun:
    """One execution of a notebook: its parameters, where its figures and results go."""

    notebook: str  # the notebook's stem, e.g. "03_image_engineering"
    parameters: dict[str, Any]  # the shared parameters as set for this run
    out_dir: Path  # results JSON folder
    figures_dir: Path  # figures folder
    figures: list[str] = field(default_factory=list)  # names of the figures saved so far

    @property
    def random_model(self) -> bool:
        return is_random_model(self.parameters["MODEL"], self.parameters["WEIGHTS"])

    def figure_path(self, name: str) -> Path:
        """Where figure `name` goes (`NN_<what>.png`, NN the notebook's number); the figure is recorded as written."""
        prefix = self.notebook.split("_")[0] + "_"
        if not name.startswith(prefix) or not name.endswith(".png"):
            raise ValueError(f"figure name {name!r} must look like {prefix}<what>.png (stable names per notebook)")
        if name not in self.figures:
            self.figures.append(name)
        return self.figures_dir / name

    def save_figure(self, figure: Any, name: str, dpi: int = 100) -> Path:
        """Save a matplotlib figure as `figures_dir/name` (see `figure_path`)."""
        path = self.figure_path(name)
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        return path

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Write `out_dir/<notebook>.json`: the results with the parameters, the figures and the environment."""
        payload = {
            "notebook": self.notebook,
            "results": to_jsonable(results),
            "parameters": to_jsonable(self.parameters),
            "figures": list(self.figures),
            "random_model": self.random_model,
            "python": sys.executable,
            "torch": torch.__version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = self.out_dir / f"{self.notebook}.json"
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def start_notebook(notebook: str, namespace: Mapping[str, Any]) -> NotebookRun:
    """Begin a notebook run from the parameters defined in `namespace` (pass `globals()`).

    Creates OUT_DIR and FIGURES_DIR (relative paths under the project root), seeds Python, NumPy and PyTorch with
    SEED, and says so when the model is a random network.
    """
    missing = [name for name in PARAMETER_NAMES if name not in namespace]
    if missing:
        raise NameError(f"the parameters cell of {notebook} must define {', '.join(missing)}")
    parameters = {name: namespace[name] for name in PARAMETER_NAMES}
    out_dir = resolve_path(parameters["OUT_DIR"], must_exist=False, what="OUT_DIR")
    figures_dir = resolve_path(parameters["FIGURES_DIR"], must_exist=False, what="FIGURES_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    seed = int(parameters["SEED"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    run = NotebookRun(notebook, parameters, out_dir, figures_dir)
    if run.random_model:
        print(f"NOTE: MODEL={parameters['WEIGHTS'] or parameters['MODEL']} is a random network: this run only shows "
              "that the notebook executes; its figures and numbers mean nothing.")  # fmt: skip
    return run


