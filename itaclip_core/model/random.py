"""Seeded random CLIPs in OpenAI's key layout, for tests, CI notebooks and benchmarks.

The weights follow CLIP's own initialisation scheme, drawn from a seeded generator, so the same size and seed always
give the same state dict on any machine. `random-tiny` has the sizes of the reference test model (vision width 128,
12 blocks, 2 heads, patch 16; text width 64, 12 blocks; embedding 64); `random-vit-b-16` has ViT-B/16's sizes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from itaclip_core.model.clip import CLIP, CLIPConfig

RANDOM_SIZES: dict[str, CLIPConfig] = {
    "tiny": CLIPConfig(embed_dim=64, image_size=224, patch_size=16, vision_width=128, vision_layers=12,
                       vision_heads=2, context_length=77, vocab_size=49408, text_width=64, text_layers=12,
                       text_heads=1),
    "vit-b-16": CLIPConfig(embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                           vision_heads=12, context_length=77, vocab_size=49408, text_width=512, text_layers=12,
                           text_heads=8),
    "vit-b-32": CLIPConfig(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                           vision_heads=12, context_length=77, vocab_size=49408, text_width=512, text_layers=12,
                           text_heads=8),
    # ViT-L/14's geometry (patch 14, 24 image blocks) at the tiny widths: block numbers and window grids of L/14.
    "tiny-l-14": CLIPConfig(embed_dim=64, image_size=224, patch_size=14, vision_width=128, vision_layers=24,
                            vision_heads=2, context_length=77, vocab_size=49408, text_width=64, text_layers=12,
                            text_heads=1),
    "vit-l-14": CLIPConfig(embed_dim=768, image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                           vision_heads=16, context_length=77, vocab_size=49408, text_width=768, text_layers=12,
                           text_heads=12),
    # OpenCLIP ViT-H/14's sizes (GELU, 80-wide heads); for speed and memory measurements.
    "vit-h-14": CLIPConfig(embed_dim=1024, image_size=224, patch_size=14, vision_width=1280, vision_layers=32,
                           vision_heads=16, context_length=77, vocab_size=49408, text_width=1024, text_layers=24,
                           text_heads=16, activation="gelu", name="ViT-H-14"),
}

_SPEC = re.compile(r"^random-([a-z0-9-]+?)(?::(\d+))?$")


def random_clip_state_dict(size: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 state dict in OpenAI's layout with CLIP's initialisation, drawn from `torch.Generator(seed)`."""
    if size not in RANDOM_SIZES:
        raise ValueError(f"unknown random CLIP size {size!r}; known: {', '.join(RANDOM_SIZES)}")
    return random_state_dict_for(RANDOM_SIZES[size], seed)


def random_state_dict_for(config: CLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The seeded random state dict of any `CLIPConfig` (layer-scale vectors near 1, as layer norms)."""
    with torch.device("meta"):  # names and shapes only
        model = CLIP(config)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    vision_scale = config.vision_width**-0.5
    text_blocks_std = {
        "attn.in_proj_weight": config.text_width**-0.5,
        "attn.out_proj.weight": config.text_width**-0.5 * (2 * config.text_layers) ** -0.5,
        "mlp.c_fc.weight": (2 * config.text_width) ** -0.5,
        "mlp.c_proj.weight": config.text_width**-0.5 * (2 * config.text_layers) ** -0.5,
    }
    vision_blocks_std = {
        "attn.in_proj_weight": config.vision_width**-0.5,
        "attn.out_proj.weight": config.vision_width**-0.5 * (2 * config.vision_layers) ** -0.5,
        "mlp.c_fc.weight": (2 * config.vision_width) ** -0.5,
        "mlp.c_proj.weight": config.vision_width**-0.5 * (2 * config.vision_layers) ** -0.5,
    }
    for name, reference in model.state_dict().items():
        shape = reference.shape
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight",
                          "ls_1.gamma", "ls_2.gamma")):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=generator)
        elif name == "logit_scale":
            value = torch.tensor(math.log(1 / 0.07))
        elif name == "token_embedding.weight":
            value = 0.02 * torch.randn(shape, generator=generator)
        elif name == "positional_embedding":
            value = 0.01 * torch.randn(shape, generator=generator)
        elif name == "text_projection":
            value = config.text_width**-0.5 * torch.randn(shape, generator=generator)
        elif name.startswith("visual.") and not name.startswith("visual.transformer."):
            std = vision_scale if name != "visual.conv1.weight" else (3 * config.patch_size**2) ** -0.5
            value = std * torch.randn(shape, generator=generator)
        else:
            table = vision_blocks_std if name.startswith("visual.") else text_blocks_std
            suffix = name.split(".", 4)[-1] if name.startswith("visual.") else name.split(".", 3)[-1]
            value = table.get(suffix, 0.02) * torch.randn(shape, generator=generator)
        state[name] = value.float()
    return state


def create_random_clip(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CLIP:
    """A seeded random CLIP of a named size, ready for inference (built through the strict loader)."""
    from itaclip_core.model.weights import build_clip

    if size not in RANDOM_SIZES:
        raise ValueError(f"unknown random CLIP size {size!r}; known: {', '.join(RANDOM_SIZES)}")
    model = build_clip(random_clip_state_dict(size, seed), f"random-{size}:{seed}", dtype, config=RANDOM_SIZES[size])
    model.weights_id = f"random-{size}:{seed}"
    return model.to(device)


def save_random_clip(path: str | Path, size: str = "tiny", seed: int = 0, half: bool = True) -> Path:
    """Write a random CLIP as an OpenAI-style state-dict file (fp16 like the official files by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = random_clip_state_dict(size, seed)
    if half:
        state = {k: v.half() for k, v in state.items()}
    torch.save(state, path)
    return path


def is_random_spec(spec: str) -> bool:
    """True for `random-<size>` or `random-<size>:<seed>` (and `random-open_clip:<model>[:<seed>]`)."""
    return bool(_SPEC.match(spec)) or spec.startswith("random-open_clip:")


def random_clip_from_spec(spec: str, dtype: torch.dtype = torch.float32) -> CLIP:
    """The random CLIP a `random-<size>[:<seed>]` spec names."""
    match = _SPEC.match(spec)
    if not match or match.group(1) not in RANDOM_SIZES:
        raise ValueError(f"unknown random model {spec!r}; use one of "
                         + ", ".join(f"random-{size}" for size in RANDOM_SIZES) + " (optionally :SEED)")
    return create_random_clip(match.group(1), int(match.group(2) or 0), dtype)
