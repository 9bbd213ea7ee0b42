"""ITACLIP's image engineering: five views of every crop and how their features are mixed.

Views (applied to the normalised crop, as the published code does): the original, grayscale (ITU-R 601-2 luma
replicated to three channels), Gaussian blur (kernel 11, sigma 5, reflect padding), vertical flip and horizontal flip.

Mixing: the L2-normalised features of the first three views are averaged; each flipped view's features are flipped
back; `mixed = coef * mean(first three) + (1 - coef) * mean(flipped back)`. The published code mixes per-view
*logits* after upsampling each to the crop size and un-flipping them there. Text projection and bilinear upsampling
are linear, and bilinear upsampling with `align_corners=False` commutes with flips, so mixing the features on the
patch grid and projecting/upsampling once gives the same result with a fifth of the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VIEW_NAMES = ("original", "grayscale", "blur", "vflip", "hflip")
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 weights of R, G, B, as torchvision rounds them


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) luma replicated over the channels (the same numbers as torchvision's
    `rgb_to_grayscale(images, 3)`)."""
    red, green, blue = images.unbind(dim=-3)
    luma = (LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue).to(images.dtype)
    return luma.unsqueeze(-3).expand(images.shape)


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian weights at the integer offsets -(size-1)/2 .. (size-1)/2: (size,)."""
    half = (size - 1) * 0.5
    offsets = torch.linspace(-half, half, steps=size)
    weights = torch.exp(-0.5 * (offsets / sigma).pow(2))
    return (weights / weights.sum()).to(dtype)


def gaussian_blur(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) Gaussian blur with kernel 11 and sigma 5, reflect padding: one depthwise convolution with the
    outer product of the 1-D weights (the same numbers as torchvision's `gaussian_blur` on float tensors)."""
    weights = gaussian_kernel(BLUR_KERNEL, BLUR_SIGMA, images.dtype)
    kernel = torch.mm(weights[:, None], weights[None, :])  # (k, k)
    channels = images.shape[-3]
    kernel = kernel.expand(channels, 1, BLUR_KERNEL, BLUR_KERNEL)
    pad = BLUR_KERNEL // 2
    padded = F.pad(images, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def make_views(crops: torch.Tensor, image_engineering: bool = True) -> torch.Tensor:
    """All views of a batch of crops, view-major: (V * B, 3, H, W) with V = 5 (or 1 without image engineering)."""
    if not image_engineering:
        return crops
    return torch.cat(
        [crops, grayscale(crops), gaussian_blur(crops), torch.flip(crops, dims=[-2]), torch.flip(crops, dims=[-1])]
    )


def mix_views(features: torch.Tensor, coef: float) -> torch.Tensor:
    """Mix the normalised patch features of the five views of B crops.

    Args:
        features: (5, B, rows, cols, D) L2-normalised patch features, views in `VIEW_NAMES` order.
        coef: weight of the first-category views (original, grayscale, blur).
    Returns:
        (B, rows, cols, D) mixed features.
    """
    if features.shape[0] != len(VIEW_NAMES):
        raise ValueError(f"expected {len(VIEW_NAMES)} views, got {features.shape[0]}")
    first = features[:3].mean(dim=0)  # (B, rows, cols, D)
    unflipped_v = torch.flip(features[3], dims=[1])  # flip back along the patch rows
    unflipped_h = torch.flip(features[4], dims=[2])  # flip back along the patch columns
    flipped = (unflipped_v + unflipped_h) / 2
    return coef * first + (1.0 - coef) * flipped
