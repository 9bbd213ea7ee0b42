"""PAMR against a literal implementation that builds every neighbour tensor with shift convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itaclip_core.refinement import PAMR, pamr
from itaclip_core.refinement.pamr import neighbour_offsets, pamr_affinity

# Positions of the 8 neighbours in a 3x3 kernel, row-major without the centre.
_RING = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]


def _kernel(kind: str) -> torch.Tensor:
    """Shift kernels: 'diff' gives centre - neighbour, 'copy' the neighbour, 'window' all 9 window samples."""
    if kind == "window":
        weight = torch.zeros(9, 1, 3, 3, dtype=torch.float64)
        for i in range(9):
            weight[i, 0, i // 3, i % 3] = 1
        return weight
    weight = torch.zeros(8, 1, 3, 3, dtype=torch.float64)
    for i, (r, c) in enumerate(_RING):
        if kind == "diff":
            weight[i, 0, 1, 1] = 1
            weight[i, 0, r, c] = -1
        else:
            weight[i, 0, r, c] = 1
    return weight


def _stack(x: torch.Tensor, dilations: tuple[int, ...], kind: str) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): the kernel's outputs for every dilation, concatenated."""
    b, k, h, w = x.shape
    flat = x.reshape(b * k, 1, h, w)
    parts = [F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), _kernel(kind), dilation=d) for d in dilations]
    return torch.cat(parts, dim=1).reshape(b, k, -1, h, w)


def literal_pamr(image: torch.Tensor, logits: torch.Tensor, steps: int, dilations: tuple[int, ...]) -> torch.Tensor:
    image, mask = image.double(), logits.double()
    sigma = _stack(image, dilations, "window").std(dim=2, keepdim=True)  # unbiased, over 9 * len(dilations)
    affinity = -_stack(image, dilations, "diff").abs() / (1e-8 + 0.1 * sigma)
    affinity = affinity.mean(dim=1, keepdim=True).softmax(dim=2)  # (B, 1, P, H, W)
    for _ in range(steps):
        mask = (_stack(mask, dilations, "copy") * affinity).sum(dim=2)
    return mask


def _inputs(batch: int, channels: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, height, width, generator=generator)
    logits = torch.rand(batch, channels, height, width, generator=generator)
    return image, logits


@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "steps", "dilations"),
    [
        (2, 5, 37, 53, 10, (8, 16)),
        (1, 5, 6, 9, 10, (8, 16)),  # smaller than the dilations
        (1, 3, 1, 7, 4, (8, 16)),  # a single row
        (1, 4, 21, 17, 3, (1, 3)),
        (1, 2, 12, 12, 5, (2,)),
    ],
)
def test_matches_literal(batch, channels, height, width, steps, dilations) -> None:
    image, logits = _inputs(batch, channels, height, width, seed=height * width)
    out = pamr(image, logits, steps=steps, dilations=dilations)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    expected = literal_pamr(image, logits, steps, dilations)
    assert (out.double() - expected).abs().max().item() <= 1e-5


def test_offsets_order() -> None:
    assert neighbour_offsets((8, 16))[:8] == [(-8, -8), (-8, 0), (-8, 8), (0, -8), (0, 8), (8, -8), (8, 0), (8, 8)]
    assert neighbour_offsets((8, 16))[8:] == [(dy * 2, dx * 2) for dy, dx in neighbour_offsets((8,))]


def test_affinity_is_a_distribution_and_edge_aware() -> None:
    image = torch.zeros(1, 3, 20, 40)
    image[..., 20:] = 5.0  # two flat halves
    image += 0.01 * torch.randn(1, 3, 20, 40, generator=torch.Generator().manual_seed(0))
    weights = pamr_affinity(image, (8, 16))
    assert weights.shape == (1, 16, 20, 40)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 20, 40))
    # A pixel just left of the edge barely takes from its right neighbours across the edge.
    right = [n for n, (dy, dx) in enumerate(neighbour_offsets((8, 16))) if dx > 0]
    assert weights[0, right, 10, 18].sum().item() < 1e-3


def test_chunked_equals_unchunked() -> None:
    image, logits = _inputs(2, 7, 19, 23, seed=5)
    whole = pamr(image, logits, chunk_elements=1 << 30)
    chunked = pamr(image, logits, chunk_elements=1)  # one channel at a time
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_constant_scores_stay_constant() -> None:
    image, _ = _inputs(1, 1, 31, 29, seed=7)
    values = torch.tensor([0.25, -3.0, 7.5]).view(1, 3, 1, 1)
    logits = values.expand(1, 3, 31, 29).contiguous()
    out = pamr(image, logits)
    torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-6)


def test_flat_image_gives_plain_neighbour_average() -> None:
    image = torch.ones(1, 3, 5, 5)  # sigma 0: every affinity 0, so the softmax is uniform
    logits = torch.zeros(1, 1, 5, 5)
    logits[0, 0, 0, 0] = 16.0
    out = pamr(image, logits, steps=1, dilations=(1,))
    # Pixel (1, 1) has (0, 0) among its 8 neighbours exactly once: weight 1/8.
    assert out[0, 0, 1, 1].item() == pytest.approx(2.0)
    # Pixel (0, 0) sees itself through the replicated border at (-1,-1), (-1,0), (0,-1): 3/8 of 16.
    assert out[0, 0, 0, 0].item() == pytest.approx(6.0)
    assert out[0, 0, 3, 3].item() == 0.0


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs(dtype, tolerance) -> None:
    image, logits = _inputs(1, 4, 24, 30, seed=11)
    image, logits = image.to(dtype), logits.to(dtype)  # values exactly representable in `dtype`
    out = pamr(image, logits)
    assert out.dtype == dtype and out.shape == logits.shape
    expected = literal_pamr(image, logits, 10, (8, 16))
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max().item() <= tolerance


def test_module_and_errors() -> None:
    image, logits = _inputs(1, 3, 15, 16, seed=2)
    module = PAMR(steps=4, dilations=(2, 4))
    assert list(module.parameters()) == []
    assert "steps=4" in repr(module)
    torch.testing.assert_close(module(image, logits), pamr(image, logits, steps=4, dilations=(2, 4)))
    torch.testing.assert_close(pamr(image, logits, steps=0), logits)
    with pytest.raises(ValueError, match="resize the image"):
        pamr(image[..., :10], logits)
    with pytest.raises(ValueError, match="4-D"):
        pamr(image[0], logits[0])
    with pytest.raises(ValueError, match="dilations"):
        PAMR(dilations=(0, 8))
