"""SC-CLIP and CLIPtrase in the batched sliding-window engine.

Both reuse `DenseInference`'s windows, batching and exact stitching; only the image tower's readout differs:
- SC-CLIP: `scclip_tokens` per batch of windows; its three P x P affinities and the last block's attention maps
  live for one batch only;
- CLIPtrase: `cliptrase_tokens` per batch; each window's correlation matrix is turned into DBSCAN clusters and
  filtered cluster maps (K x 4 rows x 4 cols) right away and dropped, so no P x P matrix outlives its batch. After
  post-processing, `finish_labels` lets every window's clusters vote on the label map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itaclip_core.attention.dense import DenseConfig
from itaclip_core.inference.engine import DenseInference
from itaclip_core.inference.sliding import Window
from itaclip_core.methods import cliptrase as ct
from itaclip_core.methods.scclip import SCCLIPSettings, scclip_tokens
from itaclip_core.model.clip import CLIP


class SCCLIPInference(DenseInference):
    """The sliding-window engine with SC-CLIP's readout."""

    def __init__(self, model: CLIP, settings: SCCLIPSettings, crop: int, stride: int,
                 batch_size: int | None = None) -> None:
        super().__init__(model, DenseConfig(), crop=crop, stride=stride, image_engineering=False,
                         batch_size=batch_size)
        settings.check(len(model.visual.blocks))
        self.settings = settings

    @torch.no_grad()
    def window_features(self, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised SC-CLIP patch features of crops (N, 3, h, w): (N, rows, cols, D) float32."""
        visual = self.model.visual
        rows, cols = visual.grid_size(crops.shape[-2], crops.shape[-1])
        chunks = []
        for start in range(0, crops.shape[0], self.batch_size):
            chunk = crops[start : start + self.batch_size].to(self.model.device, self.model.dtype)
            tokens = scclip_tokens(visual, chunk, self.settings).float()  # (n, P, D)
            chunks.append(F.normalize(tokens, dim=-1).view(chunk.shape[0], rows, cols, -1))
        return torch.cat(chunks)


class CLIPtraseInference(DenseInference):
    """The sliding-window engine with CLIPtrase's readout and its cluster vote."""

    def __init__(self, model: CLIP, settings: ct.CLIPtraseSettings, logit_scale: float, crop: int, stride: int,
                 batch_size: int | None = None) -> None:
        super().__init__(model, DenseConfig(), crop=crop, stride=stride, image_engineering=False,
                         batch_size=batch_size)
        settings.check()
        self.settings = settings
        self.logit_scale = logit_scale
        self._clusters: tuple[list[Window], list[torch.Tensor | None], tuple[int, int]] | None = None

    @torch.no_grad()
    def patch_logits(self, image: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, list[Window]]:
        """Per-window patch similarities (N, Q, rows, cols); the windows' cluster maps are kept for the vote."""
        height, width = image.shape[-2:]
        windows = self.windows(height, width)
        crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
        logits, maps = [], []
        for start in range(0, len(windows), self.batch_size):
            chunk = crops[start : start + self.batch_size].to(self.model.device)
            chunk_logits, chunk_maps = ct.window_logits_and_clusters(self.model.visual, chunk, text_features,
                                                                     self.settings, self.logit_scale)
            logits.append(chunk_logits)
            maps.extend(chunk_maps)
        self._clusters = (windows, maps, (height, width))
        return torch.cat(logits), windows

    def finish_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The vote of the last image's window clusters on its label map (H0, W0)."""
        if self._clusters is None:
            raise RuntimeError("finish_labels needs the clusters of an image: call logits(...) first")
        windows, maps, resized = self._clusters
        self._clusters = None
        return ct.vote_on_windows(labels, windows, maps, resized)


def build_engine(model: CLIP, config) -> DenseInference:
    """The engine a `SegmentorConfig` asks for: SC-CLIP's or CLIPtrase's, else the standard one."""
    from itaclip_core.methods.scclip import settings_from as scclip_settings

    ct.check_protocol(config.protocol)
    if config.protocol == "centre_crop" and config.method != "cliptrase":
        raise ValueError(f"protocol=centre_crop is CLIPtrase's protocol; method is {config.method!r}")
    if config.method == "scclip":
        return SCCLIPInference(model, scclip_settings(config), config.crop, config.stride, config.batch_size)
    if config.method == "cliptrase":
        return CLIPtraseInference(model, ct.settings_from(config), config.logit_scale, config.crop, config.stride,
                                  config.batch_size)
    return DenseInference(model, config.dense_config(), crop=config.crop, stride=config.stride,
                          image_engineering=config.image_engineering, img_eng_coef=config.img_eng_coef,
                          batch_size=config.batch_size)
