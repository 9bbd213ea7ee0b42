"""SC-CLIP (self-calibrated CLIP): dense features of CLIP's image tower, as the official code computes them.

Notation: `X_l` is the token stream after block l (1-based; L blocks, class token first), P the number of patches.
With the default block numbers of the published ViT-B/16 setting (L = 12):

1. Blocks 1 .. L-1 run unchanged. On the patch tokens of `X_{L-1}` an outlier detector picks "anomaly" tokens:
   - `lof` (the official code's current detector): a local outlier factor on squared Euclidean distances with
     k = 30 neighbours, whose reach distance reduces to the point's own k-distance, so
     `LOF(p) = mean_{j in kNN(p)} kdist(p) / kdist(j)`; outliers are the scores above their 0.95 quantile
     (linear interpolation);
   - `l2norm` (the official code's first release): the 10 tokens of largest L2 norm.
2. Each outlier token is replaced by the mean of its non-outlier 8-neighbours on the patch grid (zero padding; a
   token without such a neighbour is kept). `X~` are the repaired patch tokens of `X_{L-1}`; the class token `c`
   of `X_{L-1}` is kept aside.
3. Affinities: `S_mid = cos` of block 9's patch tokens (repaired the same way), `S_b = S_mid` with entries below
   beta = 0.4 set to 0, `S_a = cos` of block 4's patch tokens (not repaired) with entries below 0.4 set to 0.
   `Agg(S, Y) = (S / (rowsum(S) + 1e-6)) Y`.
4. Last-block attention on P tokens Y: `M = 3 (S_mid - mean(S_mid))` with negative entries set to -inf (the same
   for every head), `A = (softmax(M) + softmax(k k^T / sqrt(d))) / 2` with k from `ln_1(Y)`, output
   `out_proj(A v)`; no residual, no MLP.
5. `x = Agg(S_a, Att(Agg(S_b, X~)) + 0.3 c)`; `R = X_4 + ... + X_10` (class token included);
   `r = Agg(S_a, Att(R_patches) + 0.3 R_cls)`; the output is `ln_post(x + r) @ proj`: P patch tokens, no class
   token, not normalised.

Everything runs batched over images; per image the means, quantiles and picks are its own (the official code only
runs batch 1, where the two agree). The only N x N maps are the three P x P affinities of one batch and the
attention maps of the last block, freed when the batch is done.

Differences from the official code, both only where it cannot run: outlier indices are turned into (row, col) with
the number of columns (the official code divides by the number of rows, which is right only for square grids and
raises an IndexError on others), and an image with no outlier keeps its tokens (the official code raises).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from itaclip_core.model.clip import VisionTransformer

DETECTORS = ("lof", "l2norm")


@dataclass(frozen=True)
class SCCLIPSettings:
    """SC-CLIP's settings. Block numbers are 1-based; the defaults are the published ViT-B/16 ones."""

    detector: str = "lof"  # "lof" (official HEAD) or "l2norm" (the first release: top-`top_norms` L2 norms)
    lof_neighbors: int = 30  # k of the local outlier factor
    contamination: float = 0.05  # share of tokens above the LOF quantile
    top_norms: int = 10  # tokens picked by the l2norm detector
    affinity_block: int = 9  # block whose (repaired) patch tokens give S_mid and S_b (`pre_adjust_idx` + 1)
    post_block: int = 4  # block whose patch tokens give S_a (`post_adjust_idx` + 1)
    multi_blocks: tuple[int, int] = (4, 10)  # first and last block (inclusive) summed for the multi-level branch
    beta: float = 0.4  # affinity entries below it are set to 0
    res_cls: float = 0.3  # weight of the class token added after the last-block attention
    temperature: float = 3.0  # factor on the centred S_mid before its softmax

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, num_blocks: int) -> None:
        """Raise a ValueError naming the setting when it does not fit a tower of `num_blocks` blocks."""
        if self.detector not in DETECTORS:
            raise ValueError(f"scclip detector must be one of {', '.join(DETECTORS)}; got {self.detector!r}")
        last_usable = num_blocks - 1
        for name, block in (("affinity_block", self.affinity_block), ("post_block", self.post_block)):
            if not 1 <= block <= last_usable:
                raise ValueError(f"scclip {name} must be a block 1..{last_usable}; got {block}")
        first, last = self.multi_blocks
        if not 1 <= first <= last <= last_usable:
            raise ValueError(
                f"scclip multi_blocks must be (first, last) with 1 <= first <= last <= {last_usable}; "
                f"got {self.multi_blocks}"
            )
        if self.lof_neighbors < 1:
            raise ValueError(f"scclip lof_neighbors must be at least 1; got {self.lof_neighbors}")
        if not 0.0 < self.contamination < 1.0:
            raise ValueError(f"scclip contamination must be in (0, 1); got {self.contamination}")
        if self.top_norms < 0:
            raise ValueError(f"scclip top_norms must be >= 0; got {self.top_norms}")


