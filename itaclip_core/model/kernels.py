"""Attention kernels chosen per device and dtype, with the same results as `F.scaled_dot_product_attention`.

PyTorch's fused CPU attention kernel is tuned for long sequences; at the lengths of CLIP's windows (50 to 600
tokens) in bfloat16 or float16 it runs at a fraction of the matrix-multiply rate. There the heads are instead done
in groups small enough for their score matrices to stay in cache: scores by one batched matrix product, softmax in
place, then the product with the values. Float32 and every other device keep the fused kernel, so float32 results
are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Heads per group of the grouped CPU path: 16 score matrices of 200 x 200 tokens are 1.3 MB in bfloat16.
_GROUP = 16
_MAX_TOKENS = 1024  # above this the fused kernel's tiling wins


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, tokens, head_dim = q.shape
    flat = batch * heads
    q, k, v = (t.reshape(flat, t.shape[-2], head_dim) for t in (q, k, v))
    out = q.new_empty(flat, tokens, v.shape[-1])
    for start in range(0, flat, _GROUP):
        end = start + _GROUP
        scores = torch.bmm(q[start:end], k[start:end].transpose(1, 2)).mul_(scale)
        torch.bmm(torch.softmax(scores, dim=-1), v[start:end], out=out[start:end])
    return out.view(batch, heads, tokens, -1)


def _low_precision_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= _MAX_TOKENS
        and not torch.is_grad_enabled()
    )


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) where `mask`, else -inf) v: (B, H, N, d) queries, (B, H, M, d) keys and values, a
    boolean mask broadcastable to (B, H, N, M) with at least one True per query row.

    Equal to `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`: the same call for float32 and off the CPU;
    for bfloat16 and float16 on the CPU (the text tower's short, masked rows) one batched product with the mask
    as an additive bias, which there is several times faster than the fused kernel.
    """
    if not _low_precision_cpu(q, k):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, N, d) queries, keys and values without a mask (scale: d ** -0.5).

    Equal to `F.scaled_dot_product_attention(q, k, v, scale=scale)`: the same call for float32 and off the CPU;
    the grouped path above for bfloat16 and float16 on the CPU at CLIP's lengths (within the rounding of the dtype).
    """
    if _low_precision_cpu(q, k):
        return _grouped_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
