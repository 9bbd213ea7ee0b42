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
import torchvision.transforms.functional as TF

VIEW_NAMES = ("original", "grayscale", "blur", "vflip", "hflip")
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) luma replicated over the channels (torchvision's coefficients)."""
    return TF.rgb_to_grayscale(images, num_output_channels=3)


def gaussian_blur(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) Gaussian blur with kernel 11 and sigma 5, reflect padding (torchvision's implementation)."""
    return TF.gaussian_blur(images, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[BLUR_SIGMA, BLUR_SIGMA])


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