def lof_scores(tokens: torch.Tensor, neighbors: int) -> torch.Tensor:
    """The official code's local outlier factor of each token: (B, P, C) -> (B, P).

    Squared Euclidean distances, the `neighbors` nearest other tokens; reach distances `max(d_j, kdist(p))`,
    `LRD = k / mean(reach)`, `LOF(p) = mean_j LRD(j) / LRD(p)`.
    """
    count = tokens.shape[1]
    if neighbors + 1 > count:
        raise ValueError(
            f"scclip's LOF detector needs more than lof_neighbors={neighbors} tokens per window; got {count} patches "
            "(use a larger window or a smaller lof_neighbors)"
        )
    # Direct differences (not |x|^2 + |y|^2 - 2xy), as the official code computes them.
    distances = torch.cdist(tokens, tokens, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (B, P, P)
    knn_distances, knn_indices = torch.topk(distances, k=neighbors + 1, dim=-1, largest=False)
    del distances
    knn_distances, knn_indices = knn_distances[..., 1:], knn_indices[..., 1:]  # drop the token itself
    k_distances = knn_distances[..., -1:].expand_as(knn_distances)
    reach = torch.maximum(knn_distances, k_distances)
    lrd = neighbors / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)  # (B, P)
    ratios = torch.gather(lrd, 1, knn_indices.flatten(1)).view_as(knn_indices) / lrd.unsqueeze(-1)
    return ratios.mean(dim=-1)


def detect_outliers(tokens: torch.Tensor, settings: SCCLIPSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly tokens of patch tokens (B, P, C): (mask (B, P) bool, scores (B, P) float32).

    Scores are the LOF values (`lof`) or the L2 norms (`l2norm`).
    """
    if settings.detector == "lof":
        scores = lof_scores(tokens, settings.lof_neighbors)
        threshold = torch.quantile(scores.float(), 1.0 - settings.contamination, dim=-1, keepdim=True)
        return scores > threshold, scores.float()
    norms = torch.linalg.vector_norm(tokens, dim=-1)  # (B, P)
    top = min(settings.top_norms, norms.shape[1])
    order = torch.sort(norms, dim=-1, descending=True).indices[:, :top]
    mask = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, order, True)
    return mask, norms.float()


def repair_tokens(tokens: torch.Tensor, mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Replace each masked token by the mean of its unmasked 8-neighbours: (B, P, C) -> (B, P, C).

    The grid is row-major (`P = rows * cols`); zero padding; a masked token with no unmasked neighbour is kept.
    """
    batch, count, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, rows, cols)
    valid = (~mask).to(tokens.dtype).view(batch, 1, rows, cols)
    kernel = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    kernel[..., 1, 1] = 0
    sums = F.conv2d(F.pad(grid * valid, (1, 1, 1, 1)).reshape(batch * channels, 1, rows + 2, cols + 2), kernel)
    sums = sums.view(batch, channels, rows, cols)
    counts = F.conv2d(F.pad(valid, (1, 1, 1, 1)), kernel)  # (B, 1, rows, cols)
    means = sums / torch.where(counts == 0, torch.ones_like(counts), counts)
    update = mask.view(batch, 1, rows, cols) & (counts > 0)
    repaired = torch.where(update, means, grid)
    return repaired.reshape(batch, channels, count).transpose(1, 2)


