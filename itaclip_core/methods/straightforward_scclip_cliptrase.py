"""SC-CLIP and CLIPtrase the straightforward way, as their official code runs them (`straightforward.predict`
sends their readouts here).

One window at a time (batch 1), explicit attention maps, window logits upsampled to the window and padded into a
full canvas, averaged and upsampled to the original size; MMSegmentation-style post-processing with a dense one-hot
variant maximum (`itaclip_core.reference.postprocess`). This is the baseline the benchmark times the batched
pipeline against, and a second route to the same numbers in the tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from itaclip_core import reference
from itaclip_core.inference.sliding import Window, sliding_windows
from itaclip_core.methods import cliptrase as ct
from itaclip_core.methods.scclip import scclip_tokens
from itaclip_core.methods.scclip import settings_from as scclip_settings
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import SegmentorConfig
from itaclip_core.text.classifier import TextClassifier


def _refined(patches: torch.Tensor, crop: torch.Tensor, text: torch.Tensor, model: CLIP,
             config: SegmentorConfig) -> torch.Tensor:
    """The configured feature refinements, in order, on one window's patch features (1, rows, cols, D)."""
    from itaclip_core.refinement.features import RefineContext, build_refinements

    refinements = build_refinements(config)
    if refinements:
        context = RefineContext(crop, text, config, model.visual.patch_size)
        for refinement in refinements:
            patches = refinement.refine(patches, context)
    return patches


def _windows(height: int, width: int, config: SegmentorConfig) -> list[Window]:
    """The engine's windows: the sliding window, or the whole image when `crop` is 0."""
    if config.crop == 0:
        return [Window(0, height, 0, width)]
    return sliding_windows(height, width, config.crop, config.stride)


def _canvas(windows, window_logits, height: int, width: int, original_size: tuple[int, int]) -> torch.Tensor:
    queries = window_logits[0].shape[1]
    preds = torch.zeros(1, queries, height, width)
    count = torch.zeros(1, 1, height, width)
    for w, logits in zip(windows, window_logits):
        preds += F.pad(logits, (w.x1, width - w.x2, w.y1, height - w.y2))
        count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    return F.interpolate(preds / count, size=original_size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def scclip_predict(model: CLIP, image: torch.Tensor, original_size: tuple[int, int], text: TextClassifier,
                   config: SegmentorConfig) -> tuple[torch.Tensor, np.ndarray]:
    """SC-CLIP on a normalised resized image (3, h, w): (probabilities (K, H0, W0), labels (H0, W0))."""
    if config.image_engineering:
        raise ValueError("the straightforward SC-CLIP route has no image engineering: set image_engineering=false")
    settings = scclip_settings(config)
    image = image[None].to(model.device)
    _, _, height, width = image.shape
    features = text.features.to(model.device, torch.float32)
    windows = _windows(height, width, config)
    outputs = []
    for w in windows:
        crop = image[:, :, w.y1 : w.y2, w.x1 : w.x2]
        rows, cols = model.visual.grid_size(*crop.shape[-2:])
        tokens = scclip_tokens(model.visual, crop.to(model.dtype), settings, explicit=True).float()
        patches = _refined(F.normalize(tokens, dim=-1).view(1, rows, cols, -1), crop, features, model, config)
        logits = (patches @ features.T).permute(0, 3, 1, 2)
        outputs.append(F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False).cpu())
    logits = _canvas(windows, outputs, height, width, original_size)
    return reference.postprocess(logits, text.query_to_class, config)


@torch.no_grad()
def cliptrase_predict(model: CLIP, image: torch.Tensor, original_size: tuple[int, int], text: TextClassifier,
                      config: SegmentorConfig) -> tuple[torch.Tensor, np.ndarray]:
    """CLIPtrase on a prepared image (3, h, w) (the n x n crop in the centre-crop protocol)."""
    settings = ct.settings_from(config)
    image = image[None].to(model.device)
    _, _, height, width = image.shape
    features = text.features.to(model.device, torch.float32)
    windows = _windows(height, width, config)
    outputs, maps = [], []
    for w in windows:
        crop = image[:, :, w.y1 : w.y2, w.x1 : w.x2]
        logits, window_maps = ct.window_logits_and_clusters(
            model.visual, crop, features, settings, config.logit_scale,
            lambda patches, crop=crop: _refined(patches, crop, features, model, config))
        outputs.append(F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False).cpu())
        maps.append(window_maps[0])
    logits = _canvas(windows, outputs, height, width, original_size)
    probs, labels = reference.postprocess(logits, text.query_to_class, config)
    voted = ct.vote_on_windows(torch.from_numpy(labels), windows, maps, (height, width))
    return probs, voted.numpy()
