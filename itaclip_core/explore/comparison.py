"""Comparisons in notebooks: configurations from notebook parameters, the person study's steps, error maps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from itaclip_core.evaluation.compare import (
    ComparePlan,
    Configuration,
    SharedResources,
    configurations_from_presets,
    plan_comparison,
    read_configurations,
    run_comparison,
    with_common_overrides,
)
from itaclip_core.evaluation.comparison_report import build_report
from itaclip_core.evaluation.records import read_records
from itaclip_core.explore.evaluation import ABLATION_OFF, ablation_label
from itaclip_core.explore.runs import NotebookRun, resolve_path
from itaclip_core.explore.settings import notebook_config, override_list
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import PRESETS, apply_overrides

__all__ = [
    'notebook_configurations', 'person_steps', 'run_notebook_comparison', 'images_richest_in', 'class_query_patch',
    'error_map', 'ERROR_COLOURS',
]

# error map colours: right (the class where it is labelled and predicted), missed, false alarm, ignored
ERROR_COLOURS = {"hit": (40, 170, 60), "missed": (220, 40, 40), "false": (40, 90, 230), "ignored": (0, 0, 0)}


def notebook_configurations(compare: str | Sequence[str], overrides: str | Sequence[str] | None = None
                            ) -> list[Configuration]:  # fmt: skip
    """The configurations a notebook compares: a YAML/JSON file of configurations, or presets (a comma-separated
    string or a list), each with the notebook's OVERRIDES before its own."""
    if isinstance(compare, str) and Path(compare).suffix.lower() in (".yaml", ".yml", ".json"):
        base = read_configurations(resolve_path(compare, what="the configurations file"))
    else:
        base = configurations_from_presets(compare)
    return with_common_overrides(base, override_list(overrides))


def person_steps(itaclip_preset: str, sclip_preset: str, extra_presets: Sequence[str] = (),
                 extra_settings: Sequence[str] = (), overrides: str | Sequence[str] | None = None
                 ) -> tuple[list[Configuration], list[str]]:  # fmt: skip
    """The steps of the person study and notes on the steps left out.

    The steps: SCLIP; ITACLIP's pipeline with its architecture, texts and image engineering off (the SCLIP-like
    baseline of the paper's ablation); then A, T and I switched on one after the other (the last is the full
    preset); then each extra preset (another method on the same benchmark) and each extra `key=value` setting added
    to the full ITACLIP preset, one at a time. An extra preset or setting this installation does not have is left
    out with a note, so the study runs before the methods that provide them are installed.

    Args:
        itaclip_preset: an ITACLIP preset of the benchmark.
        sclip_preset: the SCLIP preset of the benchmark (left out with a note when missing).
        extra_presets: further presets, e.g. "naclip_voc21".
        extra_settings: further settings on top of ITACLIP, e.g. "refine=...".
        overrides: OVERRIDES applied to every step first.
    """
    notes: list[str] = []
    steps: list[Configuration] = []
    if sclip_preset in PRESETS:
        steps.append(Configuration("SCLIP", sclip_preset))
    else:
        notes.append(f"SCLIP step left out: no preset {sclip_preset!r}")
    if PRESETS[itaclip_preset].method != "itaclip":
        raise ValueError(f"the person study starts from an ITACLIP preset, got {itaclip_preset}")
    for row in ("", "A", "AT", "ATI"):
        off = [item for component in "ATI" if component not in row for item in ABLATION_OFF[component]]
        label = "ITACLIP" if row == "ATI" else f"ITACLIP {ablation_label(row)}"
        steps.append(Configuration(label, itaclip_preset, tuple(off)))
    for preset in extra_presets:
        if preset in PRESETS:
            steps.append(Configuration(preset, preset))
        else:
            notes.append(f"{preset} left out: no such preset in this installation (its method is not installed)")
    for setting in extra_settings:
        try:
            apply_overrides(PRESETS[itaclip_preset], [setting])
        except ValueError as error:
            notes.append(f"ITACLIP + {setting} left out: {error}")
            continue
        steps.append(Configuration(f"ITACLIP + {setting}", itaclip_preset, (setting,)))
    return with_common_overrides(steps, override_list(overrides)), notes


