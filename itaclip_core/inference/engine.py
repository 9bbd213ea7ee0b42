"""Batched dense inference: from a resized, normalised image to per-query similarities at the original size.

All windows of the image, and all views of each window, go through the image tower in batches of `batch_size`
images; their patch features are mixed (image engineering), projected on the text classifier once per window, and
stitched exactly (`itaclip_core.inference.sliding.stitch`). Memory is bounded by the batch size and by one
(windows, queries, rows, cols) tensor of patch logits.

What happens to a batch of windows is the dense readout's business (`itaclip_core.methods`, chosen by
`SegmentorConfig.readout`; default `tokens`): the engine asks it for per-window patch logits, passing the text
features and the configured feature refinements (`itaclip_core.refinement.features`). `crop=0` processes the whole
image as one window (NACLIP's and ResCLIP's VOC settings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from typing import TYPE_CHECKING, Sequence

from itaclip_core.attention.dense import DenseConfig
from itaclip_core.inference.memory import default_batch_size
from itaclip_core.inference.preprocess import renormalise_for
from itaclip_core.inference.sliding import Window, sliding_windows, stitch
from itaclip_core.inference.views import VIEW_NAMES
from itaclip_core.model.clip import CLIP
from itaclip_core.timing import step

if TYPE_CHECKING:
    from itaclip_core.methods.base import DenseReadout
    from itaclip_core.refinement.features import FeatureRefinement
    from itaclip_core.upsamplers.window import WindowUpsampler


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
        readout: "DenseReadout | None" = None,
        refinements: Sequence["FeatureRefinement"] = (),
        upsampler: "WindowUpsampler | None" = None,
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
            readout: the dense readout (default: the `tokens` readout of `dense`).
            refinements: feature refinements applied, in order, to every window's patch features.
            upsampler: a feature upsampler (`itaclip_core.upsamplers`) matching each window's upsampled features
                with the text at the window's pixels, or None (text matching on the patch grid).
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
        if readout is None:
            from itaclip_core.methods.base import TokensReadout
            from itaclip_core.presets import SegmentorConfig

            readout = TokensReadout(SegmentorConfig(), dense)
        readout.check_model(model)  # settings that depend on the tower (block numbers), before any work
        self.readout = readout
        self.refinements = list(refinements)
        if self.refinements and not readout.accepts_refinements:
            readout.check(readout.config)
        self.upsampler = upsampler
        if upsampler is not None and type(readout).window_logits is not _default_window_logits():
            raise ValueError(f"upsampler={getattr(upsampler, 'name', 'loftup')}: the {readout.name!r} readout makes its "
                             "own patch logits, so no feature upsampler fits it; allowed: upsampler=none")

    def _model_normalised(self, crops: torch.Tensor) -> torch.Tensor:
        """Windows normalised with CLIP's (OpenAI's) constants, re-normalised for a model trained with others
        (some OpenCLIP weights); the same tensor otherwise."""
        config = self.model.config
        return renormalise_for(crops, config.image_mean, config.image_std)

    @property
    def num_views(self) -> int:
        return len(VIEW_NAMES) if self.image_engineering else 1

    @torch.no_grad()
    def window_features(self, crops: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed, L2-normalised patch features of crops (N, 3, h, w): (N, rows, cols, D) float32, before the
        feature refinements (readouts that need the text, such as ResCLIP's, need `text_features`)."""
        if text_features is not None:
            text_features = text_features.to(self.model.device, torch.float32)
        return self.readout.window_features(self, self._model_normalised(crops), text_features)

    def windows(self, height: int, width: int) -> list[Window]:
        if self.crop == 0:
            return [Window(0, height, 0, width)]
        return sliding_windows(height, width, self.crop, self.stride)

    @torch.no_grad()
    def patch_logits(
        self, image: torch.Tensor, text_features: torch.Tensor, side: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Window]]:
        """Similarities of every window's patches with every query: ((N, Q, rows, cols) float32, windows).

        `side`: optional per-pixel data aligned with the image, (h, w) or (C, h, w) (e.g. mask region ids), cropped
        per window like the image and given to the readout as `side=` (N, ..., h_crop, w_crop)."""
        height, width = image.shape[-2:]
        windows = self.windows(height, width)
        crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
        crops = self._model_normalised(crops)
        extra = {}
        if side is not None:
            extra["side"] = torch.stack([side[..., w.y1 : w.y2, w.x1 : w.x2] for w in windows])
        with step("dense features"):
            logits = self.readout.window_logits(self, crops, text_features, self.refinements, **extra)  # (N, Q, r, c)
        return logits, windows

    @torch.no_grad()
    def logits(
        self, image: torch.Tensor, text_features: torch.Tensor, original_size: tuple[int, int],
        side: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-query similarities (Q, H0, W0) float32 of a normalised image (3, h, w) at its original size
        (`side`: per-pixel data for the readout, see `patch_logits`)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        patch_logits, windows = self.patch_logits(image, text_features, side)
        return stitch(patch_logits, windows, tuple(image.shape[-2:]), original_size)

    @torch.no_grad()
    def logits_many(
        self, images: list[torch.Tensor], text_features: torch.Tensor, original_sizes: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """`logits` of several images at once: the windows of all of them share the image tower's batches.

        Images whose windows have the same size (the usual case: every side at least `crop`) are batched together;
        the result of each image is the same as `logits` gives for it alone (up to float rounding of batched
        matrix products).
        """
        for image in images:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        windows = [self.windows(*image.shape[-2:]) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image_windows in enumerate(windows):
            first = image_windows[0]
            groups.setdefault((first.y2 - first.y1, first.x2 - first.x1), []).append(index)
        if not self.readout.shares_batches:
            return [self.logits(image, text_features, size) for image, size in zip(images, original_sizes)]
        results: list[torch.Tensor | None] = [None] * len(images)
        for members in groups.values():
            crops = torch.cat([torch.stack([images[i][:, w.y1 : w.y2, w.x1 : w.x2] for w in windows[i]])
                               for i in members])  # fmt: skip
            crops = self._model_normalised(crops)
            # (sum of windows, Q, rows, cols), through the readout and the feature refinements as in `logits`
            with step("dense features"):
                patch_logits = self.readout.window_logits(self, crops, text_features, self.refinements)
            start = 0
            for i in members:
                count = len(windows[i])
                patch = patch_logits[start : start + count]
                results[i] = stitch(patch, windows[i], tuple(images[i].shape[-2:]), original_sizes[i])
                start += count
        return [r for r in results if r is not None]


def _default_window_logits():
    """`DenseReadout.window_logits`, the patch-feature route a feature upsampler plugs into."""
    from itaclip_core.methods.base import DenseReadout

    return DenseReadout.window_logits
