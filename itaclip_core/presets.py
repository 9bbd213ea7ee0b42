"""Segmentor settings and the presets of the published methods.

`SegmentorConfig` holds every knob of the pipeline; a preset is a named config. Every field can be overridden from
Python (`config.replace(stride=56)`) or from strings (`apply_overrides(config, ["stride=56", "aux_file=none"])`,
which is what the CLI's `--set key=value` uses).

ITACLIP presets use the published per-dataset settings (ViT-B/16, crop 224, stride 28, five-view image engineering,
self-self attention with blocks 7, 8, 10 fused into the last block, definitions or synonyms, PAMR 10 steps with
dilations 8 and 16, 3x3 closing). SCLIP presets use SCLIP's settings (stride 112, self-self attention in the last
block with its residual and MLP, no PAMR, no closing, SCLIP's class files).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from itaclip_core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from itaclip_core.attention.dense import DenseConfig


@dataclass(frozen=True)
class SegmentorConfig:
    """Every setting of the segmentation pipeline."""

    name: str = "custom"  # preset name, recorded in reports
    method: str = "itaclip"  # "itaclip", "sclip" or "custom": informational
    dataset: str | None = None  # dataset registry name this preset evaluates on (None: open vocabulary)
    classes: str | None = None  # class-name file (under texts/ or a path); None: classes are given to the Segmentor
    background: bool = False  # class 0 is background: not mixed with auxiliary text; area threshold spares it
    aux_file: str | None = None  # definitions/synonyms file (`name >=text` per non-background class) or None
    aux_coef: float = 0.0  # weight c of the auxiliary embedding: (1 - c) * name + c * aux
    templates: str = "templates/openai_imagenet_templates.txt"  # prompt templates (under texts/ or a path)
    short_side: int = 336  # keep-ratio resize target of the short side
    long_side: int = 2048  # cap of the long side in that resize
    crop: int = 224  # sliding-window size in pixels
    stride: int = 28  # sliding-window step in pixels
    attention: str = "selfself"  # attention variant of the last block (see itaclip_core.attention)
    fuse_blocks: tuple[int, ...] = (7, 8, 10)  # 1-based blocks whose attention maps are fused into the last one
    fuse_attention: str | None = None  # variant for the fused blocks' maps (None: same as `attention`)
    fuse_weight: float = 0.5  # weight of the last block's own map in the fusion
    last_residual: bool = True  # keep the last block's residual connection
    last_mlp: bool = False  # keep the last block's MLP
    image_engineering: bool = True  # five views per crop (original, gray, blur, two flips)
    img_eng_coef: float = 0.75  # weight of the original/gray/blur views against the flipped ones
    pamr_steps: int = 10  # PAMR iterations (0: no PAMR)
    pamr_dilations: tuple[int, ...] = (8, 16)  # PAMR neighbour distances
    logit_scale: float = 40.0  # multiplies similarities before the softmax over queries
    prob_thd: float = 0.0  # pixels whose top probability is below it become class 0
    area_thd: float | None = None  # classes (other than 0) with a smaller share of the predicted area are dropped
    closing: bool = True  # 3x3 morphological closing of the label map
    batch_size: int | None = None  # images (windows x views) per forward pass; None: 16 on CPU, from free memory on GPU
    text_batch_size: int | None = None  # prompts per forward pass of the text tower; None: 256 CPU, 1024 GPU
    truncate_texts: bool = False  # cut prompts longer than 77 tokens instead of refusing them
    # --- dense methods and feature refinements (see itaclip_core.methods, itaclip_core.refinement) ---
    readout: str = "tokens"  # dense readout (a name in itaclip_core.methods.DENSE_READOUTS)
    attention_scale: float = 1.0  # factor on the last block's fused attention (ResCLIP's RCS tau)
    neighbourhood_sigma: float = 5.0  # NACLIP's Gaussian neighbourhood bias, in patches (variants naclip/resclip)
    sfr_tau: float = 1.0  # ResCLIP SFR weights [tau, lambda] of the SFR matrix in the last block's logits
    sfr_lambda: float = 0.0
    sfr_temp_thd: float = 0.5  # first-pass pixels with a lower top probability get query 0
    sfr_pamr_steps: int = 10  # PAMR steps of SFR's first pass (ResCLIP always runs 10, dilations 8 and 16)
    sfr_pamr_dilations: tuple[int, ...] = (8, 16)
    sfr_delete_same_entity: bool = True  # decay same-label pairs with no straight same-label path
    sfr_sigma: float = 5.0  # Gaussian row smoothing of the SFR matrix (ResCLIP shares sigma with the bias)
    sfr_affinity_dtype: str = "float16"  # ResCLIP casts S / max(S) to float16 even in float32 ("model": no cast)
    sfr_refine_weight: float = 0.5  # weight of S F in the `sfr` feature refinement
    renormalize: bool = False  # divide the class probabilities by their sum (NACLIP / ResCLIP's seg_logits)
    refine: tuple[str, ...] = ()  # feature refinements, in order (itaclip_core.refinement.features.REFINEMENTS)
    selfcorr_temperature: float = 0.05
    selfcorr_alpha: float = 0.5
    regional_grid: int = 4
    regional_overlap: float = 0.25
    regional_beta: float = 0.6
    class_separator: str = ", "  # between name variants in class files (ClearCLIP's files: ",")
    pad_to_patch: bool = False  # zero-pad windows to a patch multiple, crop the logits back (ClearCLIP)
    # SC-CLIP and CLIPtrase (itaclip_core/methods/scclip.py, cliptrase.py)
    scclip_detector: str = "lof"  # SC-CLIP anomaly detector: "lof" (official code) or "l2norm" (its first release)
    scclip_blocks: tuple[int, ...] = (9, 4, 4, 10)  # SC-CLIP: affinity block, post block, multi-level first, last
    scclip_res_cls: float = 0.3  # SC-CLIP: weight of the class token after the last-block attention
    cliptrase_eps: float = 1.1  # CLIPtrase: DBSCAN radius
    cliptrase_min_samples: int = 7  # CLIPtrase: DBSCAN core-point count
    cliptrase_cls_weighting: bool = False  # CLIPtrase: patch scores times the class token's (official VOC20)
    protocol: str = "standard"  # "standard": resize, sliding window; "centre_crop": CLIPtrase's script (crop x crop)
    # Mask proposals (itaclip_core.masks): where masks come from and what they are used for
    masks: str | None = None  # mask source: superpixels, sam, sam2, or a folder of <stem>.png/.npz; None: no masks
    mask_use: str = "vote"  # vote (relabel each mask), attention (mask-scoped last block), proxy (ProxyCLIP)
    mask_generator: str | None = None  # generator preset (slic, felzenszwalb, sam_default, sam2_default,
    # corrclip_8, corrclip_32); None: the source's default
    mask_generator_args: tuple[str, ...] = ()  # key=value overrides of the generator settings
    mask_model: str | None = None  # sam: vit_b, vit_l, vit_h; sam2: sam2.1_hiera_t/s/b+/l, sam2_hiera_*; None: default
    mask_checkpoint: str | None = None  # generator checkpoint path; None: official download; random-tiny: random
    mask_cache: bool = True  # cache generated masks on disk, keyed by image content and generator settings
    mask_order: str = "small_on_top"  # overlapping masks: small_on_top, large_on_top (CorrCLIP), score
    mask_vote: str = "mode"  # region label: mode (majority), probs (mean probabilities), features (mean features)
    mask_min_area: int = 0  # masks with fewer pixels (at the original size) are ignored
    mask_correlation: str = "clip"  # mask attention's similarity: clip (last block q+k) or dino (timm DINO ViT-B/8)
    mask_tau: float = 4.0  # mask attention: softmax temperature of the scoped cosine similarities
    mask_spatial_weight: float = 1.0  # mask attention: weight of the mid-block (spatial) branch; 0: off
    mask_semantic_weight: float = 0.5  # mask attention: weight of the per-mask class tokens; 0: off
    mask_final_vote: bool = True  # mask attention: also vote (mask_vote) over the final labels, as CorrCLIP does
    proxy_model: str = "dino_vitb8"  # proxy attention's model: dino_vits8/vits16/vitb8/vitb16, sam_vit_b
    proxy_checkpoint: str | None = None  # proxy model weights path; None: official download; random: random weights
    proxy_beta: float = 1.2  # proxy attention: similarities below beta x their mean are removed
    proxy_gamma: float = 3.0  # proxy attention: softmax scale
    # --- Boundary refinement: logit refinements at the original size, in this order (see
    # itaclip_core.refinement.logits: pamr, crf, guided), their settings, and a feature upsampler of the dense stage.
    logit_refine: tuple[str, ...] = ("pamr",)  # "pamr" runs only when pamr_steps > 0
    crf_iterations: int = 10  # DenseCRF mean-field iterations
    crf_gaussian_sxy: float = 3.0  # positional kernel's standard deviation (pixels)
    crf_gaussian_compat: float = 3.0  # positional kernel's Potts weight
    crf_bilateral_sxy: float = 80.0  # bilateral kernel's spatial standard deviation (pixels)
    crf_bilateral_srgb: float = 13.0  # bilateral kernel's colour standard deviation (0..255 levels)
    crf_bilateral_compat: float = 10.0  # bilateral kernel's Potts weight
    crf_backend: str = "lattice"  # "lattice" (fast), "exact" (O(N^2), tiny images) or "pydensecrf2" (extra crf)
    guided_filter: str = "guided"  # "guided" (guided filter) or "joint_bilateral"
    guided_kernel: int = 15  # odd window side (pixels)
    guided_eps: float = 0.01  # guided filter's regulariser (guide in [0, 1])
    guided_sigma_color: float = 0.1  # joint bilateral colour width (guide in [0, 1])
    guided_sigma_space: float = 4.0  # joint bilateral spatial width (pixels)
    guided_subsample: int = 1  # fast guided filter's subsampling (1: exact)
    guided_border: str = "reflect"  # window padding at the border
    upsampler: str | None = None  # feature upsampler of each window's patch features ("loftup"), None: none
    upsampler_weights: str | None = None  # its checkpoint: a path, or None for the verified cache
    # Backbones: the backbone the block numbers, crop and stride were tuned on; on another backbone the
    # segmentor takes them from the per-backbone table (itaclip_core.backbones) unless adapt_backbone is false.
    tuned_on: str = "vit-b-16"
    adapt_backbone: bool = True

    def dense_config(self) -> "DenseConfig":
        """The image tower's dense readout for these settings."""
        from itaclip_core.attention.dense import DenseConfig  # torch is imported only when a model is built
        from itaclip_core.attention.variants import attention_class

        variant = attention_class(self.attention)  # unknown names: an error listing the registered ones
        return DenseConfig(
            variant=self.attention,
            fuse_blocks=tuple(self.fuse_blocks),
            fuse_variant=self.fuse_attention,
            fuse_weight=self.fuse_weight,
            last_residual=self.last_residual,
            last_mlp=self.last_mlp,
            variant_params=tuple((param, getattr(self, name)) for param, name in variant.settings.items()),
            attention_scale=self.attention_scale,
        )

    def replace(self, **changes: Any) -> "SegmentorConfig":
        """A copy with some fields changed (unknown field names raise)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(field_names())}")
        return dataclasses.replace(self, **changes)

    def validate(self) -> "SegmentorConfig":
        """Check every setting's range and the rules between settings (`itaclip_core.validation.validate_config`);
        returns self, raises `ConfigError`."""
        from itaclip_core.validation import validate_config

        return validate_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SegmentorConfig)]


def _itaclip(name: str, dataset: str, classes: str, background: bool, aux: str, aux_coef: float, short_side: int,
             logit_scale: float, prob_thd: float, area_thd: float | None, img_eng_coef: float) -> SegmentorConfig:
    return SegmentorConfig(
        name=name, method="itaclip", dataset=dataset, classes=f"class_names/itaclip/{classes}", background=background,
        aux_file=aux, aux_coef=aux_coef, short_side=short_side, stride=28, attention="selfself",
        fuse_blocks=(7, 8, 10), fuse_weight=0.5, last_mlp=False, image_engineering=True, img_eng_coef=img_eng_coef,
        pamr_steps=10, logit_scale=logit_scale, prob_thd=prob_thd, area_thd=area_thd, closing=True,
    )


def _sclip(name: str, dataset: str, classes: str, background: bool, short_side: int, logit_scale: float = 40.0,
           prob_thd: float = 0.0, area_thd: float | None = None) -> SegmentorConfig:
    return SegmentorConfig(
        name=name, method="sclip", dataset=dataset, classes=f"class_names/sclip/{classes}", background=background,
        short_side=short_side, stride=112, attention="selfself", fuse_blocks=(), last_mlp=True,
        image_engineering=False, pamr_steps=0, logit_scale=logit_scale, prob_thd=prob_thd, area_thd=area_thd,
        closing=False,
    )


from itaclip_core.methods.presets import zoo_a_presets  # noqa: E402 - needs SegmentorConfig

ZOO_A_PRESETS = zoo_a_presets(SegmentorConfig)  # NACLIP, ClearCLIP, ResCLIP

PRESETS: dict[str, SegmentorConfig] = {
    p.name: p
    for p in [
        _itaclip("itaclip_voc21", "voc21", "cls_voc21.txt", True, "definitions/voc21.txt", 0.05, 336, 60, 0.1, 0.1,
                 0.70),
        _itaclip("itaclip_context60", "context60", "cls_context60.txt", True, "definitions/context60.txt", 0.15, 336,
                 55, 0.1, None, 0.75),
        _itaclip("itaclip_coco_object", "coco_object", "cls_coco_object.txt", True, "synonyms/coco_object.txt", 0.10,
                 336, 50, 0.1, None, 0.75),
        _itaclip("itaclip_coco_stuff", "coco_stuff", "cls_coco_stuff.txt", False, "definitions/coco_stuff.txt", 0.20,
                 448, 40, 0.0, None, 0.75),
        _itaclip("itaclip_cityscapes", "cityscapes", "cls_cityscapes.txt", False, "synonyms/cityscapes.txt", 0.05,
                 560, 40, 0.0, None, 0.70),
        _sclip("sclip_voc21", "voc21", "cls_voc21.txt", True, 336, logit_scale=65, prob_thd=0.1, area_thd=0.1),
        _sclip("sclip_voc20", "voc20", "cls_voc20.txt", False, 336),
        _sclip("sclip_context60", "context60", "cls_context60.txt", True, 336, logit_scale=50, prob_thd=0.1),
        _sclip("sclip_context59", "context59", "cls_context59.txt", False, 336),
        _sclip("sclip_coco_object", "coco_object", "cls_coco_object.txt", True, 336, logit_scale=50, prob_thd=0.1),
        _sclip("sclip_coco_stuff", "coco_stuff", "cls_coco_stuff.txt", False, 448),
        _sclip("sclip_cityscapes", "cityscapes", "cls_city_scapes.txt", False, 560),
        _sclip("sclip_ade20k", "ade20k", "cls_ade20k.txt", False, 336),
        # Arbitrary user classes with ITACLIP's architecture and image engineering; no auxiliary text unless given.
        *ZOO_A_PRESETS,
        SegmentorConfig(name="open_vocab", method="itaclip", dataset=None, classes=None, background=False,
                        short_side=336, stride=28, img_eng_coef=0.75, logit_scale=40, prob_thd=0.0, area_thd=None),
    ]
}


# SC-CLIP and CLIPtrase: their presets live in their own module.
from itaclip_core.methods.scclip_cliptrase_presets import scclip_cliptrase_presets  # noqa: E402

PRESETS.update({p.name: p for group in scclip_cliptrase_presets(SegmentorConfig) for p in group})


def get_preset(name: str) -> SegmentorConfig:
    """The preset called `name`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def list_presets() -> list[str]:
    return list(PRESETS)


