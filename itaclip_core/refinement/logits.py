"""Logit refinements: image-guided refinements of the per-query logits (Q, H0, W0) at the original image size,
applied in the order named by `SegmentorConfig.logit_refine`, after the dense stage and before post-processing.

Each refinement is one class in `LOGIT_REFINEMENTS`, built from the config (`from_config`) and called with the
logits and a `RefinementContext` (the guide image at the original size and the logit scale):

- `pamr`: PAMR (`pamr_steps`, `pamr_dilations`; 0 steps: no-op), on the normalised image, as ITACLIP and SCLIP do;
- `crf`: DenseCRF (`crf_*` settings) on the probabilities softmax(logit_scale * logits) over the queries; the
  result is returned as log(Q) / logit_scale, so the post-processing's softmax gives back the CRF's Q exactly.
  With name variants, the CRF's labels are the queries;
- `guided`: the guided or joint bilateral filter (`guided_*` settings) of the logits, guided by the RGB image.

These are distinct from the feature refinements of the dense methods (which act on patch features before text
matching) and from feature upsamplers such as LoftUp (`itaclip_core.upsamplers`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from itaclip_core.inference.preprocess import CLIP_MEAN_255, CLIP_STD_255
from itaclip_core.refinement.crf import check_settings as check_crf_settings
from itaclip_core.refinement.crf import dense_crf
from itaclip_core.refinement.guided import _kornia_filters, check_guided_settings, guided_filter, needs_kornia
from itaclip_core.refinement.pamr import _check_dilations, pamr

if TYPE_CHECKING:
    from itaclip_core.presets import SegmentorConfig


@dataclass
class RefinementContext:
    """What a logit refinement may use besides the logits."""

    image: torch.Tensor  # (3, H0, W0) float32: the CLIP-normalised image, bilinearly resized to the original size
    logit_scale: float  # the factor of the post-processing's softmax over queries

    def rgb(self) -> torch.Tensor:
        """(3, H0, W0) float32 RGB in [0, 1]: the normalisation undone."""
        mean = torch.tensor(CLIP_MEAN_255, device=self.image.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD_255, device=self.image.device).view(3, 1, 1)
        return ((self.image * std + mean) / 255.0).clamp(0.0, 1.0)

    def rgb_uint8(self) -> torch.Tensor:
        """(H0, W0, 3) uint8 RGB."""
        return (self.rgb() * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()

    @classmethod
    def from_resized(cls, image: torch.Tensor, original_size: tuple[int, int], logit_scale: float
                     ) -> "RefinementContext":
        """From the model's (3, h, w) normalised input: resized bilinearly to `original_size` (as PAMR's guide)."""
        guide = F.interpolate(image[None].float(), size=original_size, mode="bilinear")[0]
        return cls(image=guide, logit_scale=float(logit_scale))


class LogitRefinement(ABC):
    """One refinement of the (Q, H0, W0) logits."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, config: "SegmentorConfig") -> "LogitRefinement":
        """Build it from the config's settings, raising ValueError for out-of-range ones."""

    @abstractmethod
    def __call__(self, logits: torch.Tensor, context: RefinementContext) -> torch.Tensor:
        """Refined (Q, H0, W0) float32 logits."""

    @property
    def active(self) -> bool:
        """False when the settings make it a no-op (e.g. PAMR with 0 steps)."""
        return True


class PAMRRefinement(LogitRefinement):
    """PAMR of the logits guided by the normalised image (`pamr_steps`, `pamr_dilations`)."""

    name = "pamr"

    def __init__(self, steps: int, dilations: tuple[int, ...]) -> None:
        if steps < 0:
            raise ValueError(f"pamr_steps is {steps}: give a non-negative number of iterations (0: no PAMR)")
        _check_dilations(dilations)
        self.steps = int(steps)
        self.dilations = tuple(int(d) for d in dilations)

    @classmethod
    def from_config(cls, config: "SegmentorConfig") -> "PAMRRefinement":
        return cls(config.pamr_steps, tuple(config.pamr_dilations))

    @property
    def active(self) -> bool:
        return self.steps > 0

    def __call__(self, logits: torch.Tensor, context: RefinementContext) -> torch.Tensor:
        return pamr(context.image[None], logits[None], self.steps, self.dilations)[0]


