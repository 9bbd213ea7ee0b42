"""mIoU exactly as MMSegmentation's `IoUMetric` defines it, with exact integer counts.

Per image, pixels whose label is the ignore index are dropped from both maps; then three histograms over the
classes 0..N-1 are taken: of the intersection (pixels where prediction == label), of the prediction and of the
label. A value outside 0..N-1 is not counted in the histogram of the map that holds it. The union is
`pred + label - intersection`. Summed over the dataset:

    IoU_c = I_c / U_c,  Acc_c = I_c / L_c,  aAcc = sum(I) / sum(L),
    mIoU = nanmean(IoU),  mAcc = nanmean(Acc)

A class with U_c = 0 (neither predicted nor present) has IoU NaN and is skipped by the mean; a class that is
predicted but absent from the labels has IoU 0. Figures are reported as percentages; MMSegmentation prints them
rounded to 2 decimals.

The counts here are int64 and exact. (MMSegmentation sums float32 histograms, which are exact only up to
2^24 pixels per class; the difference is far below the printed precision.)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence, Union

import numpy as np
import torch

LabelMap = Union[np.ndarray, torch.Tensor]


def _as_int_array(array: LabelMap, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} must be an integer label map, got dtype {array.dtype}; take the argmax first")
    return array


def intersect_and_union(
    pred: LabelMap, label: LabelMap, num_classes: int, ignore_index: int | None = 255
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four per-class histograms of one image, as `IoUMetric.intersect_and_union` computes them.

    Args:
        pred: predicted label map, any shape, integer dtype (numpy or torch).
        label: ground-truth label map of the same shape.
        num_classes: N; values outside 0..N-1 are not counted.
        ignore_index: label value whose pixels are dropped from both maps (None: drop nothing).

    Returns:
        (area_intersect, area_union, area_pred, area_label), each (N,) int64.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    pred_np = _as_int_array(pred, "prediction")
    label_np = _as_int_array(label, "label")
    if pred_np.shape != label_np.shape:
        raise ValueError(
            f"prediction shape {pred_np.shape} differs from label shape {label_np.shape}; predictions must be at "
            "the label's (original image) size"
        )
    pred_flat = pred_np.reshape(-1).astype(np.int64, copy=False)  # (P,)
    label_flat = label_np.reshape(-1).astype(np.int64, copy=False)  # (P,)
    if ignore_index is not None:
        keep = label_flat != ignore_index
        pred_flat, label_flat = pred_flat[keep], label_flat[keep]
    pred_valid = (pred_flat >= 0) & (pred_flat < num_classes)
    label_valid = (label_flat >= 0) & (label_flat < num_classes)
    area_pred = np.bincount(pred_flat[pred_valid], minlength=num_classes).astype(np.int64)
    area_label = np.bincount(label_flat[label_valid], minlength=num_classes).astype(np.int64)
    hits = pred_valid & (pred_flat == label_flat)
    area_intersect = np.bincount(pred_flat[hits], minlength=num_classes).astype(np.int64)
    area_union = area_pred + area_label - area_intersect
    return area_intersect, area_union, area_pred, area_label


def confusion_counts(
    pred: LabelMap, label: LabelMap, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """(N, N) int64 confusion matrix of one image: rows = label class, columns = predicted class.

    Pixels with the ignore label, or with either value outside 0..N-1, are not counted.
    """
    pred_flat = _as_int_array(pred, "prediction").reshape(-1).astype(np.int64)  # (P,)
    label_flat = _as_int_array(label, "label").reshape(-1).astype(np.int64)  # (P,)
    if pred_flat.shape != label_flat.shape:
        raise ValueError(f"prediction has {pred_flat.size} pixels but the label has {label_flat.size}")
    keep = (pred_flat >= 0) & (pred_flat < num_classes) & (label_flat >= 0) & (label_flat < num_classes)
    if ignore_index is not None:
        keep &= label_flat != ignore_index
    cells = label_flat[keep] * num_classes + pred_flat[keep]  # (K,) flat (label, pred) index
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator in float64, NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if values.size else math.nan


class IoUAccumulator:
    """Sums the IoUMetric histograms over images and reports IoU, Acc, mIoU, mAcc and aAcc."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255, track_confusion: bool = False) -> None:
        """Start empty counts.

        Args:
            num_classes: N, the number of evaluated classes.
            ignore_index: label value excluded from scoring (MMSegmentation's default 255; None for none).
            track_confusion: also accumulate the (N, N) confusion matrix.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.area_intersect = np.zeros(num_classes, dtype=np.int64)
        self.area_union = np.zeros(num_classes, dtype=np.int64)
        self.area_pred = np.zeros(num_classes, dtype=np.int64)
        self.area_label = np.zeros(num_classes, dtype=np.int64)
        self.num_images = 0
        self._confusion = np.zeros((num_classes, num_classes), dtype=np.int64) if track_confusion else None

    def update(self, pred: LabelMap, label: LabelMap) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Count one image; returns its four histograms (intersect, union, pred, label)."""
        counts = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.add(*counts)
        if self._confusion is not None:
            self._confusion += confusion_counts(pred, label, self.num_classes, self.ignore_index)
        return counts

    def add(
        self,
        area_intersect: Sequence[int] | np.ndarray,
        area_union: Sequence[int] | np.ndarray,
        area_pred: Sequence[int] | np.ndarray,
        area_label: Sequence[int] | np.ndarray,
        num_images: int = 1,
    ) -> None:
        """Add histograms computed elsewhere (a saved per-image record, another process's totals)."""
        arrays = []
        for name, values in (
            ("area_intersect", area_intersect),
            ("area_union", area_union),
            ("area_pred", area_pred),
            ("area_label", area_label),
        ):
            array = np.asarray(values)
            if array.shape != (self.num_classes,) or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(
                    f"{name} must hold {self.num_classes} integer counts, got shape {array.shape} ({array.dtype})"
                )
            arrays.append(array.astype(np.int64))
        self.area_intersect += arrays[0]
        self.area_union += arrays[1]
        self.area_pred += arrays[2]
        self.area_label += arrays[3]
        self.num_images += num_images

    def merge(self, other: "IoUAccumulator") -> "IoUAccumulator":
        """Add another accumulator's counts to this one (same classes and ignore index); returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge counts of {other.num_classes} classes (ignore {other.ignore_index}) into "
                f"{self.num_classes} classes (ignore {self.ignore_index})"
            )
        self.add(other.area_intersect, other.area_union, other.area_pred, other.area_label, other.num_images)
        if self._confusion is not None:
            if other._confusion is None:
                raise ValueError("the other accumulator did not track a confusion matrix")
            self._confusion += other._confusion
        return self

    @property
    def confusion_matrix(self) -> np.ndarray | None:
        """(N, N) int64 counts, rows = label, columns = prediction; None unless tracked."""
        return None if self._confusion is None else self._confusion.copy()

    def state(self) -> np.ndarray:
        """The counts as one (4, N) int64 array: intersect, union, pred, label (for all-reduce or saving)."""
        return np.stack([self.area_intersect, self.area_union, self.area_pred, self.area_label])  # (4, N)

    def load_state(self, state: np.ndarray, num_images: int) -> None:
        """Replace the counts by a (4, N) array from `state()` (e.g. after a sum over processes)."""
        state = np.asarray(state)
        if state.shape != (4, self.num_classes):
            raise ValueError(f"state must have shape (4, {self.num_classes}), got {state.shape}")
        state = state.astype(np.int64)
        self.area_intersect, self.area_union, self.area_pred, self.area_label = (s.copy() for s in state)
        self.num_images = int(num_images)

    def results(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The IoUMetric figures, as percentages.

        Returns:
            A dict with `mIoU`, `mAcc`, `aAcc` (floats, full precision, NaN when undefined), `IoU` and `Acc`
            (per-class lists, NaN where undefined), `rounded` (the same rounded to 2 decimals, as MMSegmentation
            prints them), `class_names`, `num_images`, `num_classes` and the summed `counts`.
        """
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for {self.num_classes} classes")
        iou = _ratio(self.area_intersect, self.area_union) * 100.0
        acc = _ratio(self.area_intersect, self.area_label) * 100.0
        total_label = int(self.area_label.sum())
        a_acc = self.area_intersect.sum() / total_label * 100.0 if total_label else math.nan
        summary = {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "aAcc": float(a_acc)}
        rounded: dict[str, Any] = {key: float(np.round(value, 2)) for key, value in summary.items()}
        rounded["IoU"] = [float(v) for v in np.round(iou, 2)]
        rounded["Acc"] = [float(v) for v in np.round(acc, 2)]
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return {
            **summary,
            "IoU": [float(v) for v in iou],
            "Acc": [float(v) for v in acc],
            "rounded": rounded,
            "class_names": names,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "counts": {
                "intersect": self.area_intersect.tolist(),
                "union": self.area_union.tolist(),
                "pred": self.area_pred.tolist(),
                "label": self.area_label.tolist(),
            },
        }


