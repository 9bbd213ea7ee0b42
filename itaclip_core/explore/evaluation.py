"""Evaluation on a dataset subset, the I / T / A ablation of the ITACLIP paper and the auxiliary-text sweep."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm  # text bars: they also render in HTML reports and headless runs

from itaclip_core.data.base import SegDataset
from itaclip_core.inference.preprocess import PreparedImage, prepare_image
from itaclip_core.metrics import IoUAccumulator
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import SegmentorConfig, apply_overrides
from itaclip_core.segmentor import Segmentor
from itaclip_core.explore.image_side import finish_prediction, logits_from_features, window_features



__all__ = [
    'LabelledImage', 'load_subset', 'scores', 'evaluate_subset', 'evaluate_logits', 'ABLATION_OFF', 'ABLATION_ROWS',
    'ablation_label', 'ablation_configs', 'run_ablation', 'sweep_aux_coef',
]

class LabelledImage(NamedTuple):
    """A prepared dataset image and its label map."""

    prepared: PreparedImage
    label: np.ndarray  # (H0, W0) uint8, 255 ignored


def load_subset(dataset: SegDataset, num_images: int | None, config: SegmentorConfig,
                progress: bool = True) -> list[LabelledImage]:  # fmt: skip
    """The first `num_images` images of a dataset (None: all), prepared as `config` expects (its short and long
    side), with their labels."""
    count = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    if count < 1:
        raise ValueError(f"no images to evaluate: NUM_IMAGES is {num_images} and {dataset.name} has {len(dataset)}")
    return [
        LabelledImage(prepare_image(dataset[i].image_path, config.short_side, config.long_side, name=dataset[i].name),
                      dataset.load_label(i))
        for i in tqdm(range(count), desc="load images", disable=not progress, leave=False)
    ]  # fmt: skip


def scores(accumulator: IoUAccumulator, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (percentages) and the per-class IoU of summed counts."""
    result = accumulator.results(class_names)
    return {key: result[key] for key in ("mIoU", "mAcc", "aAcc", "IoU", "class_names", "num_images")}


def evaluate_subset(segmentor: Segmentor, dataset: SegDataset, subset: Sequence[LabelledImage],
                    progress: bool = True, desc: str = "evaluate") -> dict[str, Any]:  # fmt: skip
    """Score a segmentor on preloaded images of `dataset` (see `load_subset`); adds `seconds_per_image`."""
    accumulator = IoUAccumulator(dataset.num_classes, dataset.ignore_index)
    started = time.perf_counter()
    for item in tqdm(subset, desc=desc, disable=not progress, leave=False):
        accumulator.update(segmentor.predict_prepared(item.prepared).labels, item.label)
    result = scores(accumulator, dataset.class_names)
    result["seconds_per_image"] = (time.perf_counter() - started) / max(len(subset), 1)
    return result


