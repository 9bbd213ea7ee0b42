"""The mask stage of the Segmentor: where an image's masks come from, and the vote applied to the final labels.

`MaskStage(config)` checks the mask settings of a `SegmentorConfig` (before any image is processed), builds the
source lazily (so that a missing checkpoint or extra is reported once, clearly) and caches generated masks on disk.
`vote_labels` is the `mask_use=vote` step: it runs last, on the label map after the probability and area
thresholds and the closing, so that every method (ITACLIP, SCLIP, the zoo) gets it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from itaclip_core.masks.cache import MaskCache
from itaclip_core.masks.config import GENERATOR_PRESETS
from itaclip_core.masks.maskset import MaskError, MaskSet, as_mask_set
from itaclip_core.masks.sources import MaskSource, build_mask_source
from itaclip_core.masks.voting import PAINT_ORDERS, VOTE_RULES, partition, vote_logits, vote_mode, vote_probs

MASK_USES = ("vote", "attention", "proxy")
CORRELATIONS = ("clip", "dino")


def check_mask_settings(config: Any) -> None:
    """Raise `MaskError` for mask settings of a SegmentorConfig that cannot work (named, with allowed values)."""
    if config.mask_use not in MASK_USES:
        raise MaskError(f"mask_use {config.mask_use!r} is not one of {', '.join(MASK_USES)}")
    if config.mask_order not in PAINT_ORDERS:
        raise MaskError(f"mask_order {config.mask_order!r} is not one of {', '.join(PAINT_ORDERS)}")
    if config.mask_vote not in VOTE_RULES:
        raise MaskError(f"mask_vote {config.mask_vote!r} is not one of {', '.join(VOTE_RULES)}")
    if config.mask_min_area < 0:
        raise MaskError(f"mask_min_area must be >= 0, got {config.mask_min_area}")
    if config.mask_generator is not None and config.mask_generator not in GENERATOR_PRESETS:
        raise MaskError(f"mask_generator {config.mask_generator!r} is not one of {', '.join(GENERATOR_PRESETS)}")
    from itaclip_core.masks.proxy import PROXY_MODELS

    if config.proxy_model not in PROXY_MODELS:
        raise MaskError(f"proxy_model {config.proxy_model!r} is not one of {', '.join(PROXY_MODELS)}")
    if config.mask_correlation not in CORRELATIONS:
        raise MaskError(f"mask_correlation {config.mask_correlation!r} is not one of {', '.join(CORRELATIONS)}")


class MaskStage:
    """Masks for the images a Segmentor predicts, and the final vote. Generated masks are cached under
    `cache_dir/masks` when `cache_dir` is given and `config.mask_cache` is on."""

    def __init__(self, config: Any, cache_dir: str | Path | None = None, device: str | torch.device | None = None,
                 progress: bool = False) -> None:
        check_mask_settings(config)
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = str(device) if device is not None else None
        self.progress = progress
        self._source: MaskSource | None = None
        self._cache: MaskCache | None = None
        if config.masks is not None:
            self._source = build_mask_source(
                config.masks, generator=config.mask_generator, generator_args=config.mask_generator_args,
                model=config.mask_model, checkpoint=config.mask_checkpoint, device=self.device, progress=progress,
            )
            if config.mask_cache and self.cache_dir is not None:
                self._cache = MaskCache(self._source, self.cache_dir / "masks")

    @property
    def votes(self) -> bool:
        """Whether the final labels are voted: `mask_use=vote`, or mask attention with its final vote."""
        return self.config.mask_use == "vote" or (self.config.mask_use == "attention" and self.config.mask_final_vote)

    @property
    def scopes_attention(self) -> bool:
        """Whether the masks go into the tower (mask attention)."""
        return self.config.mask_use == "attention"

    @staticmethod
    def regions_at(regions: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """A region map nearest-resized to `size` (H, W), as an int64 tensor."""
        resized = regions if regions.shape == tuple(size) else cv2.resize(
            regions.astype(np.int32), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(np.ascontiguousarray(resized).astype(np.int64))

    @property
    def source(self) -> MaskSource | None:
        return self._source

    @property
    def cache(self) -> MaskCache | None:
        return self._cache

    def generate(self, image_rgb: np.ndarray, name: str | None = None) -> MaskSet | None:
        """The configured source's masks of an image (from the cache when possible); None without a source."""
        if self._source is None:
            return None
        if self._cache is not None:
            return self._cache.get(image_rgb, name)
        return self._source.generate(image_rgb, name)

    def resolve(self, masks: Any, size: tuple[int, int]) -> MaskSet:
        """User-given masks (boolean (K, H, W), label map, SAM dicts or a MaskSet) checked against the image size.
        An array, label map or list without any mask is refused; a `MaskSet` (what the sources produce) may be
        empty: a generator that finds nothing leaves the dense prediction as it is."""
        return as_mask_set(masks, size, what="masks given to predict", allow_empty=isinstance(masks, MaskSet))

    def regions(self, masks: MaskSet) -> np.ndarray:
        """The masks' partition (region map, 0 = uncovered) under the configured order and minimum area."""
        return partition(masks, self.config.mask_order, min_area=self.config.mask_min_area)

    def vote(self, labels: np.ndarray, regions: np.ndarray, probs: torch.Tensor, logits: torch.Tensor,
             query_to_class: Sequence[int]) -> np.ndarray:
        """`mask_use=vote`: each region relabelled by the configured rule; uncovered pixels keep their label."""
        rule = self.config.mask_vote
        if rule == "mode":
            return vote_mode(labels, regions, num_classes=probs.shape[0])
        if rule == "probs":
            return vote_probs(labels, regions, probs, prob_thd=self.config.prob_thd)
        allowed = probs.reshape(probs.shape[0], -1).amax(dim=1) > 0  # classes not removed by the area threshold
        return vote_logits(labels, regions, logits, query_to_class, allowed=allowed)


def resize_masks(masks: MaskSet, size: tuple[int, int]) -> MaskSet:
    """Masks nearest-resized to `size` (H, W)."""
    if masks.size == tuple(size):
        return masks
    resized = np.stack([cv2.resize(m.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                        for m in masks.masks]).astype(bool) if len(masks) else \
        np.zeros((0, *size), dtype=bool)
    return MaskSet(resized, masks.scores, masks.source, dict(masks.info))
