"""Masks painted into a partition, and the label of each region decided by a vote over the dense prediction.

Pure functions on numpy / torch arrays (no model):

- `partition(masks, order, scores, min_area)`: an (H, W) int64 region map, 0 where no (kept) mask covers the pixel,
  `i + 1` where mask `i` is on top. Overlaps are resolved by painting order: `small_on_top` paints by decreasing
  area, so smaller masks end on top (SAM's convention: small objects survive inside large stuff masks);
  `large_on_top` paints by increasing area (CorrCLIP's instance map); `score` paints by increasing score, so the
  best-scored mask wins. Equal keys keep the masks' order (the later mask is painted later). Masks with fewer than
  `min_area` pixels (and empty ones) are left out.
- `vote_mode(labels, regions)`: every region takes the most frequent dense label of its pixels, ties to the lower
  class id (CorrCLIP's map correction, `torch.mode`'s rule).
- `vote_probs(labels, regions, probs)`: every region takes the argmax of its mean class probabilities.
- `vote_logits` / `vote_features`: every region takes the argmax over classes of its mean similarity with the text,
  i.e. of its mean L2-normalised feature against the text features (for a class with several name variants, the
  best variant). Bilinear upsampling and the text projection are linear, so the mean of the dense per-pixel
  similarities equals the similarity of the mean patch feature: `vote_logits` takes the former, `vote_features` the
  latter.
In all of them pixels of region 0 (uncovered) keep their dense label, and ties go to the lower class id.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from itaclip_core.masks.maskset import MaskError, MaskSet, as_mask_set

PAINT_ORDERS = ("small_on_top", "large_on_top", "score")
VOTE_RULES = ("mode", "probs", "features")


def partition(
    masks: MaskSet | np.ndarray | Sequence[dict],
    order: str = "small_on_top",
    scores: np.ndarray | None = None,
    min_area: int = 0,
) -> np.ndarray:
    """(H, W) int64 region map of the masks painted in `order` (module docstring); 0 = uncovered.

    Args:
        masks: a `MaskSet`, a boolean (K, H, W) array or SAM's mask dicts.
        order: `small_on_top`, `large_on_top` or `score`.
        scores: (K,) scores for `order="score"` (default: the MaskSet's scores).
        min_area: masks with fewer pixels are not painted.
    """
    if order not in PAINT_ORDERS:
        raise MaskError(f"mask_order {order!r} is not one of {', '.join(PAINT_ORDERS)}")
    if min_area < 0:
        raise MaskError(f"mask_min_area must be >= 0, got {min_area}")
    mask_set = as_mask_set(masks, allow_empty=True)
    count = len(mask_set)
    regions = np.zeros(mask_set.size, dtype=np.int64)
    if count == 0:
        return regions
    areas = mask_set.areas
    if order == "score":
        scores = mask_set.scores if scores is None else np.asarray(scores, dtype=np.float64)
        if scores is None or np.shape(scores) != (count,):
            raise MaskError("mask_order 'score' needs one score per mask (SAM's predicted_iou x stability_score); "
                            "these masks have none: use small_on_top or large_on_top")
        key = np.asarray(scores, dtype=np.float64)
    elif order == "small_on_top":
        key = -areas.astype(np.float64)
    else:
        key = areas.astype(np.float64)
    for index in np.argsort(key, kind="stable"):  # painted first to last; the last painted is on top
        if areas[index] == 0 or areas[index] < min_area:
            continue
        regions[mask_set.masks[index]] = index + 1
    return regions


def _check_maps(labels: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    regions = np.asarray(regions)
    if labels.shape != regions.shape or labels.ndim != 2:
        raise MaskError(f"labels {labels.shape} and region map {regions.shape} must be the same (H, W)")
    if not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(regions.dtype, np.integer):
        raise MaskError("labels and region map must be integer arrays")
    if regions.size and regions.min() < 0:
        raise MaskError("region ids must be >= 0 (0 = uncovered)")
    return labels.astype(np.int64), regions.astype(np.int64)


def _paint(labels: np.ndarray, regions: np.ndarray, winners: np.ndarray) -> np.ndarray:
    """labels with every covered pixel set to its region's winner (winners indexed by region id)."""
    out = winners[regions]
    uncovered = regions == 0
    out[uncovered] = labels[uncovered]
    return out


def vote_mode(labels: np.ndarray, regions: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Each region takes its most frequent label (ties: lower class id); uncovered pixels keep theirs."""
    labels, regions = _check_maps(labels, regions)
    if labels.size == 0:
        return labels.copy()
    if labels.min() < 0:
        raise MaskError("labels must be >= 0")
    classes = max(int(labels.max()) + 1, num_classes or 0)
    count = int(regions.max()) + 1
    votes = np.bincount((regions * classes + labels).ravel(), minlength=count * classes).reshape(count, classes)
    winners = votes.argmax(axis=1)  # first maximum: the lower class id on ties
    return _paint(labels, regions, winners)


def _region_means(values: torch.Tensor, regions: np.ndarray) -> torch.Tensor:
    """(C, H, W) values -> (R + 1, C) sums per region id (means are not needed for an argmax within a region)."""
    flat = values.reshape(values.shape[0], -1).float()  # (C, N)
    index = torch.from_numpy(regions.reshape(-1)).to(flat.device)
    count = int(regions.max()) + 1
    sums = torch.zeros(flat.shape[0], count, dtype=torch.float32, device=flat.device)
    sums.index_add_(1, index, flat)
    return sums.T  # (R + 1, C)


def vote_probs(labels: np.ndarray, regions: np.ndarray, probs: torch.Tensor | np.ndarray,
               prob_thd: float = 0.0) -> np.ndarray:
    """Each region takes the argmax of its mean class probabilities (ties: lower id); a region whose top mean
    probability is below `prob_thd` takes class 0. probs: (K, H, W)."""
    labels, regions = _check_maps(labels, regions)
    probs = torch.as_tensor(probs)
    if probs.ndim != 3 or tuple(probs.shape[1:]) != labels.shape:
        raise MaskError(f"probs {tuple(probs.shape)} must be (K, H, W) with (H, W) = {labels.shape}")
    if labels.size == 0:
        return labels.copy()
    sums = _region_means(probs, regions)  # (R + 1, K)
    sizes = np.bincount(regions.ravel(), minlength=sums.shape[0])
    means = sums / torch.from_numpy(np.maximum(sizes, 1)).to(sums)[:, None]
    top = means.max(dim=1).values
    winners = means.argmax(dim=1)  # the first maximum: the lower class id on ties
    winners[top < prob_thd] = 0
    return _paint(labels, regions, winners.cpu().numpy().astype(np.int64))


def _class_scores(query_scores: torch.Tensor, query_to_class: Sequence[int] | None, allowed: torch.Tensor | None
                  ) -> torch.Tensor:
    """(R, Q) per-query scores -> (R, K) per-class scores (best variant); disallowed classes get -inf."""
    if query_to_class is None:
        scores = query_scores
    else:
        index = torch.as_tensor(query_to_class).to(device=query_scores.device, dtype=torch.long)
        classes = int(index.max()) + 1
        scores = torch.full((query_scores.shape[0], classes), float("-inf"), device=query_scores.device)
        scores.scatter_reduce_(1, index.expand_as(query_scores), query_scores, "amax")
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to(scores.device)[None], float("-inf"))
    return scores


def vote_logits(labels: np.ndarray, regions: np.ndarray, logits: torch.Tensor | np.ndarray,
                query_to_class: Sequence[int] | None = None, allowed: torch.Tensor | None = None) -> np.ndarray:
    """Each region takes the argmax over classes of its mean per-pixel similarity with the text.

    Args:
        logits: (Q, H, W) cosine similarities of the pixels' (upsampled) features with the Q text queries.
        query_to_class: class of each query (default: one query per class).
        allowed: (K,) bool, classes that may win (e.g. those kept by the area threshold).
    """
    labels, regions = _check_maps(labels, regions)
    logits = torch.as_tensor(logits)
    if logits.ndim != 3 or tuple(logits.shape[1:]) != labels.shape:
        raise MaskError(f"logits {tuple(logits.shape)} must be (Q, H, W) with (H, W) = {labels.shape}")
    if labels.size == 0:
        return labels.copy()
    scores = _class_scores(_region_means(logits, regions), query_to_class, allowed)  # sums: same argmax as means
    winners = scores.argmax(dim=1)
    return _paint(labels, regions, winners.cpu().numpy().astype(np.int64))


def vote_features(labels: np.ndarray, regions: np.ndarray, features: torch.Tensor | np.ndarray,
                  text_features: torch.Tensor | np.ndarray, query_to_class: Sequence[int] | None = None,
                  allowed: torch.Tensor | None = None) -> np.ndarray:
    """Each region takes the argmax over classes of (mean of its L2-normalised pixel features) . text.

    Args:
        features: (D, H, W) per-pixel features (normalised here along D).
        text_features: (Q, D) text query features.
    """
    labels, regions = _check_maps(labels, regions)
    features = torch.as_tensor(features).float()
    text = torch.as_tensor(text_features).float()
    if features.ndim != 3 or tuple(features.shape[1:]) != labels.shape or text.ndim != 2 or \
            text.shape[1] != features.shape[0]:
        raise MaskError(f"features {tuple(features.shape)} must be (D, H, W) with (H, W) = {labels.shape} and text "
                        f"features (Q, D); got text {tuple(text.shape)}")
    if labels.size == 0:
        return labels.copy()
    normalised = torch.nn.functional.normalize(features, dim=0)
    sums = _region_means(normalised, regions)  # (R + 1, D)
    scores = _class_scores(sums @ text.to(sums.device).T, query_to_class, allowed)
    winners = scores.argmax(dim=1)
    return _paint(labels, regions, winners.cpu().numpy().astype(np.int64))