def cosine_affinity(tokens: torch.Tensor) -> torch.Tensor:
    """(B, P, C) -> (B, P, P) cosine similarities (each token divided by its norm, as the official code does)."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(1, 2)


def aggregate(affinity: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`(S / (rowsum(S) + 1e-6)) Y` for S (B, P, P) and Y (B, P, C)."""
    return (affinity / (affinity.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def _last_block_attention(
    visual: VisionTransformer, tokens: torch.Tensor, affinity_softmax: torch.Tensor, explicit: bool
) -> torch.Tensor:
    """SC-CLIP's last-block attention on P tokens (B, P, width), no residual or MLP: (B, P, width)."""
    block = visual.blocks[-1]
    _, k, v = block.qkv(tokens)  # (B, H, P, hd)
    mixed = affinity_softmax.unsqueeze(1).to(v.dtype)  # (B, 1, P, P), the same for every head
    if explicit:
        scale = k.shape[-1] ** -0.5
        attention = (mixed + F.softmax((k @ k.transpose(-1, -2)) * scale, dim=-1)) / 2
        out = attention @ v
    else:
        out = (mixed @ v + F.scaled_dot_product_attention(k, k, v)) / 2
    return block.project(out)


def scclip_tokens(
    visual: VisionTransformer,
    images: torch.Tensor,
    settings: SCCLIPSettings = SCCLIPSettings(),
    explicit: bool = False,
    intermediates: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SC-CLIP's dense features of images (B, 3, H, W): (B, rows * cols, output_dim), patches only, not normalised.

    Args:
        visual: CLIP's image tower.
        images: normalised images.
        settings: the method's settings.
        explicit: build the last block's k-k attention map instead of the fused kernel (inspection, tests).
        intermediates: if given, filled with `outlier_scores` (B, P), `outlier_mask` (B, P), `repaired` (B, P,
            width: the repaired tokens of block L-1), `affinity_mid`, `affinity_pre` and `affinity_post` (B, P, P).
    """
    blocks = visual.blocks
    settings.check(len(blocks))
    rows, cols = visual.grid_size(images.shape[-2], images.shape[-1])
    first, last = settings.multi_blocks
    x = visual.embed(images)  # (B, 1 + P, width)
    multi = torch.zeros_like(x)
    mid_tokens = post_tokens = None
    for number, block in enumerate(blocks[:-1], start=1):
        x = block(x)
        if first <= number <= last:
            multi += x
        if number == settings.affinity_block:
            mid_tokens = x[:, 1:]
        if number == settings.post_block:
            post_tokens = x[:, 1:]
    cls = x[:, :1]  # class token of block L-1
    mask, scores = detect_outliers(x[:, 1:], settings)
    repaired = repair_tokens(x[:, 1:], mask, rows, cols)

    affinity_mid = cosine_affinity(repair_tokens(mid_tokens, mask, rows, cols))
    affinity_pre = affinity_mid.masked_fill(affinity_mid < settings.beta, 0.0)
    affinity_post = cosine_affinity(post_tokens)
    affinity_post = affinity_post.masked_fill(affinity_post < settings.beta, 0.0)
    centred = (affinity_mid - affinity_mid.mean(dim=(-2, -1), keepdim=True)) * settings.temperature
    affinity_softmax = F.softmax(centred.masked_fill(centred < 0, float("-inf")), dim=-1)
    del centred
    if intermediates is not None:
        intermediates.update(outlier_scores=scores, outlier_mask=mask, repaired=repaired, affinity_mid=affinity_mid,
                             affinity_pre=affinity_pre, affinity_post=affinity_post)

    # The two branches share the attention: one pass over both, stacked on the batch axis.
    batch = x.shape[0]
    inputs = torch.cat([aggregate(affinity_pre, repaired), multi[:, 1:]])  # (2B, P, width)
    attended = _last_block_attention(visual, inputs, affinity_softmax.repeat(2, 1, 1), explicit)
    main = aggregate(affinity_post, attended[:batch] + settings.res_cls * cls)
    multi_level = aggregate(affinity_post, attended[batch:] + settings.res_cls * multi[:, :1])
    return visual.head(main + multi_level)


@torch.no_grad()
def scclip_attention(visual: VisionTransformer, images: torch.Tensor,
                     settings: SCCLIPSettings = SCCLIPSettings()) -> torch.Tensor:
    """The last-block attention of SC-CLIP's main branch, `(softmax(M) + softmax(k k^T s)) / 2` averaged over heads:
    (B, P, P), for inspection (the multi-level branch uses the same affinity part)."""
    inter: dict[str, torch.Tensor] = {}
    scclip_tokens(visual, images, settings, intermediates=inter)
    block = visual.blocks[-1]
    _, k, _ = block.qkv(aggregate(inter["affinity_pre"], inter["repaired"]))
    centred = (inter["affinity_mid"] - inter["affinity_mid"].mean(dim=(-2, -1), keepdim=True)) * settings.temperature
    mixed = F.softmax(centred.masked_fill(centred < 0, float("-inf")), dim=-1)
    keys = F.softmax((k @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5, dim=-1).mean(dim=1)
    return ((mixed + keys) / 2).float()


def settings_from(config) -> SCCLIPSettings:
    """SC-CLIP's settings from a `SegmentorConfig` (`scclip_*` fields), checked against nothing yet: call `check`."""
    blocks = tuple(config.scclip_blocks)
    if len(blocks) != 4:
        raise ValueError(
            "scclip_blocks must be four 1-based block numbers: affinity block, post block, first and last block of "
            f"the multi-level sum (published: 9,4,4,10); got {','.join(map(str, blocks)) or 'none'}"
        )
    if config.scclip_detector not in DETECTORS:
        raise ValueError(f"scclip_detector must be one of {', '.join(DETECTORS)}; got {config.scclip_detector!r}")
    return SCCLIPSettings(detector=config.scclip_detector, affinity_block=blocks[0], post_block=blocks[1],
                          multi_blocks=(blocks[2], blocks[3]), res_cls=config.scclip_res_cls)


# ------------------------------------------------------------------------------------------------ dense readout
from itaclip_core.methods.base import DenseReadout, register_readout  # noqa: E402


@register_readout("scclip")
class SCCLIPReadout(DenseReadout):
    """SC-CLIP's patch tokens (`scclip_tokens`) as the dense readout; settings from the `scclip_*` fields.

    Patch features exist, so image engineering and feature refinements compose with it.
    """

    def __init__(self, config, dense) -> None:
        super().__init__(config, dense)
        self.settings = settings_from(config)

    def check(self, config) -> None:
        super().check(config)
        if config.protocol != "standard":
            raise ValueError(f"protocol={config.protocol}: SC-CLIP runs in the standard protocol only")

    def check_model(self, model) -> None:
        self.settings.check(len(model.visual.blocks))

    def patch_tokens(self, visual: VisionTransformer, images: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        return scclip_tokens(visual, images, self.settings)
