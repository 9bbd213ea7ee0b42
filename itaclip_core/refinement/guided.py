"""Training-free guided filtering of dense scores with the image as guide: the guided filter and the joint
bilateral filter.

Both come from kornia (`kornia.filters.guided_blur`, `kornia.filters.joint_bilateral_blur`), the optional extra
`guided`. kornia is used rather than a local copy because both filters are maintained there with exact, tested
border handling, a tap-by-tap CPU path for large inputs and the fast (subsampled) guided filter, and the extra was
already part of the project. Channels are filtered in chunks, which gives the same result as filtering them
all at once (each channel is filtered independently with the same guide) while bounding the memory of kornia's
windowed (unfold) path on the GPU.
"""

from __future__ import annotations

import math

import torch

FILTERS = ("guided", "joint_bilateral")
BORDERS = ("reflect", "replicate", "circular", "constant")

# Score channels are filtered in chunks of about this many (channels x H x W) elements.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class GuidedFilterSettingError(ValueError):
    """A guided-filter setting is out of range."""


def _kornia_filters():
    try:
        import kornia.filters as filters
    except ImportError as error:
        raise ImportError(
            "guided filtering needs the optional package kornia: pip install 'itaclip-core[guided]' or make install"
        ) from error
    return filters


def check_guided_settings(mode: str, kernel_size: int, eps: float, sigma_color: float, sigma_space: float,
                          subsample: int, border: str) -> None:
    """Raise `GuidedFilterSettingError` naming the first out-of-range setting."""
    if mode not in FILTERS:
        raise GuidedFilterSettingError(f"guided_filter is {mode!r}: choose one of {', '.join(FILTERS)}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise GuidedFilterSettingError(f"guided_kernel is {kernel_size!r}: give an odd window size of at least 1")
    for name, value in (("guided_eps", eps), ("guided_sigma_color", sigma_color),
                        ("guided_sigma_space", sigma_space)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise GuidedFilterSettingError(f"{name} is {value!r}: give a finite positive number")
    if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
        raise GuidedFilterSettingError(f"guided_subsample is {subsample!r}: give a positive integer (1: exact)")
    if border not in BORDERS:
        raise GuidedFilterSettingError(f"guided_border is {border!r}: choose one of {', '.join(BORDERS)}")


def guided_filter(
    scores: torch.Tensor,
    guide: torch.Tensor,
    mode: str = "guided",
    kernel_size: int = 15,
    eps: float = 1e-2,
    sigma_color: float = 0.1,
    sigma_space: float = 4.0,
    subsample: int = 1,
    border: str = "reflect",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Filter dense scores with an image as guide.

    Args:
        scores: (C, H, W) or (B, C, H, W) float scores (e.g. logits upsampled to the image).
        guide: (3, H, W) or (B, 3, H, W) float guide image, RGB in [0, 1], on the scores' device.
        mode: "guided" (He et al.'s guided filter with a colour guide: a local linear model of the scores in the
            guide's colours, regularised by `eps`) or "joint_bilateral" (scores averaged with weights
            exp(-|dI|_1^2 / (2 sigma_color^2)) exp(-|dx|^2 / (2 sigma_space^2)) over the window).
        kernel_size: odd window side in pixels.
        eps: the guided filter's regulariser, in squared guide units (larger: smoother).
        sigma_color, sigma_space: the joint bilateral filter's colour (guide units) and spatial (pixels) widths.
        subsample: the fast guided filter's subsampling factor (1: exact guided filter).
        border: padding of the windows at the image border.
        chunk_elements: memory bound: channels are filtered in chunks of about this many elements.

    Returns:
        Scores of the input's shape and dtype.
    """
    check_guided_settings(mode, kernel_size, eps, sigma_color, sigma_space, subsample, border)
    batched = scores.ndim == 4
    if scores.ndim not in (3, 4) or guide.ndim != scores.ndim:
        raise GuidedFilterSettingError(
            f"scores {tuple(scores.shape)} and guide {tuple(guide.shape)}: give (C, H, W) and (3, H, W), or both "
            "with a batch dimension"
        )
    x = scores if batched else scores[None]
    g = guide if batched else guide[None]
    if g.shape[0] != x.shape[0] or g.shape[-2:] != x.shape[-2:]:
        raise GuidedFilterSettingError(
            f"guide {tuple(guide.shape)} does not match scores {tuple(scores.shape)}: resize the guide to the scores"
        )
    filters = _kornia_filters()
    g = g.float()
    out = torch.empty_like(x)
    per_channel = max(1, x.shape[0] * x.shape[-2] * x.shape[-1])
    step = max(1, chunk_elements // per_channel)
    for start in range(0, x.shape[1], step):
        chunk = x[:, start : start + step].float()
        if mode == "guided":
            result = filters.guided_blur(g, chunk, kernel_size, eps, border_type=border, subsample=subsample)
        else:
            result = filters.joint_bilateral_blur(
                chunk, g, kernel_size, sigma_color, (sigma_space, sigma_space), border_type=border
            )
        out[:, start : start + step] = result.to(out.dtype)
    return out if batched else out[0]
