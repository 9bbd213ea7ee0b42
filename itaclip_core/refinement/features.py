"""Feature refinements: training-free operations on the dense patch features of each window, in a registry.

They run after the backbone and the dense readout, before the product with the text features, in the order of
`SegmentorConfig.refine` (`--set refine=selfcorr,regional`), and work with every readout that has patch features
(`DenseReadout.accepts_refinements`). Each is one class:

    @register_refinement("my-refinement")
    class MyRefinement(FeatureRefinement):
        settings = {"alpha": "my_alpha"}         # constructor parameter -> SegmentorConfig field

        def refine(self, features, context):    # (n, rows, cols, D) -> (n, rows, cols, D)
            ...

`features` are the n windows' patch features as the readout gives them (L2-normalised, views mixed); `context`
(`RefineContext`) holds the windows' normalised crops (n, 3, h, w), the text features (Q, D), the config and the
patch size, for refinements that look at the image or the text (SFR). A refinement keeps the feature scale (the
logit scale keeps its meaning) and at most one (P x P) matrix per window at a time.

Built-in refinements (P = rows * cols patches of a window, F_p the feature of patch p):

- `selfcorr` (CLIPtrase-style recalibration): G = normalize(F) G^T the patch correlation, W = softmax(G / T) over
  each row (T = `selfcorr_temperature`, 0.05), R = W F, output (1 - a) F + a R (a = `selfcorr_alpha`, 0.5).
- `regional` (regional clues; a training-free heuristic, not the trained CLIP-RC method): the grid is covered by
  g x g regions (g = `regional_grid`, 4) that overlap by a fraction o (`regional_overlap`, 0.25) of their size
  along each axis: region size s = L / (g - (g - 1) o) patches and step s (1 - o) on an axis of L patches, so they
  tile the axis exactly. A patch belongs to a region when its centre (i + 0.5) lies in the region's span (both
  ends included); a region that holds no patch centre (tiny grids) takes the patch nearest to its centre. The
  regional feature r_k is the mean feature of region k's patches. Each patch gets the distance-weighted regional
  feature R_p = sum_k w_pk r_k, w_pk proportional to exp(-d(p, c_k)^2 / (2 sigma^2)), d the distance in patches
  between the patch centre and the region centre, sigma = half the mean region size, normalised over k. With the
  global feature m = mean_p F_p and b = `regional_beta` (0.6), the clue (1 - b) m + b R_p is added to the patch's
  own feature (the residual) and the sum is brought back to the patch's norm:
  out_p = |F_p| normalize(F_p + (1 - b) m + b R_p).
- `sfr` (ResCLIP's semantic feedback, after any method): the window's patch logits against the text give
  first-pass labels exactly as ResCLIP does (bilinear to the crop, PAMR on the crop, softmax with the logit
  scale, `sfr_temp_thd`, per-patch mode; `itaclip_core.methods.resclip`), whose SFR matrix S (rows summing to 1)
  then mixes the features: out = (1 - l) F + l S F, l = `sfr_refine_weight` (0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from itaclip_core.registry import registrar

if TYPE_CHECKING:
    from itaclip_core.presets import SegmentorConfig

REFINEMENTS: dict[str, type["FeatureRefinement"]] = {}



# Class decorator adding a feature refinement to `REFINEMENTS` under its name: `@register_refinement("name")`.
register_refinement = registrar(REFINEMENTS, "feature refinement")


@dataclass
class RefineContext:
    """What a refinement may use besides the features of a batch of windows."""

    crops: torch.Tensor  # (n, 3, h, w) the windows, normalised as the tower saw them
    text_features: torch.Tensor  # (Q, D) float32 normalised text queries
    config: "SegmentorConfig"
    patch_size: int


class FeatureRefinement:
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    settings: ClassVar[dict[str, str]] = {}  # constructor parameter -> SegmentorConfig field

    @classmethod
    def from_config(cls, config: "SegmentorConfig") -> "FeatureRefinement":
        return cls(**{param: getattr(config, field) for param, field in cls.settings.items()})

    def refine(self, features: torch.Tensor, context: RefineContext | None = None) -> torch.Tensor:
        """(n, rows, cols, D) patch features -> refined features of the same shape."""
        raise NotImplementedError


def refinement_class(name: str) -> type[FeatureRefinement]:
    try:
        return REFINEMENTS[name]
    except KeyError:
        raise ValueError(f"refine: unknown feature refinement {name!r}; registered: {', '.join(sorted(REFINEMENTS))}"
                         ) from None


def build_refinements(config: "SegmentorConfig") -> list[FeatureRefinement]:
    """The refinements of `config.refine`, in order, with their settings (checked before any work)."""
    return [refinement_class(name).from_config(config) for name in config.refine]


def _check_range(field: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok or math.isnan(value):
        bracket = "(" if low_open else "["
        raise ValueError(f"{field}={value}: must be in {bracket}{low}, {high}]")


@register_refinement("selfcorr")
class SelfCorrelation(FeatureRefinement):
    """Recalibration by the patch self-correlation: (1 - a) F + a softmax(G / T) F, G the cosine matrix."""

    settings = {"temperature": "selfcorr_temperature", "alpha": "selfcorr_alpha"}

    def __init__(self, temperature: float = 0.05, alpha: float = 0.5) -> None:
        _check_range("selfcorr_temperature", temperature, 0.0, math.inf, low_open=True)
        _check_range("selfcorr_alpha", alpha, 0.0, 1.0)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def refine(self, features: torch.Tensor, context: RefineContext | None = None) -> torch.Tensor:
        n, rows, cols, dim = features.shape
        flat = features.reshape(n, rows * cols, dim)
        out = torch.empty_like(flat)
        for i in range(n):  # one (P x P) matrix at a time
            unit = torch.nn.functional.normalize(flat[i], dim=-1)
            weights = torch.softmax(unit @ unit.T / self.temperature, dim=-1)  # (P, P)
            out[i] = (1.0 - self.alpha) * flat[i] + self.alpha * (weights @ flat[i])
        return out.view(n, rows, cols, dim)


def region_spans(length: int, grid: int, overlap: float) -> list[tuple[float, float]]:
    """The `grid` overlapping spans [start, end] (in patches) that tile an axis of `length` patches."""
    size = length / (grid - (grid - 1) * overlap)
    step = size * (1.0 - overlap)
    return [(k * step, k * step + size) for k in range(grid)]


def region_weights(rows: int, cols: int, grid: int, overlap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(members (K, P) row-normalised membership, weights (P, K) distance weights), K = grid^2, float64."""
    def axis(length: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        centres = torch.arange(length, dtype=torch.float64) + 0.5
        spans = region_spans(length, grid, overlap)
        member = torch.zeros(grid, length, dtype=torch.float64)
        for k, (start, end) in enumerate(spans):
            inside = (centres >= start) & (centres <= end)
            if not inside.any():
                inside[int(torch.argmin((centres - (start + end) / 2).abs()))] = True
            member[k] = inside.double()
        region_centres = torch.tensor([(s + e) / 2 for s, e in spans], dtype=torch.float64)
        return member, region_centres, spans[0][1] - spans[0][0]

    member_r, centre_r, size_r = axis(rows)
    member_c, centre_c, size_c = axis(cols)
    members = torch.einsum("ai,bj->abij", member_r, member_c).reshape(grid * grid, rows * cols)
    members = members / members.sum(dim=1, keepdim=True)
    sigma = (size_r + size_c) / 4.0
    patch_r = (torch.arange(rows, dtype=torch.float64) + 0.5)[:, None].expand(rows, cols).reshape(-1)
    patch_c = (torch.arange(cols, dtype=torch.float64) + 0.5)[None, :].expand(rows, cols).reshape(-1)
    reg_r = centre_r[:, None].expand(grid, grid).reshape(-1)
    reg_c = centre_c[None, :].expand(grid, grid).reshape(-1)
    dist2 = (patch_r[:, None] - reg_r[None]) ** 2 + (patch_c[:, None] - reg_c[None]) ** 2  # (P, K)
    weights = torch.softmax(-dist2 / (2 * sigma**2), dim=1)  # normalised exp(-d^2 / (2 sigma^2))
    return members, weights


@register_refinement("regional")
class RegionalClues(FeatureRefinement):
    """Overlapping regional mean features mapped back by distance, blended with the global mean, plus the patch's
    own feature, at the patch's norm (the module docstring gives the exact form)."""

    settings = {"grid": "regional_grid", "overlap": "regional_overlap", "beta": "regional_beta"}

    def __init__(self, grid: int = 4, overlap: float = 0.25, beta: float = 0.6) -> None:
        if int(grid) != grid or grid < 1:
            raise ValueError(f"regional_grid={grid}: must be an integer >= 1")
        _check_range("regional_overlap", overlap, 0.0, 0.95)
        _check_range("regional_beta", beta, 0.0, 1.0)
        self.grid = int(grid)
        self.overlap = float(overlap)
        self.beta = float(beta)

    def refine(self, features: torch.Tensor, context: RefineContext | None = None) -> torch.Tensor:
        n, rows, cols, dim = features.shape
        members, weights = region_weights(rows, cols, self.grid, self.overlap)
        mapping = (weights @ members).to(features.device, features.dtype)  # (P, P): R = mapping F
        flat = features.reshape(n, rows * cols, dim)
        regional = mapping @ flat  # (n, P, D)
        global_mean = flat.mean(dim=1, keepdim=True)  # (n, 1, D)
        combined = flat + (1.0 - self.beta) * global_mean + self.beta * regional
        scale = flat.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (combined * scale).view(n, rows, cols, dim)


@register_refinement("sfr")
class SemanticFeedback(FeatureRefinement):
    """ResCLIP's SFR after any method: first-pass labels from the features' own logits, then (1 - l) F + l S F."""

    settings = {"weight": "sfr_refine_weight", "temp_thd": "sfr_temp_thd", "sigma": "sfr_sigma",
                "delete_same_entity": "sfr_delete_same_entity", "pamr_steps": "sfr_pamr_steps",
                "pamr_dilations": "sfr_pamr_dilations"}

    def __init__(self, weight: float = 0.5, temp_thd: float = 0.5, sigma: float = 5.0,
                 delete_same_entity: bool = True, pamr_steps: int = 10,
                 pamr_dilations: tuple[int, ...] = (8, 16)) -> None:
        _check_range("sfr_refine_weight", weight, 0.0, 1.0)
        _check_range("sfr_temp_thd", temp_thd, 0.0, 1.0)
        _check_range("sfr_sigma", sigma, 0.0, math.inf, low_open=True)
        if pamr_steps < 0:
            raise ValueError(f"sfr_pamr_steps={pamr_steps}: must be >= 0")
        self.weight = float(weight)
        self.temp_thd = float(temp_thd)
        self.sigma = float(sigma)
        self.delete_same_entity = bool(delete_same_entity)
        self.pamr_steps = int(pamr_steps)
        self.pamr_dilations = tuple(pamr_dilations)

    def refine(self, features: torch.Tensor, context: RefineContext | None = None) -> torch.Tensor:
        from itaclip_core.methods.resclip import first_pass_labels, sfr_matrix

        if context is None:
            raise ValueError("the sfr refinement needs the windows' crops and the text features (a RefineContext)")
        n, rows, cols, dim = features.shape
        logits = (features @ context.text_features.T).permute(0, 3, 1, 2)  # (n, Q, rows, cols)
        _, labels = first_pass_labels(logits, context.crops, context.patch_size, context.config.logit_scale,
                                      self.temp_thd, self.pamr_steps, self.pamr_dilations)
        flat = features.reshape(n, rows * cols, dim)
        out = torch.empty_like(flat)
        for i in range(n):
            matrix = sfr_matrix(labels[i], self.sigma, self.delete_same_entity)[1:, 1:].to(flat.dtype)  # (P, P)
            out[i] = (1.0 - self.weight) * flat[i] + self.weight * (matrix @ flat[i])
        return out.view(n, rows, cols, dim)


def describe(name: str) -> dict[str, Any]:
    """Name, settings and summary of a registered refinement (for listings)."""
    cls = refinement_class(name)
    return {"name": name, "settings": dict(cls.settings), "summary": (cls.__doc__ or "").strip().splitlines()[0]}
