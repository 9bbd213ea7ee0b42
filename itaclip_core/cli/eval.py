"""`itaclip eval`: evaluate a preset on its benchmark, resumably, on one or several processes.

    itaclip eval --preset itaclip_voc21 --data-root data/VOCdevkit [--weights ViT-B/16] [--num-samples N]
                 [--save-vis K] [--save-preds DIR] [--out DIR] [--device D] [--set key=value ...] [--workers N]

Several processes: `torchrun --nproc_per_node N -m itaclip_core.cli eval ...` (same arguments).
Started again with the same arguments and --out, a run continues where it stopped.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Callable

from itaclip_core.data.base import DatasetError


def _default_out(preset: str, weights: str) -> Path:
    """runs/eval/<preset>-<weights>, the weights given by name or by their file's stem."""
    is_file = Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(weights).stem if is_file else weights).strip("-") or "weights"
    return Path("runs") / "eval" / f"{preset}-{tag}"


def _load_factory(spec: str | None) -> Callable[..., Any]:
    """The callable building the segmentor: `Segmentor.from_preset`, or `module:function` from --segmentor-factory."""
    if spec is None:
        try:
            from itaclip_core.segmentor import Segmentor
        except ImportError as error:
            raise SystemExit(f"error: the segmentor is not available in this installation ({error})") from error
        return Segmentor.from_preset
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"error: --segmentor-factory must be MODULE:FUNCTION, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"error: cannot load the segmentor factory {spec!r}: {error}") from error


def _require_benchmark(preset: str, dataset: str | None) -> None:
    if not dataset:
        raise ValueError(
            f"preset {preset!r} is not tied to a benchmark (its config has no dataset); choose a benchmark preset "
            "such as itaclip_voc21 or sclip_ade20k"
        )


def _run(args: argparse.Namespace) -> int:
    from itaclip_core.data.registry import get_dataset
    from itaclip_core.evaluation.distributed import init_distributed
    from itaclip_core.evaluation.records import ResumeError
    from itaclip_core.evaluation.runner import EvalOptions, evaluate

    if args.num_samples is not None and args.num_samples < 1:
        raise SystemExit("error: --num-samples must be at least 1")
    if args.save_vis < 0 or args.workers < 0:
        raise SystemExit("error: --save-vis and --workers must not be negative")
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"error: --set takes key=value, got {item!r}")
    factory = _load_factory(args.segmentor_factory)
    context = init_distributed(args.device)
    try:
        if args.segmentor_factory is None:
            # open the dataset before loading (maybe downloading) the weights, so that a wrong root fails fast
            from itaclip_core.presets import apply_overrides, get_preset

            planned = apply_overrides(get_preset(args.preset), list(args.set))
            _require_benchmark(args.preset, planned.dataset)
            get_dataset(planned.dataset, args.data_root)
        segmentor = factory(args.preset, weights=args.weights, device=context.device, overrides=list(args.set))
        _require_benchmark(args.preset, getattr(segmentor.config, "dataset", None))
        dataset = get_dataset(segmentor.config.dataset, args.data_root)
        out_dir = Path(args.out) if args.out else _default_out(args.preset, args.weights)
        options = EvalOptions(
            out_dir=out_dir,
            preset=args.preset,
            weights_id=str(segmentor.weights_id),
            overrides=list(args.set),
            num_samples=args.num_samples,
            save_preds=Path(args.save_preds) if args.save_preds else None,
            save_vis=args.save_vis,
            workers=args.workers,
            progress=not args.quiet,
        )
        results = evaluate(segmentor, dataset, options, context)
    except (DatasetError, ResumeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        context.close()
    if context.is_main:
        rounded = results["rounded"]
        print(
            f"{args.preset} on {dataset.name}: mIoU {rounded['mIoU']}  mAcc {rounded['mAcc']}  aAcc {rounded['aAcc']} "
            f"({results['num_images']} images); reports in {out_dir}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `itaclip eval` to the `itaclip` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a preset on its benchmark (mIoU as MMSegmentation computes it)",
        description="Evaluate a preset on its benchmark. Resumable: run again with the same arguments to continue. "
        "Multi-process: torchrun --nproc_per_node N -m itaclip_core.cli eval ...",
    )
    parser.add_argument("--preset", required=True, help="preset name, e.g. itaclip_voc21")
    parser.add_argument("--data-root", required=True, help="the benchmark's root folder (MMSegmentation layout)")
    parser.add_argument("--weights", default="ViT-B/16", help="CLIP weights: a name (ViT-B/16, open_clip:ViT-H-14/laion2b_s32b_b79k) or a checkpoint path")
    parser.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--save-vis", type=int, default=0, metavar="K",
                        help="save image / prediction / ground-truth panels of the first K images")  # fmt: skip
    parser.add_argument("--save-preds", default=None, metavar="DIR", help="save every predicted label map as a PNG")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default runs/eval/<preset>-<weights>)")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a preset setting (repeatable)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="image-loading worker processes (default 2)")
    parser.add_argument("--segmentor-factory", default=None, metavar="MODULE:FUNCTION",
                        help="build the segmentor with FUNCTION(preset, weights=, device=, overrides=) instead of "
                        "Segmentor.from_preset (to evaluate another model with this runner)")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
