"""Proxy models for proxy attention and mask attention: DINO through timm (extra `dino`) or SAM's image encoder.

Each takes a batch of CLIP-normalised window views (B, 3, h, w) and returns patch features on its own grid:
- `features(images)`: ProxyCLIP's proxy features. DINO: the last block's output after the final norm, patch tokens
  only (the image re-normalised with ImageNet's mean and std). SAM: the 256-d neck output of the image encoder on
  the window resized to the encoder's square input (1024 px for the released models; the aspect is not kept, as
  ProxyCLIP does), a 64 x 64 grid.
- `correlation(images)` (DINO): CorrCLIP's correlation features, q + k of the last block (heads concatenated).

Weights: the official DINO checkpoints (`dino_vits8`, `dino_vits16`, `dino_vitb8`, `dino_vitb16`; key-identical to
timm's ViTs) and SAM ViT-B are downloaded into the verified cache, or read from `proxy_checkpoint` (a path), or
built with random weights: `random` (full size) or `random-tiny[:SEED]` (2 blocks, 64 wide; for tests).
The positional embedding is resized as DINO's own code does (bicubic with the scale factors (rows + 0.1) / base and
(cols + 0.1) / base), not with timm's exact-size resampling, which differs by up to about 3e-2 on a 336 crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from itaclip_core.inference.preprocess import CLIP_MEAN_255, CLIP_STD_255
from itaclip_core.masks.checkpoints import CheckpointEntry, fetch_checkpoint
from itaclip_core.masks.extras import require
from itaclip_core.masks.maskset import MaskError
from itaclip_core.masks.sam import _read_checkpoint, _tiny_seed, load_sam
from itaclip_core.model.checkpoint import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINO_URL = "https://dl.fbaipublicfiles.com/dino"
DINO_MODELS: dict[str, tuple[str, CheckpointEntry]] = {
    "dino_vits8": ("vit_small_patch8_224", CheckpointEntry(
        f"{_DINO_URL}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", "dino_deitsmall8_pretrain.pth")),
    "dino_vits16": ("vit_small_patch16_224", CheckpointEntry(
        f"{_DINO_URL}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", "dino_deitsmall16_pretrain.pth")),
    "dino_vitb8": ("vit_base_patch8_224", CheckpointEntry(
        f"{_DINO_URL}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", "dino_vitbase8_pretrain.pth")),
    "dino_vitb16": ("vit_base_patch16_224", CheckpointEntry(
        f"{_DINO_URL}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", "dino_vitbase16_pretrain.pth")),
}
SAM_PROXIES = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}
PROXY_MODELS = (*DINO_MODELS, *SAM_PROXIES)


def _to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised (B, 3, h, w) -> RGB in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD_255, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean) / 255.0


def _imagenet(images: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """ImageNet-normalised images, cut to a multiple of `patch` (the remainder is dropped, as CLIP's patch
    convolution drops it)."""
    images = images[..., : images.shape[-2] // patch * patch, : images.shape[-1] // patch * patch]
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (_to_unit_rgb(images) - mean) / std


class DinoProxy:
    """A DINO ViT through timm."""

    def __init__(self, name: str = "dino_vitb8", checkpoint: str | Path | None = None,
                 device: torch.device | str = "cpu", cache_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        timm = require("dino", what=f"the {name} proxy model")
        arch, entry = DINO_MODELS[name]
        seed = _tiny_seed(checkpoint)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed or 0)
        try:
            if seed is not None:
                model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, depth=2,
                                          embed_dim=64, num_heads=2)
            else:
                model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
        finally:
            torch.random.set_rng_state(state)
        if seed is None and str(checkpoint) != "random":
            path = Path(checkpoint).expanduser() if checkpoint is not None else \
                fetch_checkpoint(entry, cache_dir, progress)
            weights = _read_checkpoint(path)
            if not isinstance(weights, dict) or "pos_embed" not in weights:
                raise CheckpointError(f"{path} is not a DINO ViT checkpoint (no pos_embed); give the official "
                                      f"{entry.filename} ({entry.url})")
            try:
                model.load_state_dict(weights, strict=True)
            except RuntimeError as error:
                raise CheckpointError(f"{path} does not fit {name} ({arch}): {str(error)[:300]}") from None
        self.name = name
        self.model = model.to(device).eval().requires_grad_(False)
        self.patch = int(model.patch_embed.patch_size[0])

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch, width // self.patch

    def positional_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows * cols, C): DINO's `interpolate_pos_encoding` (unchanged on the training grid)."""
        pos = self.model.pos_embed  # (1, 1 + base * base, C)
        base = int(round((pos.shape[1] - 1) ** 0.5))
        if (rows, cols) == (base, base):
            return pos
        grid = pos[:, 1:].reshape(1, base, base, -1).permute(0, 3, 1, 2)  # (1, C, base, base)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / base, (cols + 0.1) / base), mode="bicubic")
        if grid.shape[-2:] != (rows, cols):
            raise RuntimeError(f"positional-embedding resize gave {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def _tokens(self, images: torch.Tensor, last_block: Any = None) -> torch.Tensor:
        """Final-norm tokens (B, 1 + N, C) of the ViT, with DINO's positional embedding; `last_block(x)` (if
        given) is called on the input of the last block instead of finishing, and its result returned."""
        model = self.model
        x = _imagenet(images, self.patch).to(model.pos_embed.device)
        x = model.patch_embed(x)  # (B, rows, cols, C): timm's dynamic-size layout
        batch, rows, cols, width = x.shape
        x = torch.cat([model.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, width)], dim=1)
        x = model.norm_pre(x + self.positional_embedding(rows, cols))
        for block in model.blocks[:-1]:
            x = block(x)
        if last_block is not None:
            return last_block(x)
        return model.norm(model.blocks[-1](x))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens = self._tokens(images)[:, 1:]
        return tokens, self.grid(images.shape[-2], images.shape[-1])

    @torch.no_grad()
    def correlation(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        last = self.model.blocks[-1]
        qkv = self._tokens(images, lambda x: last.attn.qkv(last.norm1(x)))[:, 1:]  # (B, N, 3 C)
        width = qkv.shape[-1] // 3
        return qkv[..., :width] + qkv[..., width: 2 * width], self.grid(images.shape[-2], images.shape[-1])


class SamProxy:
    """SAM's image encoder (neck output) as the proxy."""

    def __init__(self, name: str = "sam_vit_b", checkpoint: str | Path | None = None,
                 device: torch.device | str = "cpu", cache_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        model = load_sam(SAM_PROXIES[name], checkpoint, cache_dir, progress, setting="proxy_model")
        self.name = name
        self.encoder = model.image_encoder.to(device).eval().requires_grad_(False)
        self.size = int(self.encoder.img_size)
        self.mean = model.pixel_mean.view(1, 3, 1, 1).to(device) / 255.0
        self.std = model.pixel_std.view(1, 3, 1, 1).to(device) / 255.0

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = _to_unit_rgb(images).to(self.mean.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.encoder((x - self.mean) / self.std)  # (B, 256, g, g)
        return out.flatten(2).transpose(1, 2), (int(out.shape[-2]), int(out.shape[-1]))

    def correlation(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.features(images)


def build_proxy(name: str, checkpoint: str | Path | None = None, device: Any = "cpu",
                cache_dir: str | Path | None = None, progress: bool = True) -> DinoProxy | SamProxy:
    """A proxy model by name (`dino_vitb8`, ..., `sam_vit_b`)."""
    if name in DINO_MODELS:
        return DinoProxy(name, checkpoint, device, cache_dir, progress)
    if name in SAM_PROXIES:
        return SamProxy(name, checkpoint, device, cache_dir, progress)
    raise MaskError(f"proxy_model {name!r} is not one of {', '.join(PROXY_MODELS)}")
