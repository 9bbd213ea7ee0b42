"""ResCLIP (CVPR 2025) as its official code runs it: NACLIP's attention plus RCS and SFR.

- **RCS**: the mean query-key attention of blocks 6-9 (1-based) mixed into the last block's map:
  A = tau_r [(1 - lambda_r) A_last + lambda_r mean_l A_l]. In the presets this is the dense config's fusion:
  `fuse_blocks=(6, 7, 8, 9)` (a settable tuple, for deeper towers), `fuse_attention="qk"`,
  `fuse_weight = 1 - lambda_r`, `attention_scale = tau_r`. The maps are never stored: the kept (q, k) of those
  blocks are applied to the last block's values with fused kernels.
- **SFR** (this readout, `readout="resclip"`), per image (window or view):
  1. a first pass of the last block with the RCS-mixed NACLIP attention (blocks 1-11 are shared with the final
     pass), normalised patch features against the text queries, bilinear to the crop, PAMR on the normalised crop
     (`sfr_pamr_steps` = 10, dilations `sfr_pamr_dilations` = (8, 16): the official code always runs it), then
     softmax(logit_scale x) over the queries (name variants are not merged);
  2. pixel labels = argmax query, 0 where the top probability is below `sfr_temp_thd`; patch labels = `torch.mode`
     over each patch-size block (`first_pass_labels`);
  3. the SFR matrix (`sfr_matrix`): 1 between patches with equal labels (and on the diagonal); with
     `sfr_delete_same_entity`, pairs whose straight path (sampled at the global maximum Chebyshev distance, as the
     official code does) leaves the start patch's label are decayed by exp(-cheb / max cheb); each row smoothed by
     a 1-D Gaussian along the raster order (`sfr_sigma`), ReLU, rows normalised; class-token row and column 0;
  4. the final pass of the last block with the `resclip` variant: softmax(tau_s [(1 - lambda_s) s k k^T +
     lambda_s S] + Omega), then RCS, no residual, no MLP. S is divided by its maximum and cast to float16 as the
     official code does even in float32 (`sfr_affinity_dtype="float16"`, the preset default); `"model"` keeps the
     model's dtype.

The official segmentor stores `use_rcs` and `use_sfr` as 1-tuples (a trailing comma), so both are always on; the
presets reproduce that. The other behaviours are options: RCS alone is `readout=tokens` (without an SFR matrix
the `resclip` variant is NACLIP's attention), SFR alone is `fuse_blocks=()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from itaclip_core.attention.dense import last_block, last_variant, run_trunk
from itaclip_core.methods.base import DenseReadout, register_readout
from itaclip_core.model.clip import VisionTransformer
from itaclip_core.refinement.pamr import pamr

if TYPE_CHECKING:
    from itaclip_core.presets import SegmentorConfig

AFFINITY_DTYPES = ("float16", "model")
# Elements of one chunk of the path check's (pairs x samples x 2) coordinate tensor.
_PATH_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def first_pass_labels(
    logits: torch.Tensor,
    image: torch.Tensor,
    patch_size: int,
    logit_scale: float,
    temp_thd: float,
    pamr_steps: int = 10,
    pamr_dilations: Sequence[int] = (8, 16),
) -> tuple[torch.Tensor, torch.Tensor]:
    """SFR's first-pass labels from patch logits.

    Args:
        logits: (B, Q, rows, cols) cosine similarities of the patches with the queries.
        image: (B, 3, h, w) the normalised crops (the PAMR guide).
    Returns:
        (pixel labels (B, h, w) int64, patch labels (B, rows, cols) int64), query indices.
    """
    rows, cols = logits.shape[-2:]
    size = image.shape[-2:]
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)  # (B, Q, h, w)
    if pamr_steps > 0:
        up = pamr(image.float(), up, pamr_steps, pamr_dilations)
    probs = torch.softmax(up * logit_scale, dim=1)
    top, pixel = probs.max(dim=1)  # (B, h, w)
    pixel = probs.argmax(dim=1)
    pixel[top < temp_thd] = 0
    blocks = pixel.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)  # (B, rows, cols, p, p)
    patch = torch.mode(blocks.reshape(*blocks.shape[:3], -1), dim=-1)[0]
    if patch.shape[1:] != (rows, cols):
        raise RuntimeError(f"patch labels {tuple(patch.shape[1:])} do not match the grid {(rows, cols)}")
    return pixel, patch


def _valid_paths(labels: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, max_steps: int) -> torch.Tensor:
    """For pairs (start, end) of grid coordinates (n, 2): does the sampled straight line stay in start's label?

    The line is sampled at t = linspace(0, 1, max_steps + 1) with the global maximum number of steps, rounded half
    to even, and only the first steps(pair) + 1 samples are checked (the official code's sampling)."""
    steps = (ends - starts).abs().max(dim=1)[0]  # (n,)
    t = torch.linspace(0, 1, steps=max_steps + 1, device=labels.device).unsqueeze(1).unsqueeze(0)  # (1, S, 1)
    current = (starts.unsqueeze(1) * (1 - t) + ends.unsqueeze(1) * t).round().long()  # (n, S, 2)
    within = torch.arange(max_steps + 1, device=labels.device).unsqueeze(0) <= steps.unsqueeze(1)  # (n, S)
    start_values = labels[starts[:, 0], starts[:, 1]].unsqueeze(1)
    values = labels[current[:, :, 0], current[:, :, 1]]
    return ((values == start_values) | ~within).all(dim=1)


@torch.no_grad()
def sfr_matrix(labels: torch.Tensor, sigma: float = 5.0, delete_same_entity: bool = True) -> torch.Tensor:
    """ResCLIP's SFR matrix (1 + P, 1 + P) float32 of a (rows, cols) patch-label map, class token first (0 row and
    column), other rows summing to 1 (see the module docstring)."""
    if sigma <= 0:
        raise ValueError(f"sfr_sigma must be > 0, got {sigma}")
    rows, cols = labels.shape
    total = rows * cols
    device = labels.device
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()  # (P, P)
    same.diagonal().fill_(1)
    if delete_same_entity:
        index = torch.arange(total, device=device)
        coords = torch.stack((torch.div(index, cols, rounding_mode="floor"), index % cols), dim=-1)  # (P, 2)
        cheb = (coords[:, None, :] - coords[None, :, :]).abs().max(dim=-1)[0]  # (P, P)
        max_steps = int(cheb.max())
        if max_steps > 0:  # a 1 x 1 grid has no pair to check (the official code would divide 0 by 0)
            valid = torch.empty(total, total, dtype=torch.bool, device=device)
            per_chunk = max(1, _PATH_CHUNK_ELEMENTS // (total * (max_steps + 1) * 2))
            for start in range(0, total, per_chunk):
                stop = min(start + per_chunk, total)
                starts = coords[start:stop].repeat_interleave(total, dim=0)  # pairs in row-major (i, j) order
                ends = coords.repeat(stop - start, 1)
                valid[start:stop] = _valid_paths(labels, starts, ends, max_steps).view(stop - start, total)
            decay = torch.exp(-cheb / max_steps)
            same = torch.where(valid, same, same * decay)
    size = min(total, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv1d(same.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1)
    blurred = F.relu(blurred)
    normalised = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    out = torch.zeros(total + 1, total + 1, device=device)
    out[1:, 1:] = normalised
    return out


def affinity_for_attention(matrix: torch.Tensor, dtype: str, model_dtype: torch.dtype) -> torch.Tensor:
    """S / max(S), cast to float16 as the official code does (`float16`; the attention variant then forms lambda S
    in float16 too) or kept in the model dtype (`model`)."""
    scaled = matrix / torch.max(matrix)
    return scaled.to(torch.float16 if dtype == "float16" else model_dtype)


@register_readout("resclip")
class ResCLIPReadout(DenseReadout):
    """SFR: a first pass, PAMR and patch labels, then the final pass with the SFR matrix (module docstring)."""

    needs_text = True

    def check(self, config: "SegmentorConfig") -> None:
        super().check(config)
        if config.sfr_affinity_dtype not in AFFINITY_DTYPES:
            raise ValueError(f"sfr_affinity_dtype={config.sfr_affinity_dtype!r}: allowed {', '.join(AFFINITY_DTYPES)}")
        if config.attention not in ("resclip",):
            raise ValueError(f"attention={config.attention!r} does not fit readout=resclip: its final pass needs the "
                             "SFR matrix in the attention; allowed: attention=resclip")
        if not 0.0 <= config.sfr_lambda <= 1.0:
            raise ValueError(f"sfr_lambda={config.sfr_lambda}: must be in [0, 1]")
        if config.sfr_pamr_steps < 0:
            raise ValueError(f"sfr_pamr_steps={config.sfr_pamr_steps}: must be >= 0")
        if config.sfr_sigma <= 0:
            raise ValueError(f"sfr_sigma={config.sfr_sigma}: must be > 0")

    def sfr_affinity(
        self, visual: VisionTransformer, images: torch.Tensor, patch_tokens: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """(B, 1, N, N) SFR matrices for the last block, from the first pass's patch tokens (B, P, D)."""
        config = self.config
        rows, cols = visual.grid_size(images.shape[-2], images.shape[-1])
        features = F.normalize(patch_tokens.float(), dim=-1)
        logits = (features @ text.T).permute(0, 2, 1).reshape(images.shape[0], -1, rows, cols)
        matrices = []
        for i in range(images.shape[0]):  # one image at a time: the crop-size (Q, h, w) scores of PAMR are large
            _, labels = first_pass_labels(logits[i : i + 1], images[i : i + 1], visual.patch_size, config.logit_scale,
                                          config.sfr_temp_thd, config.sfr_pamr_steps, config.sfr_pamr_dilations)
            matrix = sfr_matrix(labels[0], config.sfr_sigma, config.sfr_delete_same_entity)
            matrices.append(affinity_for_attention(matrix, config.sfr_affinity_dtype, images.dtype))
        return torch.stack(matrices)[:, None]

    def patch_tokens(
        self, visual: VisionTransformer, images: torch.Tensor, text: torch.Tensor | None
    ) -> torch.Tensor:
        if text is None:
            raise ValueError("the 'resclip' readout needs the text features (SFR's first pass)")
        variant = last_variant(self.dense)
        state = run_trunk(visual, images, self.dense)  # blocks 1-11, RCS blocks' (q, k) kept
        first = last_block(visual, state, self.dense, variant)[:, 1:]  # no SFR matrix: NACLIP + RCS
        affinity = self.sfr_affinity(visual, images, first, text.to(images.device, torch.float32))
        return last_block(visual, state, self.dense, variant, extras={"sfr_affinity": affinity})[:, 1:]
