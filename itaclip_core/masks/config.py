"""Typed settings of the mask generators, and their presets.

`SuperpixelConfig` drives scikit-image's SLIC or Felzenszwalb segmentation; `SamGeneratorConfig` the automatic mask
generators of SAM (`SamAutomaticMaskGenerator`) and SAM 2 (`SAM2AutomaticMaskGenerator`). A preset is a named
config (`GENERATOR_PRESETS`); single fields are changed with `key=value` strings (`generator_config(...)`, which is
what `--set mask_generator_args=points_per_side=16,pred_iou_thresh=0.5` uses).

Presets:
- `slic`, `felzenszwalb`: superpixels, no weights;
- `sam_default`: SAM's own defaults (32 points per side, IoU threshold 0.88, stability 0.95);
- `sam2_default`: SAM 2's defaults (32 points, IoU 0.8, stability 0.95, three masks per point, SAM 2's dynamic
  multimask post-processing);
- `corrclip_8`: CorrCLIP's on-the-fly SAM 2 setting (8 points per side, IoU and stability 0.4, one mask per point,
  no SAM 2 post-processing); `corrclip_32`: the same with 32 points per side (CorrCLIP's pre-generated masks; the
  paper's exact thresholds for those are not published, so these reuse the on-the-fly ones).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from itaclip_core.masks.maskset import MaskError


@dataclass(frozen=True)
class SuperpixelConfig:
    """scikit-image superpixels: `slic` (k-means in colour + position) or `felzenszwalb` (graph-based)."""

    algorithm: str = "slic"  # "slic" or "felzenszwalb"
    n_segments: int = 64  # SLIC: approximate number of superpixels
    compactness: float = 10.0  # SLIC: colour against space (higher: more square superpixels)
    sigma: float = 1.0  # Gaussian smoothing before segmenting (both algorithms)
    scale: float = 200.0  # Felzenszwalb: larger gives larger segments
    min_size: int = 50  # Felzenszwalb: smallest segment in pixels


@dataclass(frozen=True)
class SamGeneratorConfig:
    """Automatic mask generator settings shared by SAM and SAM 2 (names as in the packages)."""

    points_per_side: int = 32  # point grid of prompts: points_per_side ** 2 prompts per image
    points_per_batch: int | None = None  # prompts decoded together; None: 64 on the CPU, 256 on a GPU
    pred_iou_thresh: float = 0.88  # keep masks whose predicted IoU is above it
    stability_score_thresh: float = 0.95  # keep masks whose stability score is above it
    stability_score_offset: float = 1.0  # logit offset of the stability score
    box_nms_thresh: float = 0.7  # box IoU of the non-maximum suppression between masks
    crop_n_layers: int = 0  # extra layers of image crops (0: the whole image only)
    crop_nms_thresh: float = 0.7  # NMS between crops
    min_mask_region_area: int = 0  # remove small holes and islands (needs OpenCV; 0: off)
    multimask_output: bool = True  # SAM 2 only: three masks per point (False: one)
    apply_postprocessing: bool = True  # SAM 2 only: dynamic multimask fallback via stability (SAM 2's default)

    def generator_kwargs(self, device_type: str, sam2: bool) -> dict[str, Any]:
        """Keyword arguments of the package's automatic mask generator."""
        kwargs: dict[str, Any] = {
            "points_per_side": self.points_per_side,
            "points_per_batch": self.points_per_batch or (256 if device_type == "cuda" else 64),
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "stability_score_offset": self.stability_score_offset,
            "box_nms_thresh": self.box_nms_thresh,
            "crop_n_layers": self.crop_n_layers,
            "crop_nms_thresh": self.crop_nms_thresh,
            "min_mask_region_area": self.min_mask_region_area,
            "output_mode": "binary_mask",
        }
        if sam2:
            kwargs["multimask_output"] = self.multimask_output
        return kwargs


GeneratorConfig = SuperpixelConfig | SamGeneratorConfig

GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    "slic": SuperpixelConfig(algorithm="slic"),
    "felzenszwalb": SuperpixelConfig(algorithm="felzenszwalb"),
    "sam_default": SamGeneratorConfig(),
    "sam2_default": SamGeneratorConfig(pred_iou_thresh=0.8),
    "corrclip_8": SamGeneratorConfig(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4,
                                     multimask_output=False, apply_postprocessing=False),
    "corrclip_32": SamGeneratorConfig(points_per_side=32, pred_iou_thresh=0.4, stability_score_thresh=0.4,
                                      multimask_output=False, apply_postprocessing=False),
}


def _convert(raw: str, hint: Any, key: str) -> Any:
    text = raw.strip()
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise MaskError(f"mask generator setting {key}={raw}: expected true or false")
    try:
        return hint(text)
    except ValueError:
        raise MaskError(f"mask generator setting {key}={raw}: expected a {hint.__name__}") from None


def generator_config(preset: str | GeneratorConfig, overrides: Iterable[str] | dict[str, Any] = ()
                     ) -> GeneratorConfig:
    """A preset (or config) with `key=value` overrides applied, validated."""
    if isinstance(preset, str):
        try:
            config = GENERATOR_PRESETS[preset]
        except KeyError:
            raise MaskError(f"unknown mask generator preset {preset!r}; available: "
                            f"{', '.join(GENERATOR_PRESETS)}") from None
    else:
        config = preset
    hints = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    items = overrides.items() if isinstance(overrides, dict) else (item.partition("=")[::2] for item in overrides)
    for key, value in items:
        key = key.strip()
        if key not in hints:
            raise MaskError(f"unknown mask generator setting {key!r} for {type(config).__name__}; known: "
                            f"{', '.join(hints)}")
        changes[key] = _convert(value, hints[key], key) if isinstance(value, str) else value
    config = dataclasses.replace(config, **changes)
    check_generator_config(config)
    return config


def check_generator_config(config: GeneratorConfig) -> None:
    """Raise `MaskError` for values the generators cannot use."""
    if isinstance(config, SuperpixelConfig):
        if config.algorithm not in ("slic", "felzenszwalb"):
            raise MaskError(f"superpixel algorithm {config.algorithm!r} is not one of slic, felzenszwalb")
        if config.n_segments < 1 or config.min_size < 1:
            raise MaskError("superpixel n_segments and min_size must be at least 1")
        return
    if config.points_per_side < 1:
        raise MaskError(f"points_per_side must be at least 1, got {config.points_per_side}")
    if config.points_per_batch is not None and config.points_per_batch < 1:
        raise MaskError(f"points_per_batch must be at least 1, got {config.points_per_batch}")
    if config.crop_n_layers < 0 or config.min_mask_region_area < 0:
        raise MaskError("crop_n_layers and min_mask_region_area must be >= 0")