def run_notebook_comparison(run: NotebookRun, name: str, configurations: Sequence[Configuration], model: CLIP,
                            data_root: str | Path, num_images: int | None, focus: str | None,
                            resamples: int = 1000, gallery: int = 4) -> tuple[ComparePlan, dict[str, Any]]:
    """Run a comparison into `OUT_DIR/<name>` with the notebook's model, write its report and copy the report's
    figures under the notebook's stable names (`<NN>_<key>.png`).

    Returns:
        The plan and the report (as `build_report` returns it; its `figures` hold the notebook's figure paths).
    """
    settings = {c.name: notebook_config(c.preset, list(c.overrides)) for c in configurations}
    weights = model.weights_id
    plan = plan_comparison(configurations, resolve_path(data_root, what="DATA_ROOT"), run.out_dir / name, weights,
                           num_images, focus, settings)  # fmt: skip
    resources = SharedResources(device=str(model.device))
    resources.models[weights] = model
    run_comparison(plan, resources=resources, workers=0, progress=True)
    report = build_report(plan.out_dir, focus=focus, resamples=resamples, gallery=gallery)
    prefix = run.notebook[:2]
    for key, path in list(report["figures"].items()):
        target = run.figure_path(f"{prefix}_{key}.png")
        shutil.copyfile(path, target)
        report["figures"][key] = str(target)
    return plan, report


def error_map(pred: np.ndarray, gt: np.ndarray, class_id: int, ignore_index: int | None = 255) -> np.ndarray:
    """(H, W, 3) uint8 errors of one class: green where it is labelled and predicted, red where it is labelled but
    missed, blue where it is predicted but not labelled, black where the label is ignored, white elsewhere."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in size")
    out = np.full((*gt.shape, 3), 255, dtype=np.uint8)
    labelled, predicted = gt == class_id, pred == class_id
    out[labelled & predicted] = ERROR_COLOURS["hit"]
    out[labelled & ~predicted] = ERROR_COLOURS["missed"]
    out[~labelled & predicted] = ERROR_COLOURS["false"]
    if ignore_index is not None:
        out[gt == ignore_index] = ERROR_COLOURS["ignored"]
    return out


def images_richest_in(plan: ComparePlan, class_name: str, count: int) -> tuple[list[int], bool]:
    """The `count` evaluated images with the most labelled pixels of a class (from the records), and whether any
    image has it at all (if none does, the first images are returned)."""
    dataset = plan.dataset
    class_id = dataset.class_names.index(class_name)
    names = [sample.name for sample in dataset.samples[: plan.num_images]]
    records = read_records(plan.folder(plan.configurations[0]), dataset.num_classes, names)
    pixels = {index: record.label[class_id] for index, record in records.items()}
    ranked = [i for i in sorted(pixels, key=lambda i: (-pixels[i], i)) if pixels[i] > 0][:count]
    if ranked:
        return ranked, True
    return sorted(records)[:count], False


def class_query_patch(label: np.ndarray, class_id: int, resized: tuple[int, int], grid: tuple[int, int],
                      patch_size: int) -> tuple[int, int]:  # fmt: skip
    """The patch (row, col) of the resized image over the centroid of a class's labelled pixels (the image centre
    when it has none).

    Args:
        label: (H, W) label map at the original size.
        class_id: the class.
        resized: (h, w) of the resized image the patches are taken from.
        grid: (rows, cols) of its patch grid.
        patch_size: side of a patch in pixels.
    """
    ys, xs = np.nonzero(label == class_id)
    height, width = label.shape
    y, x = (float(ys.mean()), float(xs.mean())) if ys.size else (height / 2.0, width / 2.0)
    row = int(y * resized[0] / height) // patch_size
    col = int(x * resized[1] / width) // patch_size
    return min(max(row, 0), grid[0] - 1), min(max(col, 0), grid[1] - 1)
