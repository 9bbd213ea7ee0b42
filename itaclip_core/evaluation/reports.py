"""Evaluation reports: results.json, results.md and the per-class IoU chart.

results.json holds the summary figures at full precision and rounded as MMSegmentation prints them, the
per-class IoU and Acc, the summed counts, the settings (preset, overrides, the segmentor's full configuration),
the weights identity, the dataset, the number of images and the date. NaN (a class absent from both predictions
and labels) is written as null.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from itaclip_core.data.base import SegDataset
from itaclip_core.evaluation.records import atomic_write_text
from itaclip_core.metrics import IoUAccumulator, TrimapAccumulator


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):
        return _clean(value.item())
    return str(value)


def _config_dict(segmentor: Any) -> dict[str, Any]:
    config = getattr(segmentor, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return _clean(to_dict()) if callable(to_dict) else {}


def build_results(
    accumulator: IoUAccumulator,
    dataset: SegDataset,
    segmentor: Any,
    manifest: dict[str, Any],
    run_info: dict[str, Any],
    boundary: TrimapAccumulator | None = None,
) -> dict[str, Any]:
    """The content of results.json (JSON-safe) from the summed counts and the run's settings (and the boundary
    accuracy, when given)."""
    metrics = accumulator.results(dataset.class_names)
    per_class = [
        {"class": name, "IoU": iou, "Acc": acc, "IoU_rounded": iou_r, "Acc_rounded": acc_r}
        for name, iou, acc, iou_r, acc_r in zip(
            metrics["class_names"], metrics["IoU"], metrics["Acc"], metrics["rounded"]["IoU"],
            metrics["rounded"]["Acc"],
        )
    ]  # fmt: skip
    results = {
        "mIoU": metrics["mIoU"],
        "mAcc": metrics["mAcc"],
        "aAcc": metrics["aAcc"],
        "rounded": {key: metrics["rounded"][key] for key in ("mIoU", "mAcc", "aAcc")},
        "num_images": metrics["num_images"],
        "per_class": per_class,
        "dataset": {"name": dataset.name, "title": dataset.spec.title, "root": str(dataset.root),
                    "num_classes": dataset.num_classes},  # fmt: skip
        "preset": manifest["preset"],
        "weights_id": manifest["weights_id"],
        "overrides": manifest["overrides"],
        "num_samples": manifest["num_samples"],
        "config": _config_dict(segmentor),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run_info,
        "counts": metrics["counts"],
    }
    if boundary is not None:
        results["boundary"] = boundary.results()
    return _clean(results)


def _fmt(value: float | None) -> str:
    return "absent" if value is None else f"{value:.2f}"


def _boundary_lines(boundary: dict[str, Any] | None) -> list[str]:
    """The boundary-accuracy table of results.md (nothing when it was not measured)."""
    if not boundary or not boundary.get("num_images"):
        return []
    widths = boundary["widths"]
    return [
        "",
        "| " + " | ".join(f"boundary acc @{w} px" for w in widths) + " |",
        "|" + "---:|" * len(widths),
        "| " + " | ".join(_fmt(v) for v in boundary["rounded"]) + " |",
        "",
        f"Pixel accuracy within {', '.join(map(str, widths))} pixels of a label boundary (trimap accuracy; the edges "
        f"of ignored regions count as boundaries), over {boundary['num_images']} images.",
    ]


def format_markdown(results: dict[str, Any]) -> str:
    """results.md: summary, settings and the per-class table."""
    rounded = results["rounded"]
    dataset = results["dataset"]
    run = results.get("run", {})
    lines = [
        f"# {results['preset']} on {dataset['title']}",
        "",
        "| mIoU | mAcc | aAcc | images |",
        "|---:|---:|---:|---:|",
        f"| {_fmt(rounded['mIoU'])} | {_fmt(rounded['mAcc'])} | {_fmt(rounded['aAcc'])} | {results['num_images']} |",
        "",
        "Scored as MMSegmentation's IoUMetric (percentages; classes absent from both predictions and labels are "
        "left out of the means).",
        *_boundary_lines(results.get("boundary")),
        "",
        "## Settings",
        "",
        f"- preset: `{results['preset']}`",
        f"- weights: `{results['weights_id']}`",
        f"- overrides: {', '.join(f'`{o}`' for o in results['overrides']) or 'none'}",
        f"- dataset: `{dataset['name']}` ({dataset['num_classes']} classes) at `{dataset['root']}`",
        f"- images: {results['num_images']}"
        + (f" (first {results['num_samples']})" if results.get("num_samples") is not None else ""),
        f"- date: {results['date']}",
        f"- processes: {run.get('world_size', 1)}; images computed in the last run: {run.get('computed', '?')}, "
        f"loaded from earlier records: {run.get('loaded_from_records', '?')}",
    ]
    config = results.get("config") or {}
    if config:
        lines += ["", "<details><summary>Full configuration</summary>", "", "```json",
                  json.dumps(config, indent=2, sort_keys=True), "```", "", "</details>"]  # fmt: skip
    lines += ["", "## Per class", "", "| class | IoU | Acc |", "|---|---:|---:|"]
    for row in results["per_class"]:
        lines.append(f"| {row['class']} | {_fmt(row['IoU_rounded'])} | {_fmt(row['Acc_rounded'])} |")
    return "\n".join(lines) + "\n"


def write_reports(out_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """Write results.json, results.md and per_class_iou.png into `out_dir`; returns the paths written."""
    from itaclip_core import vis

    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(md_path, format_markdown(results))
    ious = [math.nan if row["IoU"] is None else row["IoU"] for row in results["per_class"]]
    names = [row["class"] for row in results["per_class"]]
    title = f"{results['preset']} on {results['dataset']['name']}: per-class IoU"
    chart = vis.plot_per_class_iou(names, ious, out_dir / "per_class_iou.png", title=title)
    return [json_path, md_path, Path(chart)]
