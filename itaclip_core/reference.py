"""The straightforward algorithm, step by step as the published ITACLIP / SCLIP code runs it.

One prompt batch per text at the full 77-token length; one window and one view at a time through the image tower;
every view's logits upsampled to the window and un-flipped there; windows padded into a full canvas; PAMR with the
full (C, 16, H, W) neighbour tensor; variant maximum through a dense one-hot product. It is slow and memory-hungry
on purpose: it is the baseline the benchmarks time the batched pipeline against, and a second, independent route to
the same numbers in the tests.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from itaclip_core.attention.dense import DenseConfig, dense_tokens
from itaclip_core.inference.preprocess import renormalise_for
from itaclip_core.inference.sliding import sliding_windows
from itaclip_core.inference.views import gaussian_blur, grayscale
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import SegmentorConfig
from itaclip_core.text.classes import ClassVocabulary
from itaclip_core.text.classifier import TextClassifier, fill_template
from itaclip_core.text.tokenizer import tokenize


@torch.no_grad()
def text_features(model: CLIP, texts: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(T, D): per text, its prompts as one batch at full length, normalised, averaged, normalised."""
    rows = []
    for text in texts:
        tokens = tokenize([fill_template(t, text) for t in templates]).to(model.device)
        feature = F.normalize(model.encode_text(tokens, trim=False).float(), dim=-1).mean(dim=0)
        rows.append(F.normalize(feature, dim=-1))
    return torch.stack(rows).cpu()


def classifier(
    model: CLIP,
    vocab: ClassVocabulary,
    templates: Sequence[str],
    aux_texts: Sequence[str] | None,
    aux_coef: float,
    background: bool,
) -> TextClassifier:
    """The text classifier built the straightforward way (background variants assumed first, as published)."""
    names = text_features(model, vocab.queries, templates)
    query_to_class = torch.tensor(vocab.query_to_class)
    if aux_texts is not None:
        aux = text_features(model, aux_texts, templates)
        if background:
            num_bg = int((query_to_class == 0).sum())
            mixed = names.clone()
            mixed[num_bg:] = (1 - aux_coef) * names[num_bg:] + aux_coef * aux[query_to_class[num_bg:] - 1]
            names = mixed
        else:
            names = (1 - aux_coef) * names + aux_coef * aux[query_to_class]
    return TextClassifier(names, query_to_class, vocab.class_names, vocab.queries)


def _patch_logits(model: CLIP, view: torch.Tensor, text: torch.Tensor, dense: DenseConfig) -> torch.Tensor:
    """(1, Q, rows, cols) logits of one view."""
    tokens = dense_tokens(model.visual, view.to(model.dtype), dense)[:, 1:].float()
    tokens = F.normalize(tokens, dim=-1)
    rows, cols = model.visual.grid_size(view.shape[-2], view.shape[-1])
    return (tokens @ text.T).permute(0, 2, 1).reshape(1, -1, rows, cols)


@torch.no_grad()
def window_logits(
    model: CLIP, crop: torch.Tensor, text: torch.Tensor, dense: DenseConfig, image_engineering: bool, coef: float
) -> torch.Tensor:
    """(1, Q, h, w) logits of one window (1, 3, h, w), one view at a time."""
    crop = renormalise_for(crop, model.config.image_mean, model.config.image_std)  # the model's own constants
    size = crop.shape[-2:]
    if not image_engineering:
        return F.interpolate(_patch_logits(model, crop, text, dense), size=size, mode="bilinear")
    features = []
    for view in (crop, grayscale(crop), gaussian_blur(crop)):
        tokens = dense_tokens(model.visual, view.to(model.dtype), dense)[:, 1:].float()
        features.append(F.normalize(tokens, dim=-1))
    rows, cols = model.visual.grid_size(size[0], size[1])
    mean = torch.stack(features).mean(dim=0)
    logits = (mean @ text.T).permute(0, 2, 1).reshape(1, -1, rows, cols)
    logits = F.interpolate(logits, size=size, mode="bilinear")
    flipped = []
    for dim in (-2, -1):
        view_logits = _patch_logits(model, torch.flip(crop, dims=[dim]), text, dense)
        flipped.append(torch.flip(F.interpolate(view_logits, size=size, mode="bilinear"), dims=[dim]))
    return coef * logits + (1 - coef) * torch.stack(flipped).mean(dim=0)


