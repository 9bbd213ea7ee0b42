"""A set of mask proposals for one image, and the conversion of every accepted input form into it.

Accepted forms (`as_mask_set`):
- a `MaskSet`;
- a boolean (or 0/1) array (K, H, W), one mask per slice;
- an integer label map (H, W): 0 = no mask covers the pixel, 1..K = one mask each (ids need not be contiguous);
- the list of dicts of SAM's / SAM 2's automatic mask generators (`segmentation` a boolean (H, W) array, optional
  `predicted_iou` and `stability_score`, whose product is the mask's score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from itaclip_core.errors import UserError


class MaskError(UserError, ValueError):
    """Masks that cannot be used (wrong size, wrong form, empty set, unreadable file)."""


@dataclass
class MaskSet:
    """K boolean masks of one image, with optional per-mask scores."""

    masks: np.ndarray  # (K, H, W) bool
    scores: np.ndarray | None = None  # (K,) float32 (predicted IoU x stability for SAM), or None
    source: str = ""  # where the masks came from (for reports)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. generation seconds

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.dtype != np.bool_:
            raise MaskError(f"MaskSet.masks must be a (K, H, W) bool array, got {self.masks.shape} {self.masks.dtype}")
        if self.scores is not None and np.shape(self.scores) != (self.masks.shape[0],):
            raise MaskError(f"MaskSet.scores must hold one score per mask ({self.masks.shape[0]}), got "
                            f"{np.shape(self.scores)}")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image the masks belong to."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def areas(self) -> np.ndarray:
        """(K,) pixel count of each mask."""
        return self.masks.reshape(len(self), -1).sum(axis=1)

    @property
    def coverage(self) -> float:
        """Share of the image's pixels covered by at least one mask."""
        if not len(self):
            return 0.0
        return float(self.masks.any(axis=0).mean())


def _from_label_map(labels: np.ndarray) -> MaskSet:
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size and ids.min() < 0:
        raise MaskError(f"a mask label map holds negative id {int(ids.min())}: use 0 for uncovered, 1..K for masks")
    return MaskSet(labels[None] == ids[:, None, None])


def _from_records(records: Sequence[dict[str, Any]]) -> MaskSet:
    masks, scores, with_scores = [], [], True
    for index, record in enumerate(records):
        if "segmentation" not in record:
            raise MaskError(f"mask dict {index} has no 'segmentation' entry (keys: {', '.join(record)}); expected the "
                            "output of SamAutomaticMaskGenerator / SAM2AutomaticMaskGenerator with "
                            "output_mode='binary_mask'")
        segmentation = record["segmentation"]
        if isinstance(segmentation, dict):
            raise MaskError(f"mask dict {index} holds an RLE segmentation: generate with output_mode='binary_mask'")
        masks.append(np.asarray(segmentation).astype(bool))
        if "predicted_iou" in record and "stability_score" in record:
            scores.append(float(record["predicted_iou"]) * float(record["stability_score"]))
        else:
            with_scores = False
    if not masks:
        raise MaskError("the list of mask dicts is empty: give at least one mask")
    shapes = {m.shape for m in masks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MaskError(f"mask dicts hold segmentations of different or non-2-D shapes: {sorted(shapes)}")
    return MaskSet(np.stack(masks), np.asarray(scores, dtype=np.float32) if with_scores else None)


def as_mask_set(masks: Any, size: tuple[int, int] | None = None, what: str = "masks",
                allow_empty: bool = False) -> MaskSet:
    """Convert any accepted form (module docstring) into a `MaskSet`, checking it fits an image of `size` (H, W).

    Raises `MaskError` for a wrong form, a wrong size, or (unless `allow_empty`) a set without any mask.
    """
    if isinstance(masks, MaskSet):
        result = masks
    elif isinstance(masks, (list, tuple)) and (not masks or isinstance(masks[0], dict)):
        result = _from_records(list(masks))
    else:
        array = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
        if array.ndim == 3:
            if array.dtype != np.bool_:
                if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)) or \
                        not np.isin(array, (0, 1)).all():
                    raise MaskError(f"{what}: a (K, H, W) array must be boolean (or 0/1), got dtype {array.dtype}")
                array = array.astype(bool)
            result = MaskSet(array)
        elif array.ndim == 2:
            if not np.issubdtype(array.dtype, np.integer):
                raise MaskError(f"{what}: a (H, W) mask label map must hold integer ids (0 = uncovered), got "
                                f"dtype {array.dtype}")
            result = _from_label_map(array)
        else:
            raise MaskError(f"{what}: expected boolean masks (K, H, W), a label map (H, W) or a list of SAM mask "
                            f"dicts; got an array of shape {array.shape}")
    if not allow_empty and len(result) == 0:
        raise MaskError(f"{what}: the mask set is empty (no mask at all); give at least one mask, or no masks")
    if size is not None and result.size != tuple(size):
        raise MaskError(f"{what}: masks are {result.size[0]}x{result.size[1]} (HxW) but the image is "
                        f"{size[0]}x{size[1]}; give masks at the image's original size")
    return result