_NONE_WORDS = ("none", "null", "")


def _parse_value(raw: str, key: str) -> Any:
    """Convert `raw` to the type of the config field `key`."""
    text = raw.strip()
    hint = typing.get_type_hints(SegmentorConfig)[key]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() in _NONE_WORDS:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if typing.get_origin(hint) is tuple:
            if text.lower() in _NONE_WORDS:
                return ()
            item_type = typing.get_args(hint)[0]
            items = [v for v in text.replace(" ", "").split(",") if v]
            return tuple(int(v) for v in items) if item_type is int else tuple(items)
        return text
    except ValueError as error:
        raise ConfigError(f"{key}={raw}: cannot read {raw!r} for {key} ({error})",
                          cli=f"--set {key}={raw}: cannot read {raw!r} for {key} ({error})") from None


def apply_overrides(config: SegmentorConfig, overrides: Iterable[str] | dict[str, Any] | None) -> SegmentorConfig:
    """Apply `key=value` strings (or a dict) to a config; values are converted to each field's type."""
    if not overrides:
        return config
    if isinstance(overrides, dict):
        return config.replace(**overrides)
    changes: dict[str, Any] = {}
    names = field_names()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ConfigError(f"override {item!r}: expected key=value with key one of {', '.join(names)}",
                              cli=f"--set {item}: expected key=value with key one of {', '.join(names)}")
        changes[key] = _parse_value(value, key)
    return config.replace(**changes)



# Mask-guided methods (ProxyCLIP, CorrCLIP style): itaclip_core/masks/presets.py
from itaclip_core.masks.presets import MASK_PRESETS  # noqa: E402

PRESETS.update({preset.name: preset for preset in MASK_PRESETS})
def override_keys(overrides: Iterable[str] | dict[str, Any] | None) -> list[str]:
    """The field names a list of `key=value` overrides (or a dict) sets."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides)
    return [item.partition("=")[0].strip() for item in overrides]
