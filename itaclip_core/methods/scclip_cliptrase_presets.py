"""Presets of SC-CLIP and CLIPtrase, one per benchmark each method publishes, from their official code.

SC-CLIP (`scclip_<dataset>`, configs of SuleBai/SC-CLIP at 0417ba9): SCLIP's protocol (crop 224, stride 112, no
PAMR, no image engineering, no closing, SCLIP's class files), short side 336 (Cityscapes 560), logit scale 40 unless
noted, the HEAD's LOF detector (`--set scclip_detector=l2norm` gives the first release's top-10-norm detector).

CLIPtrase (`cliptrase_<dataset>`: n = 336, DBSCAN eps 1.1, min 7; `cliptrase_<dataset>_224`: n = 224, eps 0.7,
min 3; leaves162/CLIPtrase at 2b7de61): the script's centre-crop protocol (short side to n, n x n centre crop, one
window; probabilities and labels are at the crop), its label lists with the background words as class 0 on the
background benchmarks (VOC21, Context60, COCO-Object), the class token's scores multiplied in on VOC20 only, no
thresholds. Probabilities are softmax(100 x similarity), 100 being OpenAI ViT-B/16's exp(logit_scale), the factor the
script applies. `--set protocol=standard` runs the same method with the sliding window of the other methods: short
side 336, window n, stride n / 2.

Other backbones (`itaclip_core.backbones`):
- SC-CLIP publishes its ViT-L/14 setting (configs/base_config.py's commented ViT-L/14 block, confirmed in issue
  #5): `pre_adjust_idx=16, post_adjust_idx=6, multi_start_idx=8, multi_end_idx=19, res_cls=0.1`, i.e.
  `scclip_blocks = (17, 7, 9, 19)` (the indices are 0-based, the multi-level end exclusive) and `scclip_res_cls =
  0.1`, with the dataset configs' crop 224 / stride 112 unchanged; registered as published. Its per-dataset
  ViT-L/14 thresholds (VOC21 `prob_thd` 0.2, COCO-Object 0.25) are not in the per-method table: set them with
  `--set prob_thd=...`. Other depths (ViT-H/14 etc.): each of the four blocks at the same relative depth (rule).
- CLIPtrase has no block number to fit: its correlation is block L-1's and its attention block L's on any depth;
  the crop n keeps its size in patches (rule), so that DBSCAN's eps and min_samples see the same grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from itaclip_core.backbones import register_method_rules, register_published, relative_block_each

register_method_rules("scclip", {"scclip_blocks": relative_block_each})
register_published("scclip", "vit-l-14", {"scclip_blocks": (17, 7, 9, 19), "scclip_res_cls": 0.1, "crop": 224,
                                          "stride": 112},
                   source="SuleBai/SC-CLIP configs/base_config.py, ViT-L/14 block; issue #5")

if TYPE_CHECKING:  # pragma: no cover
    from itaclip_core.presets import SegmentorConfig

# dataset -> (class file, background, short side, logit scale, prob_thd, area_thd); SC-CLIP's configs.
_SCCLIP = {
    "voc21": ("cls_voc21.txt", True, 336, 50.0, 0.15, 0.1),
    "voc20": ("cls_voc20.txt", False, 336, 40.0, 0.0, None),
    "context60": ("cls_context60.txt", True, 336, 40.0, 0.15, None),
    "context59": ("cls_context59.txt", False, 336, 40.0, 0.0, None),
    "coco_object": ("cls_coco_object.txt", True, 336, 55.0, 0.35, None),
    "coco_stuff": ("cls_coco_stuff.txt", False, 336, 40.0, 0.0, None),
    "cityscapes": ("cls_city_scapes.txt", False, 560, 40.0, 0.0, None),
    "ade20k": ("cls_ade20k.txt", False, 336, 40.0, 0.0, None),
}

# dataset -> background; CLIPtrase's script evaluates these (no Cityscapes).
_CLIPTRASE = {"voc21": True, "voc20": False, "context60": True, "context59": False, "coco_object": True,
              "coco_stuff": False, "ade20k": False}
# n -> (eps, min_samples), the two settings the script runs.
CLIPTRASE_SIZES = {336: (1.1, 7), 224: (0.7, 3)}


def _scclip(dataset: str, config_class: type["SegmentorConfig"]) -> "SegmentorConfig":
    classes, background, short_side, logit_scale, prob_thd, area_thd = _SCCLIP[dataset]
    return config_class(
        name=f"scclip_{dataset}", method="scclip", readout="scclip", dataset=dataset, classes=f"class_names/scclip/{classes}",
        background=background, short_side=short_side, crop=224, stride=112, attention="selfself", fuse_blocks=(),
        last_residual=False, last_mlp=False, image_engineering=False, pamr_steps=0, logit_scale=logit_scale,
        prob_thd=prob_thd, area_thd=area_thd, closing=False,
    )


def _cliptrase(dataset: str, size: int, config_class: type["SegmentorConfig"]) -> "SegmentorConfig":
    eps, min_samples = CLIPTRASE_SIZES[size]
    suffix = "" if size == 336 else f"_{size}"
    return config_class(
        name=f"cliptrase_{dataset}{suffix}", method="cliptrase", readout="cliptrase", dataset=dataset,
        classes=f"class_names/cliptrase/cls_{dataset}.txt", background=_CLIPTRASE[dataset], short_side=336,
        crop=size, stride=size // 2, attention="selfself", fuse_blocks=(), last_residual=True, last_mlp=True,
        image_engineering=False, pamr_steps=0, logit_scale=100.0, prob_thd=0.0, area_thd=None, closing=False,
        cliptrase_eps=eps, cliptrase_min_samples=min_samples, cliptrase_cls_weighting=dataset == "voc20",
        protocol="centre_crop",
    )


def scclip_cliptrase_presets(
    config_class: type["SegmentorConfig"],
) -> tuple[list["SegmentorConfig"], list["SegmentorConfig"]]:
    """The SC-CLIP and the CLIPtrase presets (`itaclip_core.presets` passes its `SegmentorConfig`, which this module
    cannot import at its top without a cycle)."""
    scclip = [_scclip(dataset, config_class) for dataset in _SCCLIP]
    cliptrase = [_cliptrase(dataset, size, config_class) for dataset in _CLIPTRASE for size in (336, 224)]
    return scclip, cliptrase


def __getattr__(name: str) -> Any:  # SCCLIP_PRESETS, CLIPTRASE_PRESETS: the registered presets
    if name in ("SCCLIP_PRESETS", "CLIPTRASE_PRESETS"):
        from itaclip_core.presets import PRESETS

        prefix = "scclip_" if name == "SCCLIP_PRESETS" else "cliptrase_"
        return [preset for key, preset in PRESETS.items() if key.startswith(prefix)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