@torch.no_grad()
def image_logits(
    model: CLIP, image: torch.Tensor, text: torch.Tensor, config: SegmentorConfig, original_size: tuple[int, int]
) -> torch.Tensor:
    """(Q, H0, W0): windows one by one, padded into a full canvas, averaged, upsampled to the original size."""
    image = image[None].to(model.device)
    _, _, height, width = image.shape
    text = text.to(model.device, torch.float32)
    preds = torch.zeros(1, text.shape[0], height, width, device=model.device)
    count = torch.zeros(1, 1, height, width, device=model.device)
    for w in sliding_windows(height, width, config.crop, config.stride):
        crop = image[:, :, w.y1 : w.y2, w.x1 : w.x2]
        logits = window_logits(model, crop, text, config.dense_config(), config.image_engineering,
                               config.img_eng_coef)
        preds += F.pad(logits, (w.x1, width - w.x2, w.y1, height - w.y2))
        count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    return F.interpolate(preds / count, size=original_size, mode="bilinear")[0]


def pamr(image: torch.Tensor, logits: torch.Tensor, steps: int, dilations: Sequence[int]) -> torch.Tensor:
    """PAMR with the full neighbour tensors: image (1, 3, H, W), logits (1, C, H, W)."""

    def neighbours(x: torch.Tensor, with_centre: bool) -> torch.Tensor:
        # x: (B, K, H, W) -> (B, K, P, H, W), P = 8 or 9 per dilation, dilations concatenated.
        batch, channels, height, width = x.shape
        out = []
        for d in dilations:
            padded = F.pad(x.reshape(batch * channels, 1, height, width), [d] * 4, mode="replicate")
            for dy in (-d, 0, d):
                for dx in (-d, 0, d):
                    if dy == 0 and dx == 0 and not with_centre:
                        continue
                    out.append(padded[:, :, d + dy : d + dy + height, d + dx : d + dx + width])
        return torch.cat(out, dim=1).view(batch, channels, -1, height, width)

    samples = neighbours(image, with_centre=True)  # (1, 3, 18, H, W)
    sigma = samples.std(dim=2, keepdim=True)  # unbiased, over both windows
    affinity = -(image[:, :, None] - neighbours(image, with_centre=False)).abs() / (1e-8 + 0.1 * sigma)
    affinity = F.softmax(affinity.mean(dim=1, keepdim=True), dim=2)  # (1, 1, 16, H, W)
    for _ in range(steps):
        logits = (neighbours(logits, with_centre=False) * affinity).sum(dim=2)
    return logits


def postprocess(
    logits: torch.Tensor, query_to_class: torch.Tensor, config: SegmentorConfig
) -> tuple[torch.Tensor, np.ndarray]:
    """(K, H, W) probabilities and (H, W) labels, with the dense one-hot variant maximum."""
    probs = (logits * config.logit_scale).softmax(dim=0)  # (Q, H, W)
    num_classes = int(query_to_class.max()) + 1
    if num_classes != len(query_to_class):
        one_hot = F.one_hot(query_to_class, num_classes).T.view(num_classes, -1, 1, 1).to(probs.dtype)
        probs = (probs[None] * one_hot).max(dim=1)[0]  # (K, H, W) through a (K, Q, H, W) product
    if config.area_thd is not None:
        predicted = F.one_hot(probs.argmax(dim=0), num_classes).to(probs.dtype)
        area = predicted[:, :, 1:].sum(dim=(0, 1))
        probs[1:] *= (area > config.area_thd * area.sum()).to(probs.dtype)[:, None, None]
    labels = probs.argmax(dim=0)
    labels[probs.max(dim=0)[0] < config.prob_thd] = 0
    labels_np = labels.cpu().numpy().astype(np.int64)
    if config.closing:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
        labels_np = cv2.morphologyEx(labels_np.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(np.int64)
    return probs, labels_np


@torch.no_grad()
def predict(
    model: CLIP, image: torch.Tensor, original_size: tuple[int, int], text: TextClassifier, config: SegmentorConfig
) -> tuple[torch.Tensor, np.ndarray]:
    """The whole straightforward pipeline on a normalised image (3, h, w): (probabilities, labels)."""
    logits = image_logits(model, image, text.features, config, original_size)
    if config.pamr_steps > 0:
        guide = F.interpolate(image[None].to(logits.device), size=original_size, mode="bilinear")
        logits = pamr(guide, logits[None], config.pamr_steps, config.pamr_dilations)[0]
    return postprocess(logits, text.query_to_class.to(logits.device), config)
