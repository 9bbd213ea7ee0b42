"""Batched dense inference: from a resized, normalised image to per-query similarities at the original size.

All windows of the image, and all views of each window, go through the image tower in batches of `batch_size`
images; their patch features are mixed (image engineering), projected on the text classifier once per window, and
stitched exactly (`itaclip_core.inference.sliding.stitch`). Memory is bounded by the batch size and by one
(windows, queries, rows, cols) tensor of patch logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itaclip_core.attention.dense import DenseConfig, dense_tokens
from itaclip_core.inference.memory import default_batch_size
from itaclip_core.inference.preprocess import renormalise_for
from itaclip_core.inference.sliding import Window, sliding_windows, stitch
from itaclip_core.inference.views import VIEW_NAMES, make_views, mix_views
from itaclip_core.model.clip import CLIP


class DenseInference:
    """The image side of the pipeline for one model and one set of settings."""

    def __init__(
        self,
        model: CLIP,
        dense: DenseConfig,
        crop: int = 224,
        stride: int = 28,
        image_engineering: bool = True,
        img_eng_coef: float = 0.75,
        batch_size: int | None = None,
    ) -> None:
        """
        Args:
            model: the CLIP whose image tower is used.
            dense: how the tower is read out (attention variants, fusion, last block).
            crop, stride: sliding-window size and step in pixels.
            image_engineering: use the five views of every window.
            img_eng_coef: weight of the original/gray/blur views against the flipped ones.
            batch_size: images (windows x views) per forward pass; bounds memory. None: 16 on CPU; on GPU what
                fits in half the free memory for this backbone and crop, at most 256 (`inference.memory`).
        """
        if batch_size is None:
            batch_size = default_batch_size(model.config, model.device, model.dtype, crop, len(dense.fuse_blocks))
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.dense = dense
        self.crop = crop
        self.stride = stride
        self.image_engineering = image_engineering
        self.img_eng_coef = img_eng_coef
        self.batch_size = batch_size

    @property
    def num_views(self) -> int:
        return len(VIEW_NAMES) if self.image_engineering else 1

    @torch.no_grad()
    def window_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Mixed, L2-normalised patch features of crops (N, 3, h, w): (N, rows, cols, D) float32."""
        visual = self.model.visual
        rows, cols = visual.grid_size(crops.shape[-2], crops.shape[-1])
        per_chunk = max(1, self.batch_size // self.num_views)
        chunks = []
        for start in range(0, crops.shape[0], per_chunk):
            chunk = crops[start : start + per_chunk].to(self.model.device)  # (n, 3, h, w)
            chunk = renormalise_for(chunk, self.model.config.image_mean, self.model.config.image_std)
            views = make_views(chunk, self.image_engineering).to(self.model.dtype)  # (V * n, 3, h, w)
            tokens = dense_tokens(visual, views, self.dense)[:, 1:].float()  # (V * n, rows * cols, D)
            tokens = F.normalize(tokens, dim=-1).view(self.num_views, chunk.shape[0], rows, cols, -1)
            mixed = mix_views(tokens, self.img_eng_coef) if self.image_engineering else tokens[0]
            chunks.append(mixed)  # (n, rows, cols, D)
        return torch.cat(chunks)

    def windows(self, height: int, width: int) -> list[Window]:
        return sliding_windows(height, width, self.crop, self.stride)

    @torch.no_grad()
    def patch_logits(self, image: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, list[Window]]:
        """Similarities of every window's patches with every query: ((N, Q, rows, cols) float32, windows)."""
        height, width = image.shape[-2:]
        windows = self.windows(height, width)
        crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
        features = self.window_features(crops)  # (N, rows, cols, D)
        logits = features @ text_features.to(features.device, torch.float32).T  # (N, rows, cols, Q)
        return logits.permute(0, 3, 1, 2), windows

    @torch.no_grad()
    def logits(
        self, image: torch.Tensor, text_features: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Per-query similarities (Q, H0, W0) float32 of a normalised image (3, h, w) at its original size."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        patch_logits, windows = self.patch_logits(image, text_features)
        return stitch(patch_logits, windows, tuple(image.shape[-2:]), original_size)
