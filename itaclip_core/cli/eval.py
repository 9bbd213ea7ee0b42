"""`itaclip eval`: evaluate a preset on its benchmark, resumably, on one or several processes.

    itaclip eval --preset itaclip_voc21 --data-root data/VOCdevkit [--weights ViT-B/16] [--num-samples N]
                 [--save-vis K] [--save-preds DIR] [--out DIR] [--device D] [--set key=value ...] [--workers N]

Several processes: `torchrun --nproc_per_node N -m itaclip_core.cli eval ...` (same arguments).
Started again with the same arguments and --out, a run continues where it stopped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable

from itaclip_core.cli.common import (
    CliError,
    add_device_argument,
    add_dtype_argument,
    add_progress_argument,
    add_set_argument,
    add_weights_argument,
    check_output_dir,
    check_overrides,
    non_negative_int,
    positive_int,
)


def _default_out(preset: str, weights: str) -> Path:
    """runs/eval/<preset>-<weights>, the weights given by name or by their file's stem."""
    is_file = Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(weights).stem if is_file else weights).strip("-") or "weights"
    return Path("runs") / "eval" / f"{preset}-{tag}"


def _load_factory(spec: str) -> Callable[..., Any]:
    """The callable `module:function` from --segmentor-factory."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CliError(f"--segmentor-factory must be MODULE:FUNCTION, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise CliError(f"--segmentor-factory {spec}: cannot load it ({error})") from None


def _require_benchmark(preset: str, dataset: str | None) -> None:
    if not dataset:
        raise CliError(
            f"--preset {preset} is not tied to a benchmark (it has no dataset); choose a benchmark preset such as "
            "itaclip_voc21 or sclip_ade20k"
        )


def _check_resumable(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse, before the model loads, an --out folder holding a run with other settings (the weights' identity is
    compared once they are loaded)."""
    from itaclip_core.evaluation.records import MANIFEST_NAME, ResumeError

    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ResumeError(f"{path} is not valid JSON; use a new --out directory") from None
    differences = [f"{key}: {previous.get(key)!r} there, {value!r} now" for key, value in manifest.items()
                   if previous.get(key) != value]  # fmt: skip
    if differences:
        raise ResumeError(
            f"{out_dir} holds results of an evaluation with different settings ({'; '.join(differences)}). Continue "
            "it with the same arguments, or give another --out directory (or delete this one)."
        )


def _run(args: argparse.Namespace) -> int:
    from itaclip_core.cli import note
    from itaclip_core.data.registry import get_dataset
    from itaclip_core.evaluation.distributed import init_distributed
    from itaclip_core.evaluation.runner import check_eval_files, evaluate

    overrides = check_overrides(args.overrides)
    out_dir = check_output_dir(args.out or _default_out(args.preset, args.weights), "--out")
    if args.save_preds:
        check_output_dir(args.save_preds, "--save-preds")
    if args.segmentor_factory is not None:
        factory = _load_factory(args.segmentor_factory)
        context = init_distributed(args.device)
        try:
            segmentor = factory(args.preset, weights=args.weights, device=context.device, overrides=overrides)
            _require_benchmark(args.preset, getattr(segmentor.config, "dataset", None))
            dataset = get_dataset(segmentor.config.dataset, args.data_root)
            check_eval_files(dataset, args.num_samples)
            results = evaluate(segmentor, dataset, _options(args, out_dir, segmentor, overrides), context)
        finally:
            context.close()
        return _report(args, context, dataset, results, out_dir)

    from itaclip_core.presets import apply_overrides, get_preset, override_keys
    from itaclip_core.validation import resolve_device, validate_config

    # everything that can be checked without the model, before the weights load (or download)
    config = validate_config(apply_overrides(get_preset(args.preset), overrides))
    _require_benchmark(args.preset, config.dataset)
    dataset = get_dataset(config.dataset, args.data_root)
    check_eval_files(dataset, args.num_samples)
    from itaclip_core.segmentor import Segmentor, class_vocabulary

    vocab = class_vocabulary(config.classes)
    if vocab.num_classes != dataset.num_classes:
        raise CliError(f"the class file {config.classes} has {vocab.num_classes} classes but {dataset.spec.title} "
                       f"has {dataset.num_classes}; use the preset's own class file or one with "
                       f"{dataset.num_classes} lines")  # fmt: skip
    _check_resumable(out_dir, {"preset": args.preset, "overrides": overrides, "dataset": dataset.name})
    resolve_device(args.device)
    context = init_distributed(args.device)
    try:
        segmentor = Segmentor.from_config(config, weights=args.weights, device=context.device, dtype=args.dtype,
                                          progress=not args.no_progress, keep=override_keys(overrides),
                                          notes=lambda message: note("itaclip eval", message))  # fmt: skip
        results = evaluate(segmentor, dataset, _options(args, out_dir, segmentor, overrides), context)
    finally:
        context.close()
    return _report(args, context, dataset, results, out_dir)


def _options(args: argparse.Namespace, out_dir: Path, segmentor: Any, overrides: list[str]) -> Any:
    from itaclip_core.evaluation.runner import EvalOptions

    return EvalOptions(
        out_dir=out_dir,
        preset=args.preset,
        weights_id=str(segmentor.weights_id),
        overrides=overrides,
        num_samples=args.num_samples,
        save_preds=Path(args.save_preds) if args.save_preds else None,
        save_vis=args.save_vis,
        workers=args.workers,
        progress=not args.no_progress,
    )


def _report(args: argparse.Namespace, context: Any, dataset: Any, results: dict[str, Any], out_dir: Path) -> int:
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
        description="Evaluate a preset on its benchmark. Resumable: run again with the same arguments to continue; "
        "a run on --num-samples N continues into a larger N or the full set. Multi-process: torchrun "
        "--nproc_per_node N -m itaclip_core.cli eval ... Without a dataset, try it on `itaclip data synthetic`.",
    )
    parser.add_argument("--preset", required=True, help="preset name, e.g. itaclip_voc21")
    parser.add_argument("--data-root", required=True, help="the benchmark's root folder (MMSegmentation layout)")
    add_weights_argument(parser)
    parser.add_argument("--num-samples", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N images (extendable later)")  # fmt: skip
    parser.add_argument("--save-vis", type=non_negative_int, default=0, metavar="K",
                        help="save image / prediction / ground-truth panels of the first K images")  # fmt: skip
    parser.add_argument("--save-preds", default=None, metavar="DIR", help="save every predicted label map as a PNG")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default runs/eval/<preset>-<weights>)")  # fmt: skip
    add_device_argument(parser)
    add_dtype_argument(parser)
    add_set_argument(parser)
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="image-loading worker processes (default 2)")  # fmt: skip
    parser.add_argument("--segmentor-factory", default=None, metavar="MODULE:FUNCTION",
                        help="build the segmentor with FUNCTION(preset, weights=, device=, overrides=) instead of "
                        "Segmentor.from_preset (to evaluate another model with this runner)")  # fmt: skip
    add_progress_argument(parser)
    parser.set_defaults(func=_run)
