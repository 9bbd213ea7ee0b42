"""The comparison report as a notebook: run `notebooks/13_compare.ipynb` with papermill and render it to HTML.

    python -m itaclip_core.evaluation.compare_notebook --configs itaclip_voc21,sclip_voc21 \
        --data-root data/VOCdevkit --weights ViT-B/16 --focus person --out out/compare

`--configs` takes comma-separated presets or a YAML/JSON file of configurations (as `itaclip compare --configs`).
Writes `out/compare/13_compare.ipynb` (executed), `out/compare/13_compare.html`, the notebook's results JSON and
figures, and the comparison's record folders and report under `out/compare/13_compare_<dataset>/`, so that the
same command continues an interrupted comparison. `make compare CONFIGS=... DATA_ROOT=...` calls this. The
arguments are checked (presets, one dataset, its root, the focus class) before the notebook starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from itaclip_core.evaluation.notebook_report import report_and_say, report_parameters

NOTEBOOK_NAME = "13_compare.ipynb"


def default_notebook() -> Path:
    """`notebooks/13_compare.ipynb` of the checkout holding the package."""
    return Path(__file__).resolve().parents[2] / "notebooks" / NOTEBOOK_NAME


def _is_file_spec(configs: str) -> bool:
    return Path(configs).suffix.lower() in (".yaml", ".yml", ".json")


def compare_parameters(configs: str, data_root: str | Path, weights: str | Path, out: str | Path,
                       focus: str | None = "person", num_images: int | None = None, device: str | None = None,
                       overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The notebook parameters of a comparison report (the shared ones, plus COMPARE and FOCUS).

    Args:
        configs: comma-separated presets, or a YAML/JSON file of configurations (made absolute).
        (the others as in `notebook_report.report_parameters`; PRESET is the first configuration's preset)
    """
    from itaclip_core.evaluation.compare import configurations_from_presets, read_configurations

    if _is_file_spec(configs):
        compare = str(Path(configs).expanduser().resolve())
        first = read_configurations(compare)[0].preset
    else:
        compare = configs
        first = configurations_from_presets(configs)[0].preset
    parameters = report_parameters(first, data_root, weights, out, num_images, None, device, overrides, base)
    parameters.update(COMPARE=compare, FOCUS=focus)
    return parameters


def check_comparison(parameters: dict[str, Any]) -> None:
    """Check presets, settings, dataset, root and focus class as `itaclip compare` does (raises CompareError)."""
    from itaclip_core.evaluation.compare import (
        configurations_from_presets,
        plan_comparison,
        read_configurations,
        with_common_overrides,
    )

    compare = parameters["COMPARE"]
    base = read_configurations(compare) if _is_file_spec(compare) else configurations_from_presets(compare)
    configurations = with_common_overrides(base, list(parameters.get("OVERRIDES") or []))
    plan_comparison(configurations, parameters["DATA_ROOT"], parameters["OUT_DIR"], str(parameters.get("MODEL")),
                    parameters.get("NUM_IMAGES"), parameters.get("FOCUS"))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from itaclip_core.data.base import DatasetError
    from itaclip_core.evaluation.compare import CompareError

    parser = argparse.ArgumentParser(prog="python -m itaclip_core.evaluation.compare_notebook",
                                     description="Run the comparison notebook and render it to HTML.")
    parser.add_argument("--configs", required=True,
                        help="comma-separated presets of one benchmark, or a YAML/JSON file of configurations")
    parser.add_argument("--data-root", required=True, help="dataset root in MMSegmentation's layout")
    parser.add_argument("--weights", default="ViT-B/16",
                        help="OpenAI model name, checkpoint path, or random-tiny (default ViT-B/16)")
    parser.add_argument("--out", default="out/compare", help="output folder (default out/compare)")
    parser.add_argument("--focus", default="person", help="the focus class (default person; 'none' for none)")
    parser.add_argument("--num-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of every configuration (repeatable)")
    parser.add_argument("--parameters", type=Path, default=None,
                        help="YAML file of notebook parameters to start from (e.g. notebooks/ci_parameters.yaml)")
    parser.add_argument("--notebook", type=Path, default=None,
                        help=f"the notebook (default notebooks/{NOTEBOOK_NAME} of this checkout)")
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds allowed per notebook cell")
    args = parser.parse_args(argv)
    base = None
    if args.parameters is not None:
        import yaml

        if not args.parameters.is_file():
            parser.error(f"--parameters {args.parameters}: file not found")
        base = yaml.safe_load(args.parameters.read_text(encoding="utf-8")) or {}
    focus = None if args.focus.lower() in ("", "none") else args.focus
    try:
        parameters = compare_parameters(args.configs, args.data_root, args.weights, args.out, focus,
                                        args.num_images, args.device, args.overrides, base)  # fmt: skip
        check_comparison(parameters)
    except (CompareError, DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return report_and_say(parameters, args.notebook or default_notebook(), args.cell_timeout, "comparison report")


if __name__ == "__main__":
    sys.exit(main())
