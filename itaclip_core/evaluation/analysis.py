"""Per-class and per-image analysis of evaluation records: focus-class figures, paired differences, bootstrap.

Everything here works on the per-image counts the runner records (`ImageRecord`): the four IoU histograms and the
sparse confusion matrix. Summed over images they give exactly the benchmark's figures; per image they give the
per-image IoU, and resampled they give a bootstrap distribution of the dataset-level mIoU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from itaclip_core.evaluation.records import ImageRecord


@dataclass
class ImageCounts:
    """The per-image counts of one configuration, in image order."""

    names: list[str]  # sample names
    intersect: np.ndarray  # (n, K) int64
    union: np.ndarray  # (n, K) int64
    pred: np.ndarray  # (n, K) int64 predicted pixels per class
    label: np.ndarray  # (n, K) int64 labelled pixels per class
    confusion: np.ndarray  # (K, K) int64 summed confusion matrix (rows = label, columns = prediction)
    without_confusion: int  # images whose record has no confusion matrix (written by an older version)

    @property
    def num_images(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        return int(self.intersect.shape[1])


def image_counts(records: Mapping[int, ImageRecord], num_classes: int) -> ImageCounts:
    """Stack the records of one run (index -> record) in image order."""
    order = sorted(records)
    rows = [records[i] for i in order]

    def stack(key: str) -> np.ndarray:
        if not rows:
            return np.zeros((0, num_classes), dtype=np.int64)
        return np.array([getattr(r, key) for r in rows], dtype=np.int64)  # (n, K)

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    missing = 0
    for record in rows:
        if record.confusion is None:
            missing += 1
            continue
        for label, pred, count in record.confusion:
            confusion[label, pred] += count
    return ImageCounts([r.name for r in rows], stack("intersect"), stack("union"), stack("pred"), stack("label"),
                       confusion, missing)  # fmt: skip


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def miou(intersect: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU in percent of summed counts (..., K): the mean over classes with a non-zero union (NaN if none)."""
    return _nanmean(_ratio(intersect, union) * 100.0, axis=-1)


def per_image_iou(counts: ImageCounts) -> np.ndarray:
    """(n, K) IoU in percent of every class in every image; NaN where the class is neither labelled nor predicted."""
    return _ratio(counts.intersect, counts.union) * 100.0


def per_image_miou(counts: ImageCounts) -> np.ndarray:
    """(n,) the mean IoU (percent) of each image over the classes labelled or predicted in it."""
    return np.asarray(_nanmean(per_image_iou(counts), axis=1), dtype=np.float64)


def class_figures(intersect: np.ndarray, union: np.ndarray, pred: np.ndarray, label: np.ndarray,
                  index: int) -> dict[str, float]:  # fmt: skip
    """IoU, precision and recall (percent; NaN when undefined) and the pixel counts of class `index`.

    The arrays are per-class totals (K,): IoU = I / U, precision = I / predicted pixels, recall = I / labelled
    pixels (the class's Acc in MMSegmentation's terms).
    """
    i, u, p, l = (int(np.asarray(a)[index]) for a in (intersect, union, pred, label))
    return {
        "IoU": i / u * 100.0 if u else math.nan,
        "precision": i / p * 100.0 if p else math.nan,
        "recall": i / l * 100.0 if l else math.nan,
        "intersect": i,
        "union": u,
        "predicted": p,
        "labelled": l,
    }


