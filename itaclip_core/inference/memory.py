"""Batch sizes from free memory: how many windows x views fit through the image tower at once.

A ViT-H/14 window costs several times a ViT-B/16 one (more tokens per 224-px crop, 1280-wide tokens, 32 blocks), so
a fixed GPU batch of 256 that suits B/16 can run out of memory on a 24 GB card with H/14. `auto_batch_size` divides
a share of the device's free memory by an upper estimate of one image's peak activation memory in the dense forward
pass (`activation_bytes`), so the batch shrinks with the backbone and the crop, and grows on larger cards.
"""

from __future__ import annotations

import torch

from itaclip_core.model.clip import CLIPConfig

# Share of the free memory the image-tower batch may take (the rest: logits, stitching, PAMR, allocator slack).
MEMORY_SHARE = 0.5
MAX_BATCH = 256  # the GPU default before memory was taken into account; fast enough for every backbone
CPU_BATCH = 16  # on the CPU the batch bounds latency and cache use, not memory


def activation_bytes(config: CLIPConfig, crop: int, dtype: torch.dtype, fused_blocks: int = 0) -> int:
    """Upper estimate of one image's peak activation memory (bytes) in `dense_tokens` under no_grad.

    Inside a block at most these are alive per token: the residual stream and its layer norm (2 D), the joint
    queries/keys/values (3 D) and their head-split copies (3 D), the attention output and its merge (2 D), the MLP
    hidden layer and its activation (2 hidden); plus three float32 score matrices per head (3 H N^2: variants that
    build explicit maps, e.g. two softmax maps and their sum, or an attention kernel that materialises them), and
    the queries and keys kept for each fused block (2 D per token each).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = cols = max(crop // config.patch_size, 1)
    tokens = 1 + rows * cols
    width = config.vision_width
    hidden = config.vision_mlp_width or 4 * width
    per_token = (10 * width + 2 * hidden + 2 * width * fused_blocks) * itemsize
    scores = 3 * config.vision_heads * tokens * tokens * 4
    return tokens * per_token + scores


def auto_batch_size(
    config: CLIPConfig,
    crop: int,
    dtype: torch.dtype,
    free_bytes: int,
    fused_blocks: int = 0,
    share: float = MEMORY_SHARE,
    maximum: int = MAX_BATCH,
) -> int:
    """Images per forward pass that fit in `share` of `free_bytes` (at least 1, at most `maximum`)."""
    per_image = activation_bytes(config, crop, dtype, fused_blocks)
    return int(max(1, min(maximum, (share * free_bytes) // per_image)))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def default_batch_size(config: CLIPConfig, device: torch.device, dtype: torch.dtype, crop: int,
                       fused_blocks: int = 0) -> int:
    """The batch size when none is set: from free memory on CUDA, `CPU_BATCH` elsewhere."""
    free = free_memory(device)
    if free is None:
        return CPU_BATCH
    return auto_batch_size(config, crop, dtype, free, fused_blocks)
