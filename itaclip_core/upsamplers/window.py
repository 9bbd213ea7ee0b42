"""Window upsamplers: the dense engine's hook that brings each window's patch features to the window's pixels and
matches them with the text there, so that the sliding-window stitch averages upsampled features' logits.

`build_upsampler(config, model)` gives None (no upsampler, the default) or an instance of the registered class
named by `config.upsampler`; `DenseInference` calls its `window_logits` in place of the patch-grid text matching.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from itaclip_core.upsamplers.loftup import LoftUp, load_loftup

if TYPE_CHECKING:
    from itaclip_core.model.clip import CLIP
    from itaclip_core.presets import SegmentorConfig


class WindowUpsampler(ABC):
    """Turns per-window patch features into per-window, per-pixel logits."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, config: "SegmentorConfig", model: "CLIP") -> "WindowUpsampler":
        """Build it for a CLIP and the config's settings."""

    @abstractmethod
    def window_logits(self, features: torch.Tensor, crops: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(N, rows, cols, D) patch features, (N, 3, h, w) crops, (Q, D) text -> (N, Q, h, w) float32 logits."""


class LoftUpUpsampler(WindowUpsampler):
    """LoftUp per window, guided by the window's crop; the upsampled features are L2-normalised, then matched."""

    name = "loftup"

    def __init__(self, loftup: LoftUp) -> None:
        self.loftup = loftup

    @classmethod
    def from_config(cls, config: "SegmentorConfig", model: "CLIP") -> "LoftUpUpsampler":
        dim = model.config.embed_dim
        loftup = load_loftup(config.upsampler_weights, dim=dim)
        if loftup.dim != dim:
            raise ValueError(
                f"the LoftUp weights ({config.upsampler_weights or 'cache'}) upsample {loftup.dim}-d features but the "
                f"CLIP's dense features are {dim}-d: the published LoftUp CLIP checkpoint fits ViT-B/16 (512-d)"
            )
        return cls(loftup.to(model.device))

    @torch.no_grad()
    def window_logits(self, features: torch.Tensor, crops: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        device = next(self.loftup.parameters()).device
        text = text_features.to(device, torch.float32)
        out = []
        for i in range(features.shape[0]):  # one window at a time: LoftUp's min-max scaling spans its batch
            lr = features[i].to(device, torch.float32).permute(2, 0, 1)[None]  # (1, D, rows, cols)
            up = F.normalize(self.loftup(lr, crops[i : i + 1].to(device, torch.float32))[0], dim=0)  # (D, h, w)
            out.append(torch.einsum("dhw,qd->qhw", up, text))
        return torch.stack(out)


UPSAMPLERS: dict[str, type[WindowUpsampler]] = {cls.name: cls for cls in (LoftUpUpsampler,)}


def build_upsampler(config: "SegmentorConfig", model: "CLIP") -> WindowUpsampler | None:
    """The window upsampler named by `config.upsampler`, or None."""
    if config.upsampler is None:
        return None
    if config.upsampler not in UPSAMPLERS:
        raise ValueError(
            f"upsampler is {config.upsampler!r}; known upsamplers: {', '.join(UPSAMPLERS)} (none for no upsampler)"
        )
    return UPSAMPLERS[config.upsampler].from_config(config, model)
