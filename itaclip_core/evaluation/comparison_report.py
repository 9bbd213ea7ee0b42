"""The report of a comparison: results.json, results.md and figures, from the record folders alone.

- the main table: mIoU, mAcc and aAcc per configuration, the preset's published mIoU and the difference, and the
  weights (with their sha256) the numbers come from;
- paired per-image differences of every configuration against a baseline, with a bootstrap interval of the mIoU
  difference;
- the configurations x classes IoU table and heatmap, and the classes where the configurations differ most;
- a focus class: IoU, precision, recall, the classes it is confused with, its per-image IoU distribution and a
  gallery of the images where the configurations disagree most (image, ground truth, each prediction).

    from itaclip_core.evaluation.comparison_report import build_report
    report = build_report("runs/compare/voc21", focus="person")
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from itaclip_core.evaluation.analysis import (
    ImageCounts,
    bootstrap_miou_difference,
    class_figures,
    confusions,
    disagreement,
    image_counts,
    most_different_classes,
    paired_differences,
    per_image_iou,
    per_image_miou,
)
from itaclip_core.evaluation.compare import (
    CONFIGS_DIR,
    PREDS_DIR,
    CompareError,
    folder_name,
    load_plan,
    resolve_class,
)
from itaclip_core.evaluation.published import published_result
from itaclip_core.evaluation.records import atomic_write_text, read_records
from itaclip_core.evaluation.reports import _clean

FIGURES_DIR = "figures"
_REFERENCE_WEIGHTS = "ViT-B/16"  # the published numbers are for OpenAI's ViT-B/16


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "class"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def is_reference_weights(weights_id: str) -> bool:
    """The weights the published numbers use (OpenAI's ViT-B/16), by name or by the checkpoint's sha256."""
    from itaclip_core.model.weights import REGISTRY

    return weights_id.partition(" sha256:")[2] == REGISTRY[_REFERENCE_WEIGHTS].sha256


def weights_line(weights_id: str) -> str:
    """A sentence naming the weights and their sha256 (or saying there is none)."""
    name, _, digest = weights_id.partition(" sha256:")
    if digest:
        return f"weights: `{name}`, sha256 `{digest}`"
    return f"weights: `{weights_id}` (random or unidentified weights: no checkpoint sha256)"


# ------------------------------------------------------------------------------------------------ loading
class LoadedRun:
    """One evaluated configuration: its plan entry, results.json and per-image counts."""

    def __init__(self, entry: dict[str, Any], folder: Path, results: dict[str, Any], counts: ImageCounts) -> None:
        self.name: str = entry["name"]
        self.preset: str = entry["preset"]
        self.overrides: list[str] = list(entry.get("overrides") or [])
        self.folder = folder
        self.results = results
        self.counts = counts

    @property
    def iou(self) -> np.ndarray:
        """(K,) per-class IoU in percent, NaN for absent classes."""
        return np.array([math.nan if row["IoU"] is None else row["IoU"] for row in self.results["per_class"]])


def load_runs(out_dir: Path, plan: dict[str, Any], dataset: Any) -> list[LoadedRun]:
    """The evaluated configurations of a comparison directory, with their records."""
    names = [sample.name for sample in dataset.samples[: plan["num_images"]]]
    runs = []
    for entry in plan["configurations"]:
        folder = out_dir / CONFIGS_DIR / folder_name(entry["name"])
        results_file = folder / "results.json"
        if not results_file.is_file():
            raise CompareError(f"configuration {entry['name']!r} has not been evaluated yet ({results_file} is "
                               "missing): run the same `itaclip compare` command again to finish it")  # fmt: skip
        results = json.loads(results_file.read_text(encoding="utf-8"))
        records = read_records(folder, dataset.num_classes, names)
        if len(records) != len(names):
            raise CompareError(f"{folder} has records of {len(records)} of the {len(names)} images: run the "
                               "comparison again to finish it")  # fmt: skip
        runs.append(LoadedRun(entry, folder, results, image_counts(records, dataset.num_classes)))
    return runs


# ------------------------------------------------------------------------------------------------ figures
def plot_main(runs: Sequence[LoadedRun], rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Measured mIoU per configuration, the published number beside it when there is one."""
    figure = _figure(max(5.0, 1.1 * len(runs) + 2), 3.8)
    axes = figure.add_subplot(1, 1, 1)
    x = np.arange(len(runs))
    measured = [row["mIoU"] if row["mIoU"] is not None else 0.0 for row in rows]
    published = [row["published_mIoU"] for row in rows]
    axes.bar(x - 0.2, measured, width=0.4, label="measured", color="tab:blue")
    has = [i for i, value in enumerate(published) if value is not None]
    axes.bar(x[has] + 0.2, [published[i] for i in has], width=0.4, label="published", color="tab:grey")
    for i, value in enumerate(measured):
        axes.text(i - 0.2, value + 0.5, f"{value:.1f}", ha="center", fontsize=8)
    axes.set_xticks(x)
    axes.set_xticklabels([run.name for run in runs], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("mIoU (%)")
    axes.legend(fontsize=8)
    axes.set_title("mIoU per configuration")
    return _save(figure, path)


def plot_heatmap(runs: Sequence[LoadedRun], class_names: Sequence[str], path: Path) -> Path:
    """Configurations x classes IoU heatmap (grey: absent)."""
    iou = np.stack([run.iou for run in runs])  # (C, K)
    figure = _figure(min(40.0, max(6.0, 0.28 * len(class_names) + 2)), max(2.5, 0.45 * len(runs) + 1.5))
    axes = figure.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(iou)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = axes.imshow(masked, aspect="auto", cmap=cmap, vmin=0, vmax=100, interpolation="nearest")
    axes.set_yticks(range(len(runs)))
    axes.set_yticklabels([run.name for run in runs], fontsize=8)
    axes.set_xticks(range(len(class_names)))
    axes.set_xticklabels(class_names, rotation=90, fontsize=6 if len(class_names) > 60 else 8)
    if len(class_names) <= 40:
        for (i, j), value in np.ndenumerate(iou):
            if math.isfinite(value):
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                          color="white" if value < 50 else "black")  # fmt: skip
    figure.colorbar(image, ax=axes, label="IoU (%)")
    axes.set_title("per-class IoU")
    return _save(figure, path)


def plot_focus_distribution(runs: Sequence[LoadedRun], values: Sequence[np.ndarray], focus: str, path: Path) -> Path:
    """Per-image IoU of the focus class per configuration (box plot with the images as dots)."""
    figure = _figure(max(5.0, 1.0 * len(runs) + 2), 3.8)
    axes = figure.add_subplot(1, 1, 1)
    data = [v[np.isfinite(v)] for v in values]
    shown = [d if d.size else np.array([np.nan]) for d in data]
    axes.boxplot(shown, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, 1):
        axes.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=8, alpha=0.6, color="tab:blue")
    axes.set_xticks(range(1, len(runs) + 1))
    axes.set_xticklabels([run.name for run in runs], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(f"IoU of {focus} per image (%)")
    axes.set_ylim(-3, 103)
    axes.set_title(f"{focus}: per-image IoU (images where it is labelled or predicted)")
    return _save(figure, path)


def plot_paired(pairs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Histogram of the per-image mIoU differences of each configuration against the baseline."""
    figure = _figure(5.0 * len(pairs), 3.6)
    for number, pair in enumerate(pairs, 1):
        axes = figure.add_subplot(1, len(pairs), number)
        diff = np.asarray(pair["per_image"], dtype=np.float64)
        diff = diff[np.isfinite(diff)]
        axes.hist(diff, bins=min(30, max(5, diff.size // 3 or 1)), color="tab:blue", alpha=0.8)
        axes.axvline(0, color="black", linewidth=1)
        boot = pair["bootstrap"]
        axes.set_title(f"{pair['name']} - {pair['baseline']}: {boot['difference']:+.2f} mIoU\n"
                       f"{boot['level'] * 100:.0f}% CI [{boot['low']:+.2f}, {boot['high']:+.2f}]",
                       fontsize=9)  # fmt: skip
        axes.set_xlabel("per-image mIoU difference (points)")
        axes.set_ylabel("images")
    return _save(figure, path)


def _palette(dataset_name: str, num_classes: int) -> np.ndarray:
    from itaclip_core import vis
    from itaclip_core.evaluation.runner import _palette_name

    return vis.palette(num_classes, _palette_name(dataset_name))


def plot_gallery(runs: Sequence[LoadedRun], dataset: Any, indices: Sequence[int], scores: Sequence[np.ndarray],
                 focus: str | None, path: Path) -> Path:  # fmt: skip
    """Image / ground truth / each prediction for the images where the configurations disagree most."""
    import cv2
    from PIL import Image

    from itaclip_core import vis
    from itaclip_core.inference.preprocess import read_image_bgr

    palette = _palette(dataset.name, dataset.num_classes)
    columns = 2 + len(runs)
    figure = _figure(2.6 * columns, 2.4 * len(indices) + 0.4)
    focus_id = dataset.class_names.index(focus) if focus else None
    for row, index in enumerate(indices):
        sample = dataset.samples[index]
        image = cv2.cvtColor(read_image_bgr(sample.image_path), cv2.COLOR_BGR2RGB)
        gt = dataset.load_label(index)
        panels = [(image, sample.name), (vis.colorize(gt, palette, dataset.ignore_index), "ground truth")]
        for run, score in zip(runs, scores):
            pred = np.array(Image.open(run.folder / PREDS_DIR / f"{sample.name}.png"))
            shown = "-" if not math.isfinite(score[index]) else f"{score[index]:.1f}"
            what = f"{focus} IoU" if focus else "mIoU"
            panels.append((vis.colorize(pred, palette, None), f"{run.name}\n{what} {shown}"))
        for column, (picture, title) in enumerate(panels):
            axes = figure.add_subplot(len(indices), columns, row * columns + column + 1)
            axes.imshow(picture)
            if focus_id is not None and column >= 1:
                labels = gt if column == 1 else np.array(Image.open(runs[column - 2].folder / PREDS_DIR /
                                                                    f"{sample.name}.png"))  # fmt: skip
                mask = (labels == focus_id).astype(float)
                if mask.any():
                    axes.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
            axes.set_title(title, fontsize=7)
            axes.axis("off")
    figure.suptitle("where the configurations disagree most" + (f" on {focus} (white: its outline)" if focus else ""),
                    fontsize=9)  # fmt: skip
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------ the report
def build_report(
    out_dir: str | Path,
    focus: str | None = None,
    baseline: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    gallery: int = 4,
    top_classes: int = 10,
    figures: bool = True,
) -> dict[str, Any]:
    """Analyse a finished comparison and write `results.json`, `results.md` and `figures/` into its directory.

    Args:
        out_dir: the comparison directory (`itaclip compare --out`).
        focus: a class for the focus analysis (default: the one the comparison was run with, if any).
        baseline: the configuration the others are paired with (default: the first).
        resamples: bootstrap resamples of the mIoU difference.
        seed: seed of the bootstrap.
        gallery: images in the focus gallery (0: none).
        top_classes: rows of the "differ most" table.
        figures: draw the figures (needs matplotlib).

    Returns:
        The report (the content of results.json).
    """
    from itaclip_core.data.registry import get_dataset

    out_dir = Path(out_dir)
    plan = load_plan(out_dir)
    dataset = get_dataset(plan["dataset"], plan["data_root"])
    runs = load_runs(out_dir, plan, dataset)
    class_names = list(dataset.class_names)
    focus = focus if focus is not None else plan.get("focus")
    if focus is not None:
        focus = resolve_class(focus, class_names, f"focus class {focus!r}")
    names = [run.name for run in runs]
    baseline = baseline or names[0]
    if baseline not in names:
        raise CompareError(f"baseline {baseline!r} is not a configuration of this comparison: {', '.join(names)}")
    weights_ids = sorted({run.results["weights_id"] for run in runs})
    figures_dir = out_dir / FIGURES_DIR
    written: dict[str, str] = {}
    subset = plan.get("num_samples") is not None and plan["num_images"] < len(dataset)

    rows = []
    for run in runs:
        published = published_result(run.preset)
        comparable = bool(published) and not run.overrides and not subset and is_reference_weights(weights_ids[0])
        rows.append({
            "name": run.name, "preset": run.preset, "overrides": run.overrides,
            "mIoU": run.results["mIoU"], "mAcc": run.results["mAcc"], "aAcc": run.results["aAcc"],
            "published_mIoU": published.miou if published else None,
            "difference": (run.results["mIoU"] - published.miou) if published and run.results["mIoU"] is not None
            else None,
            "published": published.to_dict() if published else None,
            "comparable": comparable,
        })  # fmt: skip

    base = runs[names.index(baseline)]
    pairs = []
    for run in runs:
        if run is base:
            continue
        paired = paired_differences(base.counts, run.counts)
        paired["per_image"] = paired["per_image"].tolist()
        boot = bootstrap_miou_difference(base.counts, run.counts, resamples=resamples, seed=seed)
        pairs.append({"name": run.name, "baseline": baseline, "bootstrap": boot, **paired})

    iou = np.stack([run.iou for run in runs])  # (C, K)
    differ = most_different_classes(iou, class_names, top=top_classes)
    for row in differ:
        row["best"], row["worst"] = names[row["best"]], names[row["worst"]]
        row["IoU"] = {name: float(value) for name, value in zip(names, iou[:, class_names.index(row["class"])])}

    focus_report = None
    if focus is not None:
        c = class_names.index(focus)
        per_config = []
        focus_scores = []
        for run in runs:
            counts = run.counts
            totals = [getattr(counts, key).sum(0) for key in ("intersect", "union", "pred", "label")]
            values = per_image_iou(counts)[:, c]
            focus_scores.append(values)
            present = values[np.isfinite(values)]
            per_config.append({
                "name": run.name, **class_figures(*totals, c),
                **confusions(counts.confusion, c, class_names),
                "confusion_images_missing": counts.without_confusion,
                "per_image": {"images": int(present.size),
                              "median": float(np.median(present)) if present.size else None,
                              "mean": float(present.mean()) if present.size else None,
                              "zero": int((present == 0).sum())},
            })  # fmt: skip
        spread = disagreement(focus_scores)
        order = [int(i) for i in np.argsort(-spread, kind="stable") if np.isfinite(spread[i])][:gallery]
        focus_report = {
            "class": focus,
            "configurations": per_config,
            "disagreement": [{"image": runs[0].counts.names[i], "index": i, "spread": float(spread[i]),
                              "IoU": {run.name: float(s[i]) for run, s in zip(runs, focus_scores)}}
                             for i in order],  # fmt: skip
        }
    if figures:
        written["main"] = str(plot_main(runs, rows, figures_dir / "compare_miou.png"))
        written["heatmap"] = str(plot_heatmap(runs, class_names, figures_dir / "compare_per_class_iou.png"))
        if pairs:
            written["paired"] = str(plot_paired(pairs, figures_dir / "compare_paired.png"))
        if focus_report is not None:
            slug = _slug(focus)
            written["focus_distribution"] = str(plot_focus_distribution(
                runs, focus_scores, focus, figures_dir / f"compare_focus_{slug}_per_image.png"))  # fmt: skip
            indices = [entry["index"] for entry in focus_report["disagreement"]]
            have_preds = all((run.folder / PREDS_DIR).is_dir() for run in runs)
            if indices and have_preds:
                written["focus_gallery"] = str(plot_gallery(runs, dataset, indices, focus_scores, focus,
                                                            figures_dir / f"compare_focus_{slug}_gallery.png"))
            elif not have_preds:
                focus_report["gallery_note"] = "no gallery: the predictions were not saved (--no-preds)"
    report = {
        "dataset": {"name": dataset.name, "title": dataset.spec.title, "root": str(dataset.root),
                    "num_classes": dataset.num_classes},  # fmt: skip
        "num_images": plan["num_images"],
        "num_samples": plan.get("num_samples"),
        "dataset_images": len(dataset),
        "weights_id": weights_ids[0] if len(weights_ids) == 1 else weights_ids,
        "configurations": rows,
        "baseline": baseline,
        "paired": pairs,
        "class_names": class_names,
        "per_class_iou": {name: [float(v) for v in row] for name, row in zip(names, iou)},
        "per_image_miou": {run.name: per_image_miou(run.counts).tolist() for run in runs},
        "image_names": runs[0].counts.names,
        "differ_most": differ,
        "focus": focus_report,
        "figures": written,
    }
    report = _clean(report)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", format_markdown(report))
    return report


def markdown_sections(report: dict[str, Any]) -> dict[str, str]:
    """The report's Markdown by section: `summary`, `main`, `paired`, `per_class`, `differ_most`, `focus`,
    `figures` (a section without content is an empty string)."""
    dataset = report["dataset"]
    subset = (f"the first {report['num_images']} of {report['dataset_images']} images"
              if report["num_images"] < report["dataset_images"] else f"all {report['num_images']} images")  # fmt: skip
    weights = report["weights_id"]
    weights_text = weights_line(weights) if isinstance(weights, str) else "weights: " + ", ".join(
        weights_line(w) for w in weights)  # fmt: skip
    sections = {"summary": f"{len(report['configurations'])} configurations on {subset} of `{dataset['name']}` at "
                           f"`{dataset['root']}`; {weights_text}."}  # fmt: skip
    lines = ["| configuration | preset | settings changed | mIoU | published mIoU | difference | mAcc | aAcc |",
             "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in report["configurations"]:
        mark = "" if row["comparable"] or row["published_mIoU"] is None else " *"
        lines.append(f"| {row['name']} | `{row['preset']}` | {', '.join(f'`{o}`' for o in row['overrides']) or '-'} "
                     f"| {_fmt(row['mIoU'])} | {_fmt(row['published_mIoU'])}{mark} | "
                     f"{_fmt(row['difference'], signed=True)}{mark} | {_fmt(row['mAcc'])} | {_fmt(row['aAcc'])} |")
    lines += ["", "Measured as MMSegmentation's IoUMetric (percent). Published numbers are for OpenAI's ViT-B/16 on "
              "the full validation set" + ("; * marks rows measured otherwise (changed settings, a subset of the "
              "images or other weights), whose difference is not a reproduction check" if any(
                  not r["comparable"] and r["published_mIoU"] is not None for r in report["configurations"]) else "")
              + "."]  # fmt: skip
    sources = {row["published"]["source"]: row["published"] for row in report["configurations"] if row["published"]}
    if sources:
        lines += ["", "Sources of the published numbers:", ""]
        for source in sources.values():
            note = f" {source['note']}" if source.get("note") else ""
            lines.append(f"- {source['where']} ({source['kind']}): <{source['url']}>.{note}")
    sections["main"] = "\n".join(lines)
    lines = []
    if report["paired"]:
        level = int(round(report["paired"][0]["bootstrap"]["level"] * 100))
        lines += [f"| configuration | mIoU difference vs {report['baseline']} | {level}% bootstrap CI | "
                  "images better / worse / equal | mean per-image difference |", "|---|---:|---|---|---:|"]
        for pair in report["paired"]:
            boot = pair["bootstrap"]
            lines.append(f"| {pair['name']} | {_fmt(boot['difference'], True)} | [{_fmt(boot['low'], True)}, "
                         f"{_fmt(boot['high'], True)}] | {pair['better']} / {pair['worse']} / {pair['equal']} | "
                         f"{_fmt(pair['mean'], True)} |")  # fmt: skip
        lines += ["", f"The interval resamples the images with replacement "
                  f"({report['paired'][0]['bootstrap']['resamples']} resamples, the same images for both "
                  "configurations) and recomputes both dataset mIoUs; an interval that contains 0 does not tell the "
                  "two apart on these images."]  # fmt: skip
    sections["paired"] = "\n".join(lines)
    names = [row["name"] for row in report["configurations"]]
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for j, name in enumerate(report["class_names"]):
        lines.append(f"| {name} | " + " | ".join(_fmt(report["per_class_iou"][c][j]) for c in names) + " |")
    sections["per_class"] = "\n".join(lines)
    lines = []
    if report["differ_most"]:
        lines += ["| class | spread (points) | best | worst |", "|---|---:|---|---|"]
        for row in report["differ_most"]:
            lines.append(f"| {row['class']} | {_fmt(row['spread'])} | {row['best']} | {row['worst']} |")
    sections["differ_most"] = "\n".join(lines)
    lines = []
    focus = report.get("focus")
    if focus:
        lines += ["| configuration | IoU | precision | recall | its pixels predicted as | predicted as it instead of | "
                  "images | median per-image IoU |", "|---|---:|---:|---:|---|---|---:|---:|"]  # fmt: skip
        for row in focus["configurations"]:
            missed = ", ".join(f"{c['class']} {c['share']:.1f}%" for c in row["predicted_as"][:3]) or "-"
            false = ", ".join(f"{c['class']} {c['share']:.1f}%" for c in row["mistaken_for_it"][:3]) or "-"
            lines.append(f"| {row['name']} | {_fmt(row['IoU'])} | {_fmt(row['precision'])} | {_fmt(row['recall'])} "
                         f"| {missed} | {false} | {row['per_image']['images']} | "
                         f"{_fmt(row['per_image']['median'])} |")  # fmt: skip
        lines += ["", "Shares: of the focus class's labelled pixels (predicted as), of its predicted pixels (predicted "
                  "as it instead of); images: those where it is labelled or predicted."]  # fmt: skip
        missing = max(row["confusion_images_missing"] for row in focus["configurations"])
        if missing:
            lines += ["", f"{missing} images have records without a confusion matrix (written by an older version): "
                      "the confusions leave them out."]  # fmt: skip
        if focus["disagreement"]:
            lines += ["", "Images where the configurations disagree most on it (spread of its per-image IoU): "
                      + ", ".join(f"`{d['image']}` ({d['spread']:.1f})" for d in focus["disagreement"]) + "."]
        if focus.get("gallery_note"):
            lines += ["", focus["gallery_note"] + "."]
    sections["focus"] = "\n".join(lines)
    sections["figures"] = "\n".join(f"- {key}: ![{key}]({FIGURES_DIR}/{Path(path).name})"
                                    for key, path in report["figures"].items())  # fmt: skip
    return sections


_TITLES = {"main": "Main table", "paired": "Paired differences", "per_class": "Per class (IoU)",
           "differ_most": "Classes where the configurations differ most", "figures": "Figures"}  # fmt: skip


def format_markdown(report: dict[str, Any]) -> str:
    """results.md of a comparison report."""
    sections = markdown_sections(report)
    lines = [f"# Comparison on {report['dataset']['title']}", "", sections["summary"]]
    for key in ("main", "paired", "per_class", "differ_most", "focus", "figures"):
        if sections[key]:
            title = f"Focus: {report['focus']['class']}" if key == "focus" else _TITLES[key]
            lines += ["", f"## {title}", "", sections[key]]
    return "\n".join(lines) + "\n"
