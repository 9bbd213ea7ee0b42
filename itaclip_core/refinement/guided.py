"""Training-free guided filtering of dense scores with the image as guide: the guided filter and the joint
bilateral filter.

The joint bilateral filter and the fast (subsampled) guided filter come from kornia
(`kornia.filters.joint_bilateral_blur`, `kornia.filters.guided_blur`), the optional extra `guided`: they are
maintained there with tested border handling and a tap-by-tap CPU path for large inputs, and the extra was already
part of the project. The exact guided filter with the colour guide (subsample 1, the default) is computed here
(box means, and the inverse of each pixel's 3 x 3 regularised guide covariance taken once per image in float64 by
its adjugate), because kornia solves that 3 x 3 system again for every chunk of channels, which made it the
slowest refinement at 150 classes; the tests check it against kornia's `guided_blur`. Channels are filtered in
chunks, which gives the same result as filtering them all at once (each channel is filtered independently with
the same guide) while bounding memory.
"""

from __future__ import annotations

import math

import torch

from itaclip_core.errors import UserError

FILTERS = ("guided", "joint_bilateral")
BORDERS = ("reflect", "replicate", "circular", "constant")

# Score channels are filtered in chunks of about this many (channels x H x W) elements.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class GuidedFilterSettingError(UserError, ValueError):
    """A guided-filter setting is out of range."""


def _kornia_filters():
    try:
        import kornia.filters as filters
    except ImportError as error:
        raise ImportError(
            "guided filtering needs the optional package kornia: pip install 'itaclip-core[guided]' or make install"
        ) from error
    return filters


def needs_kornia(mode: str, subsample: int) -> bool:
    """Whether the filter comes from kornia (the joint bilateral and the fast guided filter) or is computed here."""
    return mode != "guided" or subsample != 1


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


def _box(x: torch.Tensor, kernel_size: int, border: str) -> torch.Tensor:
    """Mean over kernel_size x kernel_size windows of (B, C, H, W), the border padded as `border` says.

    float32 (and other float types the CPU convolves natively): two separable depthwise convolutions, 2k rather
    than k^2 operations per pixel (faster than avg_pool2d on the CPU), on channels-innermost memory, where the CPU's
    depthwise convolution is several times faster; the result stays channels-innermost. float64: differences of
    running sums along each axis (float64 has no fast convolution on the CPU; its running sums lose nothing that
    matters at image sizes)."""
    pad = kernel_size // 2
    mode = "constant" if border == "constant" else border
    if x.dtype == torch.float64:
        padded = torch.nn.functional.pad(x, [pad] * 4, mode=mode)
        padded = torch.nn.functional.pad(padded, [1, 0, 1, 0])  # a leading zero row and column start the sums
        rows = padded.cumsum(dim=-1)
        rows = rows[..., kernel_size:] - rows[..., :-kernel_size]
        both = rows.cumsum(dim=-2)
        return (both[..., kernel_size:, :] - both[..., :-kernel_size, :]) / (kernel_size * kernel_size)
    padded = torch.nn.functional.pad(x, [pad] * 4, mode=mode).contiguous(memory_format=torch.channels_last)
    channels = x.shape[1]
    column = torch.full((channels, 1, kernel_size, 1), 1.0 / kernel_size, dtype=x.dtype, device=x.device)
    rows = torch.nn.functional.conv2d(padded, column, groups=channels)
    return torch.nn.functional.conv2d(rows, column.transpose(2, 3), groups=channels)


class _ColourGuide:
    """What He et al.'s colour guided filter needs of the (B, 3, H, W) guide: its window means and the inverse of
    (its window covariance + eps I), computed once and reused for every chunk of score channels."""

    def __init__(self, guide: torch.Tensor, kernel_size: int, eps: float, border: str) -> None:
        self.kernel_size, self.border = kernel_size, border
        g = guide.double()  # the guide's statistics in float64: the covariance is a difference of close numbers
        m = _box(g, kernel_size, border)  # (B, 3, H, W)
        pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
        second = _box(torch.stack([g[:, i] * g[:, j] for i, j in pairs], dim=1), kernel_size, border)
        cov = {pair: second[:, k] - m[:, pair[0]] * m[:, pair[1]] for k, pair in enumerate(pairs)}
        a, b, c = cov[(0, 0)] + eps, cov[(0, 1)], cov[(0, 2)]
        d, e, f = cov[(1, 1)] + eps, cov[(1, 2)], cov[(2, 2)] + eps
        # Inverse of the symmetric [[a, b, c], [b, d, e], [c, e, f]] by its adjugate, in float64.
        adj = [[d * f - e * e, c * e - b * f, b * e - c * d],
               [c * e - b * f, a * f - c * c, b * c - a * e],
               [b * e - c * d, b * c - a * e, a * d - b * b]]
        det = a * adj[0][0] + b * adj[0][1] + c * adj[0][2]
        # Per colour channel i: the guide (B, 1, H, W), its window mean, and row i of the inverse, each (B, 1, H, W)
        # so that they broadcast over the score channels.
        self.guide = [guide[:, i : i + 1] for i in range(3)]
        self.mean = [m[:, i : i + 1].to(guide.dtype) for i in range(3)]
        self.inverse = [[(adj[i][j] / det)[:, None].to(guide.dtype) for j in range(3)] for i in range(3)]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Filter (B, C, H, W) scores (the result is channels-innermost in memory)."""
        k, border, guide, mean, inverse = self.kernel_size, self.border, self.guide, self.mean, self.inverse
        scores = scores.contiguous(memory_format=torch.channels_last)  # every step below keeps this layout
        mean_p = _box(scores, k, border)  # (B, C, H, W)
        cov = [_box(guide[i] * scores, k, border) - mean[i] * mean_p for i in range(3)]
        a = [inverse[i][0] * cov[0] + inverse[i][1] * cov[1] + inverse[i][2] * cov[2] for i in range(3)]
        b = mean_p - a[0] * mean[0] - a[1] * mean[1] - a[2] * mean[2]
        out = _box(b, k, border)
        for i in range(3):
            out += _box(a[i], k, border) * guide[i]
        return out


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
    g = g.float()
    colour = _ColourGuide(g, kernel_size, eps, border) if not needs_kornia(mode, subsample) else None
    filters = _kornia_filters() if colour is None else None
    out = torch.empty_like(x)
    per_channel = max(1, x.shape[0] * x.shape[-2] * x.shape[-1])
    step = max(1, chunk_elements // per_channel)
    for start in range(0, x.shape[1], step):
        chunk = x[:, start : start + step].float()
        if colour is not None:
            result = colour(chunk)
        elif mode == "guided":
            result = filters.guided_blur(g, chunk, kernel_size, eps, border_type=border, subsample=subsample)
        else:
            result = filters.joint_bilateral_blur(
                chunk, g, kernel_size, sigma_color, (sigma_space, sigma_space), border_type=border
            )
        out[:, start : start + step] = result.to(out.dtype)
    return out if batched else out[0]