def confusions(matrix: np.ndarray, index: int, class_names: Sequence[str], top: int = 5) -> dict[str, list]:
    """The classes class `index` is confused with, from a confusion matrix (rows = label, columns = prediction).

    Returns:
        `predicted_as`: where its labelled pixels went instead (its misses), as (class, pixels, share of its
        labelled pixels); `mistaken_for_it`: which labelled classes were predicted as it (its false positives), as
        (class, pixels, share of its predicted pixels). Largest first, at most `top` each, zero counts left out.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    row, column = matrix[index].copy(), matrix[:, index].copy()
    row_total, column_total = int(row.sum()), int(column.sum())
    row[index] = column[index] = 0

    def ranked(values: np.ndarray, total: int) -> list[dict[str, Any]]:
        order = np.argsort(-values, kind="stable")[:top]
        return [{"class": class_names[j], "pixels": int(values[j]), "share": values[j] / total * 100.0}
                for j in order if values[j] > 0]  # fmt: skip

    return {"predicted_as": ranked(row, row_total), "mistaken_for_it": ranked(column, column_total)}


def bootstrap_miou_difference(a: ImageCounts, b: ImageCounts, resamples: int = 1000, seed: int = 0,
                              level: float = 0.95, chunk: int = 256) -> dict[str, Any]:  # fmt: skip
    """Paired bootstrap of the dataset mIoU difference b - a (percentage points) over images.

    Each resample draws n images with replacement (the same draw for both configurations), sums their counts and
    computes both mIoUs exactly as the benchmark does; the interval is the percentile interval of the differences.

    Returns:
        `difference` (on all images), `low`, `high` (the `level` interval), `level`, `resamples`, `seed`,
        `share_positive` (share of resamples where b beats a) and `num_images`.
    """
    if a.names != b.names:
        raise ValueError("the two configurations were evaluated on different images; pair the same image list")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n = a.num_images
    if n == 0:
        raise ValueError("no images to resample")
    observed = float(miou(b.intersect.sum(0), b.union.sum(0)) - miou(a.intersect.sum(0), a.union.sum(0)))
    rng = np.random.default_rng(seed)
    stacked = np.concatenate([a.intersect, a.union, b.intersect, b.union], axis=1).astype(np.float64)  # (n, 4K)
    k = a.num_classes
    differences = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)  # (size, n) draws per image
        sums = weights @ stacked  # (size, 4K) exact: integer counts far below 2^53
        a_miou = miou(sums[:, :k], sums[:, k:2 * k])
        b_miou = miou(sums[:, 2 * k:3 * k], sums[:, 3 * k:])
        differences[start:start + size] = b_miou - a_miou
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(differences, [tail, 1.0 - tail])
    return {
        "difference": observed,
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "share_positive": float(np.mean(differences > 0)),
        "num_images": n,
    }


def paired_differences(a: ImageCounts, b: ImageCounts) -> dict[str, Any]:
    """Per-image mIoU of b minus a (percentage points) and how many images each configuration wins."""
    if a.names != b.names:
        raise ValueError("the two configurations were evaluated on different images; pair the same image list")
    diff = per_image_miou(b) - per_image_miou(a)  # (n,)
    valid = diff[~np.isnan(diff)]
    return {
        "per_image": diff,
        "mean": float(valid.mean()) if valid.size else math.nan,
        "median": float(np.median(valid)) if valid.size else math.nan,
        "better": int((valid > 0).sum()),
        "worse": int((valid < 0).sum()),
        "equal": int((valid == 0).sum()),
    }


def disagreement(per_image: Sequence[np.ndarray]) -> np.ndarray:
    """(n,) spread (max - min over configurations) of a per-image score; NaN scores are left out, -inf if <2."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in per_image])  # (C, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanmax(stacked, axis=0) - np.nanmin(stacked, axis=0)
    valid = (~np.isnan(stacked)).sum(axis=0) >= 2
    return np.where(valid, spread, -np.inf)


def most_different_classes(iou: np.ndarray, class_names: Sequence[str], top: int = 10) -> list[dict[str, Any]]:
    """Classes whose IoU varies most over configurations (those that vary at all): iou is (C, K) percent (NaN:
    absent); each row names the class, its spread and the indices of the best and worst configuration."""
    iou = np.asarray(iou, dtype=np.float64)
    spread = disagreement(list(iou))  # over configurations, per class
    order = [j for j in np.argsort(-spread, kind="stable") if np.isfinite(spread[j]) and spread[j] > 0][:top]
    rows = []
    for j in order:
        column = iou[:, j]
        rows.append({"class": class_names[j], "spread": float(spread[j]), "best": int(np.nanargmax(column)),
                     "worst": int(np.nanargmin(column))})  # fmt: skip
    return rows
