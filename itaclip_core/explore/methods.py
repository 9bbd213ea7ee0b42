"""The method zoo side by side: every method's settings for typed classes and the attention of one query patch."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from itaclip_core.attention.dense import attention_maps
from itaclip_core.explore.settings import notebook_config, open_vocabulary_config
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import PRESETS, SegmentorConfig

__all__ = ["ZOO_METHODS", "available_methods", "method_config", "method_attention", "centre_square"]

# display name -> the preset whose architecture the method zoo notebook runs (its VOC21 settings)
ZOO_METHODS = {"ITACLIP": "itaclip_voc21", "SCLIP": "sclip_voc21", "NACLIP": "naclip_voc21",
               "ClearCLIP": "clearclip_voc21", "ResCLIP": "resclip_voc21", "SC-CLIP": "scclip_voc21",
               "CLIPtrase": "cliptrase_voc21_224"}


def available_methods() -> dict[str, str]:
    """The methods of `ZOO_METHODS` whose presets exist in this installation."""
    return {name: preset for name, preset in ZOO_METHODS.items() if preset in PRESETS}


def method_config(preset: str, overrides: Sequence[str] | None = None) -> SegmentorConfig:
    """A method's preset for typed classes (no class file, background or thresholds), in the standard protocol so
    that every method segments the same image at its own size, with the notebook's OVERRIDES applied."""
    config = open_vocabulary_config(notebook_config(preset, overrides))
    return config.replace(protocol="standard") if config.protocol != "standard" else config


def centre_square(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The largest centred square of a (3, H, W) image whose side is a multiple of the patch size: (3, S, S)."""
    side = (min(image.shape[-2:]) // patch_size) * patch_size
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    return image[:, top : top + side, left : left + side]


@torch.no_grad()
def method_attention(model: CLIP, crop: torch.Tensor, config: SegmentorConfig,
                     query: tuple[int, int]) -> np.ndarray:  # fmt: skip
    """The last-block attention of one query patch (row, col) over the patches of a crop (3, h, w), as the method
    applies it, averaged over heads: (rows, cols). ResCLIP's map is shown without its SFR term (which needs a first
    pass with the text); SC-CLIP's is its main branch; CLIPtrase's is its q-q + k-k + v-v map."""
    from itaclip_core.methods.cliptrase import cliptrase_attention
    from itaclip_core.methods.scclip import scclip_attention, settings_from

    visual = model.visual
    images = crop[None].to(model.device, model.dtype)
    rows, cols = visual.grid_size(*crop.shape[-2:])
    index = query[0] * cols + query[1]
    if config.readout == "scclip":
        row = scclip_attention(visual, images, settings_from(config))[0, index]
    elif config.readout == "cliptrase":
        row = cliptrase_attention(visual, images)[0, 1 + index, 1:]
    else:
        row = attention_maps(visual, images, config.dense_config())["fused"][0, :, 1 + index, 1:].mean(dim=0)
    return row.view(rows, cols).cpu().numpy()
