"""The benchmark report as a notebook: run `notebooks/07_evaluation.ipynb` with papermill and render it to HTML.

    python -m itaclip_core.evaluation.notebook_report --preset itaclip_voc21 --data-root data/VOCdevkit \
        --weights ViT-B/16 --out out/report

writes `out/report/07_evaluation.ipynb` (executed), `out/report/07_evaluation.html` (the report, figures
embedded), the notebook's results JSON and figures, and the runner's records under `out/report/`, so that running
the same command again resumes an interrupted evaluation. `make report PRESET=... DATA_ROOT=... [WEIGHTS=...]`
calls this. Needs the `notebooks` extra (papermill, nbconvert, ipykernel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from itaclip_core.model.random import is_random_spec
from itaclip_core.model.weights import canonical_name

NOTEBOOK_NAME = "07_evaluation.ipynb"


def default_notebook() -> Path:
    """`notebooks/07_evaluation.ipynb` of the checkout holding the package."""
    return Path(__file__).resolve().parents[2] / "notebooks" / NOTEBOOK_NAME


def report_parameters(preset: str, data_root: str | Path, weights: str | Path, out: str | Path,
                      num_images: int | None = None, dataset: str | None = None, device: str | None = None,
                      overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The notebook parameters of a report.

    Args:
        preset: preset name (PRESET).
        data_root: dataset root (DATA_ROOT).
        weights: an OpenAI model name or a random-model spec (becomes MODEL), or a checkpoint path (WEIGHTS).
        out: output folder (OUT_DIR; figures go to `out/figures`).
        num_images: evaluate only the first N images (None: the base's value, else all).
        dataset: dataset name (None: the preset's).
        device: "cuda", "cpu" or None (the base's value, else CUDA when available).
        overrides: `key=value` changes to the preset (OVERRIDES).
        base: parameters the above are laid over (e.g. read from a parameters YAML file).
    """
    parameters = dict(base or {})
    name = str(weights)
    if canonical_name(name) is not None or is_random_spec(name) or name.startswith("open_clip:"):
        parameters.update(MODEL=name, WEIGHTS=None)
    else:
        parameters.update(WEIGHTS=str(Path(name).expanduser().resolve()))
    out = Path(out).expanduser().resolve()
    parameters.update(PRESET=preset, DATASET=dataset, DATA_ROOT=str(Path(data_root).expanduser().resolve()),
                      OUT_DIR=str(out), FIGURES_DIR=str(out / "figures"))  # fmt: skip
    # NUM_IMAGES and DEVICE not given keep the base's value (the notebook's default without a base).
    for key, value in (("NUM_IMAGES", num_images), ("DEVICE", device)):
        if value is not None:
            parameters[key] = value
    if overrides:
        parameters["OVERRIDES"] = list(parameters.get("OVERRIDES") or []) + list(overrides)
    return parameters


def render_html(notebook: Path, html: Path) -> Path:
    """Render an executed notebook to a standalone HTML file (images embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html.write_text(body, encoding="utf-8")
    return html


def run_report(parameters: dict[str, Any], out: Path, notebook: Path | None = None, kernel_name: str = "python3",
               cell_timeout: int | None = None, cwd: Path | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Execute the report notebook with `parameters` into `out` and render it; returns (executed notebook, HTML).

    The HTML is written even when a cell fails (showing the error), then the failure is raised again.
    """
    import papermill

    notebook = notebook or default_notebook()
    if not notebook.is_file():
        raise FileNotFoundError(f"report notebook {notebook} not found: pass --notebook path/to/{NOTEBOOK_NAME} "
                                "(it lives in the notebooks/ folder of a source checkout)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    executed, html = out / notebook.name, out / (notebook.stem + ".html")
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, kernel_name=kernel_name,
                                   cwd=str(cwd or notebook.parent.parent), execution_timeout=cell_timeout,
                                   progress_bar=False)  # fmt: skip
    finally:
        if executed.is_file():
            render_html(executed, html)
    return executed, html


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m itaclip_core.evaluation.notebook_report",
                                     description="Run the benchmark report notebook and render it to HTML.")
    parser.add_argument("--preset", required=True, help="preset name, e.g. itaclip_voc21")
    parser.add_argument("--data-root", required=True, help="dataset root in MMSegmentation's layout")
    parser.add_argument("--weights", default="ViT-B/16",
                        help="OpenAI model name, checkpoint path, or random-tiny (default ViT-B/16)")
    parser.add_argument("--out", default="out/report", help="output folder (default out/report)")
    parser.add_argument("--num-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--dataset", default=None, help="dataset name (default: the preset's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a preset setting (repeatable)")
    parser.add_argument("--parameters", type=Path, default=None,
                        help="YAML file of notebook parameters to start from (e.g. notebooks/ci_parameters.yaml)")
    parser.add_argument("--notebook", type=Path, default=None, help=f"the report notebook (default notebooks/"
                        f"{NOTEBOOK_NAME} of this checkout)")  # fmt: skip
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds allowed per notebook cell")
    args = parser.parse_args(argv)
    if args.num_images is not None and args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    base = None
    if args.parameters is not None:
        import yaml

        if not args.parameters.is_file():
            parser.error(f"--parameters {args.parameters}: file not found")
        base = yaml.safe_load(args.parameters.read_text(encoding="utf-8")) or {}
    parameters = report_parameters(args.preset, args.data_root, args.weights, args.out, args.num_images, args.dataset,
                                   args.device, args.overrides, base)  # fmt: skip
    return report_and_say(parameters, args.notebook, args.cell_timeout, "report")


def report_and_say(parameters: dict[str, Any], notebook: Path | None, cell_timeout: int | None, what: str) -> int:
    """`run_report` for a command line: prints where the report went (exit 0), or that `what` failed and where the
    partial report is kept (exit 1)."""
    try:
        executed, html = run_report(parameters, Path(parameters["OUT_DIR"]), notebook, cell_timeout=cell_timeout)
    except Exception as error:  # the partial report is kept; say where
        print(f"the {what} failed: {error}", file=sys.stderr)
        print(f"partial report (if any): {Path(parameters['OUT_DIR'])}", file=sys.stderr)
        return 1
    print(f"report: {html}\nexecuted notebook: {executed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
