"""From per-query similarities to class probabilities and a label map, as ITACLIP and SCLIP post-process.

1. `probs_q = softmax(logit_scale * logits)` over the Q text queries (the name variants of all classes);
2. a class's probability is the maximum over its variants (`class_probabilities`);
3. optionally, classes other than 0 whose argmax area is not above `area_thd` times the total non-background
   argmax area are zeroed (`area_threshold`);
4. labels are the argmax over classes, and pixels whose top probability is below `prob_thd` get class 0
   (`labels_from_probs`);
5. optionally (ITACLIP), a 3x3 rectangular grayscale morphological closing of the label map (`close_labels`).

Steps 1-2 run over row chunks so that memory stays bounded for many classes and variants on large images.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
import torch

# Rows are processed in chunks of at most about this many (Q x rows x W) elements in steps 1-2.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class PostprocessResult(NamedTuple):
    """Output of `postprocess`, on the device of the input logits."""

    probs: torch.Tensor  # (K, H, W) float32 class probabilities after the area threshold
    labels: torch.Tensor  # (H, W) int64 class ids after the probability threshold and the closing


def _query_index(
    query_to_class: Sequence[int] | np.ndarray | torch.Tensor, num_queries: int, num_classes: int | None
) -> tuple[torch.Tensor, int]:
    """Validate the query-to-class map; returns it as an int64 tensor and the number of classes K."""
    index = torch.as_tensor(np.asarray(query_to_class) if not torch.is_tensor(query_to_class) else query_to_class)
    if index.ndim != 1 or index.numel() != num_queries:
        raise ValueError(
            f"query_to_class has shape {tuple(index.shape)} but logits hold {num_queries} queries: "
            "give one class index per query"
        )
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"query_to_class has dtype {index.dtype}: give integer class indices")
    if num_queries == 0:
        raise ValueError("logits hold no queries: give at least one text query")
    index = index.long().cpu()
    if int(index.min()) < 0:
        raise ValueError(f"query_to_class holds {int(index.min())}: class indices must be >= 0")
    found = int(index.max()) + 1
    classes = found if num_classes is None else int(num_classes)
    if classes < found:
        raise ValueError(f"query_to_class refers to class {found - 1} but num_classes is {classes}")
    missing = sorted(set(range(classes)) - set(index.tolist()))
    if missing:
        raise ValueError(f"classes {missing[:10]} have no query in query_to_class: every class needs a name variant")
    return index, classes


def class_probabilities(
    logits: torch.Tensor,
    query_to_class: Sequence[int] | np.ndarray | torch.Tensor,
    logit_scale: float,
    num_classes: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Softmax over the queries of the scaled similarities, then the maximum over each class's variants.

    Args:
        logits: (Q, H, W) cosine similarities of the Q text queries.
        query_to_class: length Q, the class (0..K-1) of each query; a class's variants need not be contiguous.
        logit_scale: factor applied before the softmax (e.g. 60 for ITACLIP on Pascal VOC).
        num_classes: K; default the largest class index + 1. Every class needs at least one query.
        chunk_elements: memory bound: rows are processed in chunks of about this many (Q x rows x W) elements.

    Returns:
        (K, H, W) float32 class probabilities on the logits' device.
    """
    if logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(f"logits has shape {tuple(logits.shape)} and dtype {logits.dtype}: expected (Q, H, W) float")
    num_queries, height, width = logits.shape
    index, classes = _query_index(query_to_class, num_queries, num_classes)
    identity = classes == num_queries and bool(torch.equal(index, torch.arange(num_queries)))
    index = index.to(logits.device)
    probs = torch.empty((classes, height, width), dtype=torch.float32, device=logits.device)
    rows = max(1, chunk_elements // max(1, num_queries * width))
    for top in range(0, height, rows):
        chunk = (logits[:, top : top + rows].float() * logit_scale).softmax(dim=0)  # (Q, rows, W)
        if identity:
            probs[:, top : top + rows] = chunk
        else:
            reduced = chunk.new_empty((classes, *chunk.shape[1:]))  # (K, rows, W); every row is written below
            with warnings.catch_warnings():  # torch flags index_reduce_ as beta; it is the fastest exact reduction
                warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
                reduced.index_reduce_(0, index, chunk, "amax", include_self=False)
            probs[:, top : top + rows] = reduced
    return probs


def kept_classes(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """Which classes survive the area threshold: a (K,) bool tensor, class 0 always True.

    Class c >= 1 survives when its argmax area (ties go to the lower index) is above `area_thd` times the summed
    argmax area of all classes >= 1.

    Args:
        probs: (K, H, W) class probabilities.
        area_thd: fraction of the non-background predicted area a class must exceed.
    """
    classes = probs.shape[0]
    area = torch.bincount(probs.argmax(dim=0).reshape(-1), minlength=classes)  # (K,) pixel counts
    keep = area > area_thd * area[1:].sum()
    keep[0] = True
    return keep


def area_threshold(probs: torch.Tensor, area_thd: float | None, inplace: bool = False) -> torch.Tensor:
    """Multiply by 0 the probability maps of the classes (other than 0) that fail the area threshold.

    Args:
        probs: (K, H, W) class probabilities.
        area_thd: see `kept_classes`; None returns `probs` unchanged.
        inplace: modify `probs` itself instead of a copy.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs has shape {tuple(probs.shape)}: expected (K, H, W)")
    if area_thd is None:
        return probs
    out = probs if inplace else probs.clone()
    keep = kept_classes(probs, area_thd)
    out *= keep.to(out.dtype).view(-1, 1, 1)  # (K, 1, 1)
    return out


def labels_from_probs(probs: torch.Tensor, prob_thd: float = 0.0) -> torch.Tensor:
    """Argmax over classes (ties to the lower index); pixels whose top probability is below `prob_thd` get 0.

    Args:
        probs: (K, H, W) class probabilities.
        prob_thd: minimum top probability for a pixel to keep its argmax class.

    Returns:
        (H, W) int64 labels.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs has shape {tuple(probs.shape)}: expected (K, H, W)")
    top, labels = probs.max(dim=0)
    labels[top < prob_thd] = 0
    return labels


def close_labels(labels: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """3x3 rectangular grayscale morphological closing of a label map (OpenCV `MORPH_CLOSE`).

    The ids are taken as gray levels: uint8 when all are at most 255, otherwise uint16 (ids up to 65535), so
    large label sets are never wrapped.

    Args:
        labels: (H, W) non-negative integer ids, torch or numpy.

    Returns:
        The closed labels as int64, of the input's kind (a torch tensor on the input's device, or numpy).
    """
    as_tensor = torch.is_tensor(labels)
    array = labels.detach().cpu().numpy() if as_tensor else np.asarray(labels)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels has shape {array.shape} and dtype {array.dtype}: expected (H, W) integer ids")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"labels hold ids in [{low}, {high}]: closing supports ids 0..65535")
    gray = array.astype(np.uint8 if high <= 255 else np.uint16)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    closed = cv2.morphologyEx(gray, cv2.MORPH_CLOSE, kernel).astype(np.int64)
    return torch.from_numpy(closed).to(labels.device) if as_tensor else closed


def postprocess(
    logits: torch.Tensor,
    query_to_class: Sequence[int] | np.ndarray | torch.Tensor,
    logit_scale: float,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    closing: bool = False,
    num_classes: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> PostprocessResult:
    """Turn per-query similarities into class probabilities and labels (steps 1-5 of the module docstring).

    Args:
        logits: (Q, H, W) cosine similarities of the Q text queries (name variants), after PAMR if used.
        query_to_class: length Q, the class (0..K-1) of each query.
        logit_scale: factor before the softmax over queries.
        prob_thd: pixels whose top class probability is below it are labelled 0.
        area_thd: None, or the area fraction below which classes other than 0 are dropped.
        closing: apply the 3x3 grayscale closing to the label map (ITACLIP).
        num_classes: K; default the largest class index + 1.
        chunk_elements: memory bound for the softmax and the variant maximum.

    Returns:
        `PostprocessResult(probs (K, H, W) float32 after the area threshold, labels (H, W) int64)`.
    """
    probs = class_probabilities(logits, query_to_class, logit_scale, num_classes, chunk_elements)
    probs = area_threshold(probs, area_thd, inplace=True)
    labels = labels_from_probs(probs, prob_thd)
    if closing:
        labels = close_labels(labels)
    return PostprocessResult(probs, labels)
