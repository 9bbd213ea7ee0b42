"""Inspection of the image side: patch tokens, attention of one query patch, per-view logits, and the
post-processing step by step."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from itaclip_core.attention.dense import DenseConfig, attention_maps, dense_tokens
from itaclip_core.inference.preprocess import PreparedImage, renormalise_for
from itaclip_core.inference.sliding import Window, stitch
from itaclip_core.inference.views import VIEW_NAMES, make_views
from itaclip_core.model.clip import CLIP
from itaclip_core.postprocess import area_threshold, class_probabilities, close_labels, labels_from_probs, postprocess
from itaclip_core.refinement.logits import build_logit_refinements, refine_logits
from itaclip_core.segmentor import Prediction, Segmentor
from itaclip_core.text.classifier import TextClassifier



__all__ = [
    'patch_tokens', 'pca_rgb', 'attention_parts', 'query_attention', 'window_features', 'logits_from_features',
    'view_logits', 'mix_view_logits', 'finish_prediction', 'PipelineStep', 'pipeline_steps',
]

def patch_tokens(model: CLIP, image: torch.Tensor, dense: DenseConfig) -> torch.Tensor:
    """L2-normalised dense patch features (rows, cols, D) float32 of a normalised image (3, h, w)."""
    rows, cols = model.visual.grid_size(image.shape[-2], image.shape[-1])
    image = renormalise_for(image, model.config.image_mean, model.config.image_std)  # the model's own constants
    with torch.no_grad():
        tokens = dense_tokens(model.visual, image[None].to(model.device, model.dtype), dense)[0, 1:].float()
    return F.normalize(tokens, dim=-1).view(rows, cols, -1).cpu()  # (rows * cols, D) -> (rows, cols, D)


def pca_rgb(tokens: torch.Tensor) -> np.ndarray:
    """The first three principal components of patch features (rows, cols, D) as colours (rows, cols, 3) in [0, 1]."""
    rows, cols, dim = tokens.shape
    flat = tokens.reshape(rows * cols, dim).double()
    flat = flat - flat.mean(dim=0)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[:3].T  # (rows * cols, k), k <= 3
    proj = proj * torch.sign(proj[proj.abs().argmax(dim=0), torch.arange(proj.shape[1])])  # fix each sign
    low, high = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - low) / (high - low).clamp_min(1e-12)
    out = torch.zeros(rows * cols, 3, dtype=torch.float64)
    out[:, : proj.shape[1]] = proj
    return out.view(rows, cols, 3).numpy()


def attention_parts(model: CLIP, image: torch.Tensor, query: tuple[int, int],
                    dense: DenseConfig) -> dict[str, np.ndarray]:  # fmt: skip
    """Every attention map `attention_maps` gives for one setting (`last`, `block<N>` of the fused blocks, `fused`),
    as the attention of one query patch: name -> (rows, cols) float32, mean over heads, class token left out.

    Args:
        model: the CLIP.
        image: (3, h, w) normalised image.
        query: (row, col) of the query patch on the patch grid.
        dense: the dense setting.
    """
    rows, cols = model.visual.grid_size(image.shape[-2], image.shape[-1])
    row, col = query
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"query patch {query} lies outside the {rows} x {cols} patch grid")
    token = 1 + row * cols + col
    image = renormalise_for(image, model.config.image_mean, model.config.image_std)  # the model's own constants
    with torch.no_grad():
        maps = attention_maps(model.visual, image[None].to(model.device, model.dtype), dense)  # each (1, H, T, T)
    return {name: m[0, :, token, 1:].mean(dim=0).view(rows, cols).cpu().numpy() for name, m in maps.items()}


def query_attention(model: CLIP, image: torch.Tensor, query: tuple[int, int],
                    configs: Mapping[str, DenseConfig]) -> dict[str, np.ndarray]:  # fmt: skip
    """The attention of one query patch over the patches, as each dense setting applies it in the last block:
    name -> (rows, cols) map (the `fused` map of `attention_parts`: the last block's own map, fused with the
    intermediate blocks' maps when the setting fuses them)."""
    return {name: attention_parts(model, image, query, dense)["fused"] for name, dense in configs.items()}


def window_features(segmentor: Segmentor, prepared: PreparedImage) -> tuple[torch.Tensor, list[Window]]:
    """The mixed patch features (N, rows, cols, D) of every window of an image, and the windows: the part of the
    pipeline that does not depend on the texts (reuse it across classifiers)."""
    image = prepared.tensor.to(segmentor.model.device, torch.float32)
    windows = segmentor.engine.windows(image.shape[-2], image.shape[-1])
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
    return segmentor.engine.window_features(crops), windows


def logits_from_features(features: torch.Tensor, windows: list[Window], prepared: PreparedImage,
                         text_features: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-query similarities (Q, H0, W0) at the original size from `window_features`' output."""
    text = text_features.to(features.device, torch.float32)
    patch = (features @ text.T).permute(0, 3, 1, 2)  # (N, rows, cols, Q) -> (N, Q, rows, cols)
    return stitch(patch, windows, tuple(prepared.tensor.shape[-2:]), prepared.original_size)


def view_logits(segmentor: Segmentor, prepared: PreparedImage) -> dict[str, torch.Tensor]:
    """The similarities (Q, H0, W0) of each image-engineering view alone (flipped views flipped back), at the
    original size. `mix_view_logits` of them is what the pipeline computes with image engineering."""
    engine, visual = segmentor.engine, segmentor.model.visual
    image = prepared.tensor.to(segmentor.model.device, torch.float32)
    windows = engine.windows(image.shape[-2], image.shape[-1])
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
    rows, cols = visual.grid_size(crops.shape[-2], crops.shape[-1])
    per_chunk = max(1, engine.batch_size // len(VIEW_NAMES))
    chunks = []
    with torch.no_grad():
        for start in range(0, crops.shape[0], per_chunk):
            chunk = crops[start : start + per_chunk]
            chunk = renormalise_for(chunk, segmentor.model.config.image_mean, segmentor.model.config.image_std)
            views = make_views(chunk, True).to(segmentor.model.dtype)  # (5 * n, 3, h, w)
            tokens = F.normalize(dense_tokens(visual, views, engine.dense)[:, 1:].float(), dim=-1)
            chunks.append(tokens.view(len(VIEW_NAMES), chunk.shape[0], rows, cols, -1))  # (5, n, rows, cols, D)
    features = torch.cat(chunks, dim=1)  # (5, N, rows, cols, D)
    features[3] = torch.flip(features[3], dims=[1])  # vertical flip undone on the patch rows
    features[4] = torch.flip(features[4], dims=[2])  # horizontal flip undone on the patch columns
    text = segmentor.classifier.features
    return {name: logits_from_features(features[i], windows, prepared, text) for i, name in enumerate(VIEW_NAMES)}


def mix_view_logits(logits: Mapping[str, torch.Tensor], coef: float) -> torch.Tensor:
    """ITACLIP's mix of the five views' similarities: coef * mean(original, gray, blur) + (1 - coef) * mean(flips)."""
    first = sum(logits[name] for name in VIEW_NAMES[:3]) / 3
    flipped = sum(logits[name] for name in VIEW_NAMES[3:]) / 2
    return coef * first + (1.0 - coef) * flipped


def finish_prediction(segmentor: Segmentor, prepared: PreparedImage, logits: torch.Tensor,
                      classifier: TextClassifier | None = None) -> Prediction:  # fmt: skip
    """PAMR (when the config enables it) and post-processing of per-query similarities (Q, H0, W0), as
    `Segmentor.predict_prepared` does after the image side."""
    config = segmentor.config
    classifier = classifier or segmentor.classifier
    logits = refine_logits(logits, build_logit_refinements(config), prepared.tensor.to(logits.device),
                           prepared.original_size, config.logit_scale)  # PAMR and the other logit refinements
    result = postprocess(logits, classifier.query_to_class, config.logit_scale, prob_thd=config.prob_thd,
                         area_thd=config.area_thd, closing=config.closing, num_classes=classifier.num_classes)
    return Prediction(result.labels.cpu().numpy().astype(np.int64), result.probs.cpu().numpy(),
                      list(classifier.class_names), prepared.name)  # fmt: skip


class PipelineStep(NamedTuple):
    """The label map after one step of the post-processing."""

    name: str  # what the step does
    labels: np.ndarray  # (H0, W0) int64
    enabled: bool  # False: the settings skip this step (the labels are those of the step before)


def pipeline_steps(segmentor: Segmentor, prepared: PreparedImage) -> list[PipelineStep]:
    """The label map after each step: raw similarities, PAMR, area threshold, probability threshold, closing.
    The last step's labels equal `segmentor.predict_prepared(prepared).labels`."""
    config, classifier = segmentor.config, segmentor.classifier
    image = prepared.tensor.to(segmentor.model.device, torch.float32)
    with torch.no_grad():
        logits = segmentor.engine.logits(image, classifier.features, prepared.original_size)
        steps = []

        def probs_of(values: torch.Tensor) -> torch.Tensor:
            return class_probabilities(values, classifier.query_to_class, config.logit_scale, classifier.num_classes)

        steps.append(PipelineStep("argmax of the similarities", probs_of(logits).argmax(dim=0).cpu().numpy(), True))
        refinements = build_logit_refinements(config)  # PAMR unless `logit_refine` names others
        logits = refine_logits(logits, refinements, image, prepared.original_size, config.logit_scale)
        names = [r.name for r in refinements]
        title = f"PAMR ({config.pamr_steps} steps)" if names in ([], ["pamr"]) else "refined: " + ", ".join(names)
        probs = probs_of(logits)
        steps.append(PipelineStep(title, probs.argmax(dim=0).cpu().numpy(), bool(refinements)))
        probs = area_threshold(probs, config.area_thd)
        steps.append(PipelineStep(f"area threshold {config.area_thd}", probs.argmax(dim=0).cpu().numpy(),
                                  config.area_thd is not None))  # fmt: skip
        labels = labels_from_probs(probs, config.prob_thd)
        steps.append(PipelineStep(f"probability threshold {config.prob_thd}", labels.cpu().numpy(),
                                  config.prob_thd > 0))  # fmt: skip
        closed = close_labels(labels) if config.closing else labels
        steps.append(PipelineStep("3x3 closing", closed.cpu().numpy(), config.closing))
    return [PipelineStep(s.name, s.labels.astype(np.int64), s.enabled) for s in steps]