def evaluate_logits(segmentor: Segmentor, dataset: SegDataset, subset: Sequence[LabelledImage],
                    logits_fn: Callable[[PreparedImage], Mapping[str, torch.Tensor]],
                    progress: bool = True) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Score several ways of computing the similarities on the same images in one pass.

    Args:
        segmentor: supplies the classifier, PAMR and post-processing settings (`finish_prediction`).
        dataset, subset: the benchmark and its preloaded images (`load_subset`).
        logits_fn: per prepared image, name -> per-query similarities (Q, H0, W0); the same names every image.
    Returns:
        name -> mIoU, mAcc, aAcc, per-class IoU.
    """
    accumulators: dict[str, IoUAccumulator] = {}
    with torch.no_grad():
        for item in tqdm(subset, desc="evaluate", disable=not progress, leave=False):
            for name, logits in logits_fn(item.prepared).items():
                if name not in accumulators:
                    accumulators[name] = IoUAccumulator(dataset.num_classes, dataset.ignore_index)
                accumulators[name].update(finish_prediction(segmentor, item.prepared, logits).labels, item.label)
    return {name: scores(acc, dataset.class_names) for name, acc in accumulators.items()}


# What switches each ITACLIP component off: Image engineering, Text enhancement, Architectural changes.
ABLATION_OFF: dict[str, tuple[str, ...]] = {
    "I": ("image_engineering=false",),
    "T": ("aux_file=none", "aux_coef=0"),
    "A": ("fuse_blocks=none", "last_mlp=true"),  # SCLIP's last block: self-self attention, MLP kept, no fusion
}
# Rows of the paper's ablation table: the components each row switches on.
ABLATION_ROWS: tuple[str, ...] = ("", "A", "AT", "AI", "ATI")


def ablation_label(components: str) -> str:
    """The row label of a set of components: "baseline" or "+A+T+I"."""
    return "baseline" if not components else "".join(f"+{c}" for c in components)


def ablation_configs(base: SegmentorConfig,
                     rows: Sequence[str] = ABLATION_ROWS) -> dict[str, tuple[SegmentorConfig, list[str]]]:  # fmt: skip
    """The ablation rows as settings built from an ITACLIP preset: row label -> (config, the overrides applied).

    Args:
        base: an ITACLIP config (with all three components on).
        rows: per row, the components switched on (letters of "ITA"; "" is the SCLIP-like baseline).
    """
    if base.method != "itaclip":
        raise ValueError(f"the ablation starts from an ITACLIP preset, got {base.name} ({base.method})")
    out = {}
    for row in rows:
        unknown = set(row) - set(ABLATION_OFF)
        if unknown:
            raise ValueError(f"ablation row {row!r}: unknown components {sorted(unknown)}; use letters of 'ITA'")
        overrides = [item for component in "ATI" if component not in row for item in ABLATION_OFF[component]]
        config = apply_overrides(base, overrides).replace(name=f"{base.name}{ablation_label(row)}")
        out[ablation_label(row)] = (config, overrides)
    return out


def run_ablation(model: CLIP, base: SegmentorConfig, dataset: SegDataset, num_images: int | None,
                 rows: Sequence[str] = ABLATION_ROWS, cache_dir: str | Path | None | bool = True,
                 progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Evaluate every ablation row on the first `num_images` images; one dict per row (label, components,
    overrides, mIoU, mAcc, aAcc, per-class IoU, seconds per image)."""
    subset = load_subset(dataset, num_images, base, progress)
    results = []
    for label, (config, overrides) in ablation_configs(base, rows).items():
        segmentor = Segmentor(model, config, cache_dir=cache_dir)
        row = evaluate_subset(segmentor, dataset, subset, progress, desc=label)
        results.append({"row": label, "components": label.replace("+", "") if label != "baseline" else "",
                        "overrides": overrides, **row})  # fmt: skip
    return results


def sweep_aux_coef(segmentor: Segmentor, dataset: SegDataset, subset: Sequence[LabelledImage],
                   coefs: Sequence[float], aux_files: Mapping[str, str | None],
                   progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """mIoU for each auxiliary file and mixing coefficient, computing the image side once per image.

    Args:
        segmentor: its config's classes are used; its classifier is restored afterwards.
        dataset, subset: the benchmark and its preloaded images (`load_subset`).
        coefs: aux_coef values.
        aux_files: label -> auxiliary-text file (under texts/ or a path).
    Returns:
        One dict per (file, coef): aux, aux_file, aux_coef, mIoU, mAcc, aAcc.
    """
    original = segmentor.classifier
    grid = [(label, path, float(c)) for label, path in aux_files.items() for c in coefs]
    classifiers = []
    for label, path, coef in grid:  # text embeddings are cached per text: each file is encoded once
        segmentor.set_classes(segmentor.config.classes, aux_file=path, aux_coef=coef)
        classifiers.append(segmentor.classifier)
    segmentor.classifier = original
    accumulators = [IoUAccumulator(dataset.num_classes, dataset.ignore_index) for _ in grid]
    with torch.no_grad():
        for item in tqdm(subset, desc="aux sweep", disable=not progress, leave=False):
            features, windows = window_features(segmentor, item.prepared)
            for accumulator, classifier in zip(accumulators, classifiers):
                logits = logits_from_features(features, windows, item.prepared, classifier.features)
                labels = finish_prediction(segmentor, item.prepared, logits, classifier).labels
                accumulator.update(labels, item.label)
    return [{"aux": label, "aux_file": path, "aux_coef": coef,
             **{k: v for k, v in scores(acc, dataset.class_names).items() if k in ("mIoU", "mAcc", "aAcc")}}
            for (label, path, coef), acc in zip(grid, accumulators)]  # fmt: skip


