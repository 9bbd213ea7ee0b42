"""Sliding-window geometry and the exact stitching of per-window logits, as pure functions.

The published inference (MMSegmentation's `slide_inference`): per axis `n = max(L - crop + stride - 1, 0) // stride + 1`
windows; window i starts at `i * stride`, ends at `min(start + crop, L)`, and its start is pulled back to
`max(end - crop, 0)`. Each window's patch logits are upsampled bilinearly to the window size, summed into a canvas,
divided by the per-pixel window count, and the canvas is upsampled bilinearly to the original image size.

All of these steps are linear and separable along rows and columns, and the windows form a grid, so the count is
`rows_count(y) * cols_count(x)`. `stitch` therefore applies, per window, a (H0 x rows) matrix on the left and a
(cols x W0) matrix on the right that fold "upsample to the window, place, divide by count, upsample to the original
size" into one step: no canvas of the resized image is built and no interpolation is repeated per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from itaclip_core.timing import timed


@dataclass(frozen=True)
class Window:
    """A crop box in the resized image: rows y1:y2, columns x1:x2."""

    y1: int
    y2: int
    x1: int
    x2: int


def window_starts(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the windows along one axis of `length` pixels."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    count = max(length - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """All windows of an image, row by row."""
    return [
        Window(y1, y2, x1, x2)
        for y1, y2 in window_starts(height, crop, stride)
        for x1, x2 in window_starts(width, crop, stride)
    ]


def bilinear_matrix(out_size: int, in_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(out_size, in_size) matrix of PyTorch's 1-D bilinear resize (`align_corners=False`, size given)."""
    # PyTorch computes the source coordinate and the blend weight in float32; doing the same gives the same weights.
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    out = torch.arange(out_size, dtype=torch.float32)
    src = (scale * (out + 0.5) - 0.5).clamp(min=0.0)  # source coordinate of each output pixel
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = (src - low.float()).clamp(0.0, 1.0).double()
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(dtype)


def _axis_operators(
    spans: list[tuple[int, int]], patches: int, resized: int, original: int
) -> dict[int, torch.Tensor]:
    """For each window start along one axis, the (original x patches) operator: upsample the window's patches to the
    window, divide by the coverage count, upsample the resized axis to the original axis."""
    count = torch.zeros(resized, dtype=torch.float64)
    for start, end in spans:
        count[start:end] += 1
    to_original = bilinear_matrix(original, resized)  # (original, resized)
    operators = {}
    for start, end in spans:
        to_window = bilinear_matrix(end - start, patches)  # (window, patches)
        operators[start] = to_original[:, start:end] @ (to_window / count[start:end, None])
    return operators


@timed("stitch")
def stitch(
    patch_logits: torch.Tensor,
    windows: list[Window],
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """Combine per-window patch logits into logits at the original image size.

    Args:
        patch_logits: (N, Q, rows, cols) logits of the N windows on their patch grids (all windows have one size).
        windows: the N windows, as from `sliding_windows`.
        resized_size: (H, W) of the resized image the windows tile.
        original_size: (H0, W0) the result is brought to.
    Returns:
        (Q, H0, W0) float32, equal to upsample-place-average-upsample as the published code does it.
    """
    count, queries, rows, cols = patch_logits.shape
    if count != len(windows):
        raise ValueError(f"{count} windows of logits for {len(windows)} windows")
    height, width = resized_size
    row_spans = sorted({(w.y1, w.y2) for w in windows})
    col_spans = sorted({(w.x1, w.x2) for w in windows})
    left = _axis_operators(row_spans, rows, height, original_size[0])  # start -> (H0, rows)
    right = _axis_operators(col_spans, cols, width, original_size[1])  # start -> (W0, cols)
    device = patch_logits.device
    left = {k: v.to(device=device, dtype=torch.float32) for k, v in left.items()}
    right = {k: v.to(device=device, dtype=torch.float32) for k, v in right.items()}
    logits = patch_logits.float()
    out = torch.zeros(queries, original_size[0], original_size[1], dtype=torch.float32, device=device)
    for y1 in sorted({w.y1 for w in windows}):
        members = [i for i, w in enumerate(windows) if w.y1 == y1]
        # Sum over the windows of this row of windows, along columns first: (Q, rows, W0).
        row_sum = sum(logits[i] @ right[windows[i].x1].T for i in members)
        out += torch.einsum("hr,qrw->qhw", left[y1], row_sum)
    return out
