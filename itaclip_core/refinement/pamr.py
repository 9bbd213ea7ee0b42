"""Pixel-adaptive mask refinement (PAMR), as ITACLIP and SCLIP apply it to their dense class scores.

For every dilation d, a pixel's neighbours are the 8 pixels at offsets {-d, 0, d}^2 minus (0, 0) (borders
replicated), so the default dilations (8, 16) give 16 neighbours. The affinity to a neighbour is, per colour
channel, `-|I_p - I_n| / (1e-8 + 0.1 * sigma_p)`, with sigma_p the unbiased standard deviation of the 18 samples of
the 3x3 dilated windows of all dilations (centre included, once per dilation); it is averaged over the colour
channels and passed through a softmax over the neighbours. Each step replaces every pixel's scores with the
affinity-weighted sum of its neighbours' scores (no self term).

This implementation never builds the (B, C, 16, H, W) tensor of the published code: it accumulates shifted views
of a replicate-padded score map, one neighbour at a time, and processes the score channels in chunks. Affinities
and propagation are computed in float32 whatever the input dtype; the result has the dtype of `logits`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Scores are propagated a few channels at a time (about this many elements, ~4 MiB in float32), so that the 16
# neighbour passes of each step stay in the CPU caches; the result does not depend on it.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the neighbours, dilation by dilation, each in row-major order without the centre."""
    offsets = []
    for d in dilations:
        offsets += [(dy * d, dx * d) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return offsets


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """View of the pixel at offset (dy, dx) from every pixel of an (.., H + 2 pad, W + 2 pad) padded map."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """PAMR's neighbour weights for an image: (B, N, H, W) float32, summing to 1 over the N = 8 * len(dilations).

    Args:
        image: (B, 3, H, W) guide image (any number of channels works; they are averaged).
        dilations: neighbour distances in pixels.
    """
    _check_dilations(dilations)
    _, _, height, width = image.shape
    pad = max(dilations)
    guide = image.float()
    padded = F.pad(guide, [pad] * 4, mode="replicate")  # (B, 3, H + 2 pad, W + 2 pad)
    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    # Unbiased standard deviation over the 9 * len(dilations) window samples, in two passes for accuracy.
    mean = torch.zeros_like(guide)
    for dy, dx in window:
        mean += _shifted(padded, pad, dy, dx, height, width)
    mean /= len(window)
    variance = torch.zeros_like(guide)
    for dy, dx in window:
        variance += (_shifted(padded, pad, dy, dx, height, width) - mean).square()
    sigma = (variance / (len(window) - 1)).sqrt()  # (B, 3, H, W)
    scale = 1e-8 + 0.1 * sigma
    offsets = neighbour_offsets(dilations)
    logits = guide.new_empty((guide.shape[0], len(offsets), height, width))  # (B, N, H, W)
    for n, (dy, dx) in enumerate(offsets):
        logits[:, n] = (-(guide - _shifted(padded, pad, dy, dx, height, width)).abs() / scale).mean(dim=1)
    return logits.softmax(dim=1)


def propagate(
    scores: torch.Tensor,
    affinity: torch.Tensor,
    dilations: Sequence[int] = (8, 16),
    steps: int = 10,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Apply `steps` rounds of neighbour averaging with fixed weights; returns scores of the input's dtype.

    Args:
        scores: (B, C, H, W) scores to refine.
        affinity: (B, N, H, W) weights from `pamr_affinity` for the same dilations.
        dilations: neighbour distances in pixels (must match the affinity's).
        steps: number of propagation rounds.
        chunk_elements: channels are processed in chunks of at most about this many elements (at least one channel).
    """
    offsets = neighbour_offsets(dilations)
    batch, channels, height, width = scores.shape
    if affinity.shape != (batch, len(offsets), height, width):
        raise ValueError(
            f"affinity has shape {tuple(affinity.shape)}; expected {(batch, len(offsets), height, width)} "
            f"for scores {tuple(scores.shape)} and dilations {tuple(dilations)}"
        )
    if steps < 0:
        raise ValueError(f"steps is {steps}: give a non-negative number of iterations")
    if steps == 0:
        return scores.clone()
    pad = max(dilations)
    weights = affinity.float().unsqueeze(2)  # (B, N, 1, H, W): broadcast over channels
    out = torch.empty_like(scores)
    per_channel = max(1, batch * height * width)
    chunk = max(1, chunk_elements // per_channel)
    for start in range(0, channels, chunk):
        current = scores[:, start : start + chunk].float()  # (B, c, H, W)
        for _ in range(steps):
            padded = F.pad(current, [pad] * 4, mode="replicate")  # (B, c, H + 2 pad, W + 2 pad)
            current = torch.zeros_like(current)
            for n, (dy, dx) in enumerate(offsets):
                current.addcmul_(_shifted(padded, pad, dy, dx, height, width), weights[:, n])
            del padded
        out[:, start : start + chunk] = current.to(out.dtype)
    return out


def _check_dilations(dilations: Sequence[int]) -> None:
    if len(dilations) == 0 or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"dilations is {tuple(dilations)}: give one or more positive integer pixel distances")


def pamr(
    image: torch.Tensor,
    logits: torch.Tensor,
    steps: int = 10,
    dilations: Sequence[int] = (8, 16),
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Refine dense scores with PAMR guided by the image.

    Args:
        image: (B, 3, H, W) float guide image (the normalised image, resized to the scores' size).
        logits: (B, C, H, W) float scores (float32, float16 or bfloat16), on the image's device.
        steps: propagation rounds (10 in ITACLIP and SCLIP).
        dilations: neighbour distances in pixels ((8, 16) in ITACLIP and SCLIP).
        chunk_elements: memory bound: channels are propagated in chunks of about this many elements.

    Returns:
        (B, C, H, W) refined scores with the dtype of `logits`.
    """
    if image.ndim != 4 or logits.ndim != 4:
        raise ValueError(
            f"image {tuple(image.shape)} and logits {tuple(logits.shape)} must both be 4-D (B, channels, H, W); "
            "add a batch dimension with .unsqueeze(0)"
        )
    if image.shape[0] != logits.shape[0] or image.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and logits {tuple(logits.shape)} differ in batch or size: resize the image "
            "to the logits' (H, W) before PAMR"
        )
    if not image.is_floating_point() or not logits.is_floating_point():
        raise ValueError(f"image ({image.dtype}) and logits ({logits.dtype}) must be floating point")
    if image.device != logits.device:
        raise ValueError(f"image is on {image.device} but logits on {logits.device}: move both to one device")
    _check_dilations(dilations)
    affinity = pamr_affinity(image, dilations)
    return propagate(logits, affinity, dilations, steps, chunk_elements)


class PAMR(nn.Module):
    """PAMR as a module (no parameters): `PAMR(steps, dilations)(image, logits)`; see `pamr`."""

    def __init__(self, steps: int = 10, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        _check_dilations(dilations)
        if steps < 0:
            raise ValueError(f"steps is {steps}: give a non-negative number of iterations")
        self.steps = int(steps)
        self.dilations = tuple(int(d) for d in dilations)

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Refine (B, C, H, W) `logits` guided by the (B, 3, H, W) `image` of the same size."""
        return pamr(image, logits, self.steps, self.dilations)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, dilations={self.dilations}"
