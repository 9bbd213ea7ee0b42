"""`itaclip compare`: several presets (or a file of configurations) on one benchmark, then one report.

    itaclip compare --presets itaclip_voc21,sclip_voc21 --data-root data/VOCdevkit --out runs/compare/voc21
                    [--set key=value ...] [--refine X] [--num-samples N] [--focus person] [--weights ViT-B/16]
    itaclip compare --configs ablation.yaml --data-root data/VOCdevkit --out runs/compare/ablation

Each configuration is evaluated by the resumable runner into `OUT/configs/<name>/`: run the same command again to
continue an interrupted comparison (finished configurations are not run again). Several processes:
`torchrun --nproc_per_node N -m itaclip_core.cli compare ...` (same arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from itaclip_core.cli.common import add_device_argument, add_progress_argument, add_weights_argument
from itaclip_core.data.base import DatasetError


def _configurations(args: argparse.Namespace) -> list[Any]:
    from itaclip_core.evaluation.compare import (
        CompareError,
        configurations_from_presets,
        read_configurations,
        with_common_overrides,
    )

    if bool(args.presets) == bool(args.configs):
        raise CompareError("give either --presets a,b,c or --configs FILE (one of them)")
    base = configurations_from_presets(args.presets) if args.presets else read_configurations(args.configs)
    return with_common_overrides(base, args.set, args.refine)


def _run(args: argparse.Namespace) -> int:
    from itaclip_core.evaluation.comparison_report import build_report
    from itaclip_core.evaluation.compare import CompareError, plan_comparison, run_comparison
    from itaclip_core.evaluation.distributed import init_distributed
    from itaclip_core.evaluation.records import ResumeError
    from itaclip_core.model.weights import ChecksumError, WeightsUnavailableError

    bad_input = (CompareError, DatasetError, ResumeError, ValueError, FileNotFoundError)
    context = init_distributed(args.device)
    report = None
    try:
        if args.workers < 0 or args.bootstrap < 1 or args.gallery < 0:
            raise CompareError("--workers and --gallery must not be negative, --bootstrap must be at least 1")
        configurations = _configurations(args)
        build = None
        configs = None
        weights_id = None
        if args.segmentor_factory is not None:
            from itaclip_core.cli.eval import _load_factory

            factory = _load_factory(args.segmentor_factory)
            made = {c.name: factory(c.preset, weights=args.weights, device=context.device,
                                    overrides=list(c.overrides)) for c in configurations}  # fmt: skip
            configs = {name: segmentor.config for name, segmentor in made.items()}
            weights_id = str(next(iter(made.values())).weights_id)

            def build(configuration: Any) -> Any:
                return made[configuration.name]

        out = Path(args.out)
        plan = plan_comparison(configurations, args.data_root, out, args.weights, args.num_samples, args.focus,
                               configs)  # fmt: skip
        if args.baseline is not None and args.baseline not in [c.name for c in configurations]:
            raise CompareError(f"--baseline {args.baseline}: not a configuration of this comparison; the "
                               f"configurations are {', '.join(c.name for c in configurations)}")  # fmt: skip
        run_comparison(plan, build=build, context=context, workers=args.workers, save_preds=not args.no_preds,
                       progress=not args.no_progress, weights_id=weights_id)  # fmt: skip
        if context.is_main:
            report = build_report(out, focus=plan.focus, baseline=args.baseline, resamples=args.bootstrap,
                                  seed=args.seed, gallery=args.gallery)  # fmt: skip
        context.barrier()
    except bad_input as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (WeightsUnavailableError, ChecksumError) as error:  # no weights offline, or a damaged download
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        context.close()
    if report is not None:
        for row in report["configurations"]:
            published = "" if row["published_mIoU"] is None else f" (published {row['published_mIoU']:.2f})"
            measured = "nan" if row["mIoU"] is None else f"{row['mIoU']:.2f}"
            print(f"{row['name']}: mIoU {measured}{published}")
        print(f"report: {out / 'results.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `itaclip compare` to the `itaclip` parser."""
    parser = subparsers.add_parser(
        "compare",
        help="evaluate several presets or configurations on one benchmark and write a comparison report",
        description="Evaluate several configurations on one benchmark (each resumable, sharing the model and text "
        "embeddings) and write results.md, results.json and figures. Multi-process: torchrun --nproc_per_node N "
        "-m itaclip_core.cli compare ...",
    )
    parser.add_argument("--presets", default=None, help="comma-separated presets, e.g. itaclip_voc21,sclip_voc21")
    parser.add_argument("--configs", default=None, metavar="FILE",
                        help="YAML or JSON list of {name, preset, overrides} (instead of --presets)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of every configuration (repeatable)")  # fmt: skip
    parser.add_argument("--refine", default=None, metavar="A,B", help="refinements added to every configuration, in "
                        "order: feature refinements (selfcorr, regional, sfr) become --set refine=..., logit "
                        "refinements (crf, guided, pamr) --set logit_refine=...")
    parser.add_argument("--data-root", required=True, help="the benchmark's root folder (MMSegmentation layout)")
    add_weights_argument(parser)
    parser.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--out", required=True, metavar="DIR", help="the comparison folder (records and report)")
    parser.add_argument("--focus", default=None, metavar="CLASS",
                        help="a class for the focus analysis (IoU, precision, recall, confusions, gallery)")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="the configuration the others are paired with (default: the first)")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the mIoU differences (default 1000)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--gallery", type=int, default=4, metavar="K",
                        help="images in the focus gallery (default 4)")  # fmt: skip
    parser.add_argument("--no-preds", action="store_true",
                        help="do not save the predicted label maps (the gallery needs them)")  # fmt: skip
    add_device_argument(parser)
    parser.add_argument("--workers", type=int, default=2, help="image-loading worker processes (default 2)")
    parser.add_argument("--segmentor-factory", default=None, metavar="MODULE:FUNCTION",
                        help="build each segmentor with FUNCTION(preset, weights=, device=, overrides=) instead of "
                        "the shared model and Segmentor")  # fmt: skip
    add_progress_argument(parser)
    parser.set_defaults(func=_run)