# --------------------------------------------------------------------------------------------------- boundaries
# Trimap widths (pixels) at which the boundary accuracy is reported.
DEFAULT_TRIMAP_WIDTHS = (3, 5, 10)


def boundary_band(label: LabelMap, width: int, ignore_index: int | None = 255) -> np.ndarray:
    """(H, W) bool: the scored pixels within `width` pixels (Chebyshev distance) of a label boundary.

    A pixel is on a boundary when one of its 8 neighbours inside the image holds another value; the ignore value
    counts as a value, so the edge of an ignored region (Pascal VOC's object outlines) is a boundary. The band is
    the boundary dilated by a (2 width + 1)-square, without the ignored pixels.
    """
    import cv2

    if isinstance(width, bool) or int(width) != width or width < 0:
        raise ValueError(f"trimap width is {width!r}: give a non-negative whole number of pixels")
    array = _as_int_array(label, "label")
    if array.ndim != 2:
        raise ValueError(f"label has shape {array.shape}: expected an (H, W) map")
    height, width_px = array.shape
    padded = np.pad(array.astype(np.int64), 1, mode="edge")  # edge padding: the image border is no boundary
    edge = np.zeros((height, width_px), dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                edge |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width_px] != array
    if width > 0:
        kernel = np.ones((2 * int(width) + 1, 2 * int(width) + 1), np.uint8)
        band = cv2.dilate(edge.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    else:
        band = edge
    if ignore_index is not None:
        band &= array != ignore_index
    return band


def trimap_counts(pred: LabelMap, label: LabelMap, widths: Sequence[int] = DEFAULT_TRIMAP_WIDTHS,
                  ignore_index: int | None = 255) -> np.ndarray:
    """(len(widths), 2) int64: per width, the correctly predicted pixels and all scored pixels of the band."""
    pred_np = _as_int_array(pred, "prediction")
    label_np = _as_int_array(label, "label")
    if pred_np.shape != label_np.shape:
        raise ValueError(f"prediction shape {pred_np.shape} differs from label shape {label_np.shape}")
    hits = pred_np == label_np
    rows = []
    for width in widths:
        band = boundary_band(label_np, width, ignore_index)
        rows.append((int((hits & band).sum()), int(band.sum())))
    return np.asarray(rows, dtype=np.int64).reshape(len(widths), 2)


class TrimapAccumulator:
    """Boundary quality: pixel accuracy inside trimap bands around the label boundaries, summed over images."""

    def __init__(self, widths: Sequence[int] = DEFAULT_TRIMAP_WIDTHS, ignore_index: int | None = 255) -> None:
        self.widths = tuple(int(w) for w in widths)
        if not self.widths:
            raise ValueError("give at least one trimap width")
        self.ignore_index = ignore_index
        self.counts = np.zeros((len(self.widths), 2), dtype=np.int64)
        self.num_images = 0

    def update(self, pred: LabelMap, label: LabelMap) -> np.ndarray:
        """Count one image; returns its (widths, 2) counts."""
        counts = trimap_counts(pred, label, self.widths, self.ignore_index)
        self.add(counts)
        return counts

    def add(self, counts: np.ndarray | Sequence[int], num_images: int = 1) -> None:
        """Add (widths, 2) counts (or their flattening) computed elsewhere."""
        array = np.asarray(counts, dtype=np.int64).reshape(len(self.widths), 2)
        self.counts += array
        self.num_images += num_images

    def results(self) -> dict[str, Any]:
        """`widths`, `accuracy` (percent per width, NaN without boundary pixels), `counts`, `num_images`."""
        correct, total = self.counts[:, 0], self.counts[:, 1]
        accuracy = _ratio(correct, total) * 100.0
        return {
            "widths": list(self.widths),
            "accuracy": [float(v) for v in accuracy],
            "rounded": [float(v) for v in np.round(accuracy, 2)],
            "counts": self.counts.tolist(),
            "num_images": self.num_images,
        }
