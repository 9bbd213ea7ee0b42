"""The model, dataset and settings a notebook's parameters name, and texts for typed class names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from itaclip_core import vis
from itaclip_core.attention.dense import DenseConfig
from itaclip_core.data.base import SegDataset
from itaclip_core.data.registry import get_dataset
from itaclip_core.inference.preprocess import ImageInput, to_bgr_uint8
from itaclip_core.model.clip import CLIP
from itaclip_core.model.random import is_random_spec
from itaclip_core.model.weights import load_clip
from itaclip_core.presets import SegmentorConfig, apply_overrides, get_preset
from itaclip_core.resources import texts_dir
from itaclip_core.segmentor import Segmentor
from itaclip_core.text.classes import aux_name_matches, parse_class_list, read_aux_file
from itaclip_core.text.classifier import TextClassifier, build_classifier, load_templates
from itaclip_core.errors import UserError
from itaclip_core.explore.runs import project_root, resolve_path



__all__ = [
    'load_model', 'override_list', 'notebook_config', 'open_dataset', 'open_vocabulary_config', 'with_dense',
    'explorer_config', 'shipped_aux_texts', 'set_classes_with_texts', 'class_palette', 'load_rgb',
]

def load_model(model: str, weights: str | Path | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> CLIP:  # fmt: skip
    """The CLIP the parameters name: WEIGHTS (a checkpoint path) when given, else MODEL (`ViT-B/16`, a path,
    `random-tiny`).

    Args:
        model: an OpenAI model name, a checkpoint path or a random-model spec.
        weights: a checkpoint file that replaces `model` (None: use `model`).
        device: e.g. "cpu" or "cuda" (None: CUDA when available).
        dtype: compute dtype (None: float16 on CUDA, float32 on CPU).
    """
    spec: str | Path = model
    if weights not in (None, ""):
        named = is_random_spec(str(weights)) or str(weights).startswith("open_clip:")  # names, not files
        spec = weights if named else resolve_path(weights, what="WEIGHTS")
    try:
        return load_clip(spec, device=device, dtype=dtype, progress=True)
    except UserError as error:  # name the notebook's parameter, not load_clip's
        parameter = "WEIGHTS" if weights not in (None, "") else "MODEL"
        message = str(error).replace(f"weights={str(spec)!r}", f"{parameter}={str(spec)!r}")
        message = message.replace("device=", "DEVICE=").replace("dtype=", "DTYPE=").replace("weights=", "MODEL=")
        raise UserError(message) from None


def override_list(overrides: str | Sequence[str] | None) -> list[str]:
    """OVERRIDES as a list of `key=value` strings (one string is one override; None or "" is none)."""
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return []
    return [overrides] if isinstance(overrides, str) else [str(item) for item in overrides]


def notebook_config(preset: str, overrides: str | Sequence[str] | Mapping[str, Any] | None = None) -> SegmentorConfig:
    """The preset PRESET with the OVERRIDES applied (`key=value` strings, one string, or a dict).

    Text files given by a relative path that exists under the working folder or the project root (templates, class
    file, auxiliary file) are made absolute, so that the notebook finds them from any working folder.
    """
    if not isinstance(overrides, Mapping):
        overrides = override_list(overrides)
    config = apply_overrides(get_preset(preset), overrides)
    changes = {}
    for key in ("templates", "classes", "aux_file"):
        value = getattr(config, key)
        if value is not None and not Path(value).is_absolute() and not (texts_dir() / value).is_file():
            for base in (Path.cwd(), project_root()):
                if (base / value).is_file():
                    changes[key] = str((base / value).resolve())
                    break
    return config.replace(**changes) if changes else config


def open_dataset(name: str | None, root: str | Path, config: SegmentorConfig | None = None) -> SegDataset:
    """The benchmark DATASET under DATA_ROOT, checked against the preset it is evaluated with.

    Args:
        name: dataset registry name (None: the preset's dataset).
        root: the dataset root (relative to the working folder or the project root).
        config: the settings in use; a preset made for another dataset is refused.
    """
    name = name or (config.dataset if config is not None else None)
    if name is None:
        raise ValueError("DATASET is not set and the preset is not made for a dataset: set DATASET (e.g. 'voc21')")
    if config is not None and config.dataset not in (None, name):
        raise ValueError(f"PRESET {config.name} is made for {config.dataset} but DATASET is {name}: choose a "
                         f"preset made for {name} (e.g. itaclip_{name} or sclip_{name})")  # fmt: skip
    return get_dataset(name, resolve_path(root, what="DATA_ROOT"))


def open_vocabulary_config(config: SegmentorConfig) -> SegmentorConfig:
    """The settings of `config` for arbitrary class names: its architecture, image engineering, PAMR, closing and
    logit scale, without its class file, auxiliary file, background class and thresholds."""
    return config.replace(name=f"{config.name}+open_vocab", dataset=None, classes=None, background=False,
                          aux_file=None, aux_coef=0.0, prob_thd=0.0, area_thd=None)  # fmt: skip


def with_dense(config: SegmentorConfig, dense: DenseConfig) -> SegmentorConfig:
    """`config` with the image tower read out as `dense` says (e.g. a `DENSE_METHODS` entry)."""
    if dense.block_variants:
        raise ValueError("a SegmentorConfig cannot hold per-block attention variants (block_variants)")
    return config.replace(attention=dense.variant, fuse_blocks=tuple(dense.fuse_blocks),
                          fuse_attention=dense.fuse_variant, fuse_weight=dense.fuse_weight,
                          last_residual=dense.last_residual, last_mlp=dense.last_mlp)  # fmt: skip


def explorer_config(base: SegmentorConfig, image_engineering: bool, attention: str, fuse: bool, pamr: bool,
                    closing: bool, prob_thd: float, area_thd: float, stride: int) -> SegmentorConfig:  # fmt: skip
    """Settings from the explorer's switches, on top of `base` (usually `open_vocabulary_config` of a preset).

    Args:
        image_engineering: five views per window.
        attention: the last block's attention variant (a name in `ATTENTION_VARIANTS`).
        fuse: fuse the attention maps of blocks 7, 8 and 10 into the last block's (ITACLIP).
        pamr: refine with PAMR (the base's steps, 10 when the base has none).
        closing: 3 x 3 closing of the label map.
        prob_thd: probability threshold (pixels below it get class 0).
        area_thd: area threshold (0: none).
        stride: sliding-window step in pixels.
    """
    return base.replace(image_engineering=bool(image_engineering), attention=attention,
                        fuse_blocks=(7, 8, 10) if fuse else (), pamr_steps=(base.pamr_steps or 10) if pamr else 0,
                        closing=bool(closing), prob_thd=float(prob_thd), area_thd=float(area_thd) or None,
                        stride=int(stride), name=f"{base.name}+explorer")  # fmt: skip


def shipped_aux_texts(names: Sequence[str], kind: str = "definitions") -> list[str | None]:
    """For each class name, the first definition (or synonym list) of that name in the shipped files, or None.

    Args:
        names: class names (a `|`-separated string lists variants, any of which may match).
        kind: "definitions" or "synonyms".
    """
    if kind not in ("definitions", "synonyms"):
        raise ValueError(f"kind must be 'definitions' or 'synonyms', got {kind!r}")
    entries = [entry for path in sorted((texts_dir() / kind).glob("*.txt")) for entry in read_aux_file(path)]
    found: list[str | None] = []
    for name in names:
        variants = [v.strip() for v in name.split("|")]
        found.append(next((text for line_name, text in entries if aux_name_matches(line_name, variants)), None))
    return found


def set_classes_with_texts(segmentor: Segmentor, classes: str | Sequence[str], aux_texts: Sequence[str | None],
                           aux_coef: float) -> TextClassifier:  # fmt: skip
    """Give a segmentor typed classes with one auxiliary text per class (None: the class's own name, which
    leaves its embedding unchanged). Returns the new classifier, also set on the segmentor."""
    vocab = parse_class_list(classes)
    if len(aux_texts) != vocab.num_classes:
        raise ValueError(f"{len(aux_texts)} auxiliary texts for {vocab.num_classes} classes: give one per class")
    texts = [text if text else names[0] for text, names in zip(aux_texts, vocab.variants)]
    config = segmentor.config
    segmentor.classifier = build_classifier(
        segmentor.model, vocab, load_templates(config.templates), aux_texts=texts, aux_coef=aux_coef,
        background=False, batch_size=config.text_batch_size, truncate=config.truncate_texts,
        cache_dir=segmentor.cache_dir,
    ).to(segmentor.model.device)  # fmt: skip
    return segmentor.classifier


def class_palette(num_classes: int, background: bool) -> np.ndarray:
    """Display colours (num_classes, 3): the VOC colour map, whose first colour (black) only a background class
    gets; without one, every class gets a visible colour."""
    return vis.palette(num_classes) if background else vis.palette(num_classes + 1)[1:]


def load_rgb(image: ImageInput) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, decoded as the pipeline decodes it."""
    return np.ascontiguousarray(to_bgr_uint8(image)[:, :, ::-1])