class CRFRefinement(LogitRefinement):
    """DenseCRF of softmax(logit_scale * logits) over the queries, returned as log(Q) / logit_scale."""

    name = "crf"

    def __init__(self, iterations: int = 10, gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
                 bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0, bilateral_compat: float = 10.0,
                 backend: str = "lattice") -> None:
        check_crf_settings(iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                           bilateral_compat, backend)
        self.settings = dict(iterations=iterations, gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                             bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                             bilateral_compat=bilateral_compat, backend=backend)

    @classmethod
    def from_config(cls, config: "SegmentorConfig") -> "CRFRefinement":
        return cls(config.crf_iterations, config.crf_gaussian_sxy, config.crf_gaussian_compat,
                   config.crf_bilateral_sxy, config.crf_bilateral_srgb, config.crf_bilateral_compat,
                   config.crf_backend)

    def __call__(self, logits: torch.Tensor, context: RefinementContext) -> torch.Tensor:
        if context.logit_scale <= 0:
            raise ValueError(f"logit_scale is {context.logit_scale}: the crf refinement needs a positive one")
        probs = (logits.float() * context.logit_scale).softmax(dim=0)  # (Q, H0, W0)
        refined = dense_crf(probs, context.rgb_uint8(), **self.settings)
        return refined.clamp_min(torch.finfo(torch.float32).tiny).log() / context.logit_scale


class GuidedRefinement(LogitRefinement):
    """Guided or joint bilateral filtering of the logits with the RGB image as guide (`guided_*` settings)."""

    name = "guided"

    def __init__(self, mode: str = "guided", kernel_size: int = 15, eps: float = 1e-2, sigma_color: float = 0.1,
                 sigma_space: float = 4.0, subsample: int = 1, border: str = "reflect") -> None:
        check_guided_settings(mode, kernel_size, eps, sigma_color, sigma_space, subsample, border)
        if needs_kornia(mode, subsample):
            _kornia_filters()  # a missing extra is reported when the refinement is set up, before any image
        self.settings = dict(mode=mode, kernel_size=kernel_size, eps=eps, sigma_color=sigma_color,
                             sigma_space=sigma_space, subsample=subsample, border=border)

    @classmethod
    def from_config(cls, config: "SegmentorConfig") -> "GuidedRefinement":
        return cls(config.guided_filter, config.guided_kernel, config.guided_eps, config.guided_sigma_color,
                   config.guided_sigma_space, config.guided_subsample, config.guided_border)

    def __call__(self, logits: torch.Tensor, context: RefinementContext) -> torch.Tensor:
        return guided_filter(logits.float(), context.rgb(), **self.settings)


LOGIT_REFINEMENTS: dict[str, type[LogitRefinement]] = {
    cls.name: cls for cls in (PAMRRefinement, CRFRefinement, GuidedRefinement)
}


def build_logit_refinements(config: "SegmentorConfig") -> list[LogitRefinement]:
    """The active refinements named by `config.logit_refine`, in order (settings checked here, before any image)."""
    names = tuple(config.logit_refine)
    unknown = [name for name in names if name not in LOGIT_REFINEMENTS]
    if unknown:
        raise ValueError(
            f"logit_refine names {', '.join(map(repr, unknown))}; known logit refinements: "
            f"{', '.join(LOGIT_REFINEMENTS)} (e.g. --set logit_refine=pamr,crf; none for no refinement)"
        )
    refinements = [LOGIT_REFINEMENTS[name].from_config(config) for name in names]
    return [refinement for refinement in refinements if refinement.active]


def refine_logits(logits: torch.Tensor, refinements: list[LogitRefinement], image: torch.Tensor,
                  original_size: tuple[int, int], logit_scale: float) -> torch.Tensor:
    """Apply `refinements` in order to (Q, H0, W0) logits; `image` is the model's (3, h, w) normalised input."""
    if not refinements:
        return logits
    context = RefinementContext.from_resized(image, original_size, logit_scale)
    for refinement in refinements:
        logits = refinement(logits, context)
    return logits
