"""Presets of NACLIP, ClearCLIP and ResCLIP, one per benchmark each publishes, with their official settings.

Read from each method's official configs (see `docs/methods_clip_only.md`):

- **NACLIP** (`naclip_<dataset>`, sinahmr/NACLIP v2, `test_all.sh reduced naclip 5 on`): last block with key-key
  attention plus the Gaussian neighbourhood bias (sigma 5 patches), no residual, no MLP; PAMR 10 steps with
  dilations 8 and 16 on the cosine logits at the original size; logit scale 40; VOC21 and VOC20 on the whole image
  (`crop=0`), the others crop 224 / stride 112; short side 336 (Cityscapes 560); no area threshold; the class
  probabilities are renormalised after the thresholds. SCLIP's class files (identical).
- **ClearCLIP** (`clearclip_<dataset>`, mc-lan/ClearCLIP): last block with query-query attention, no residual, no
  MLP, no PAMR; short side 448, crop 448 / stride 224 (Cityscapes crop 224 / stride 224); logit scale 50; its own
  probability thresholds; its own VOC21, VOC20 and COCO-Object class files (one name per line, split on `,`), the
  others identical to SCLIP's; windows whose size is not a multiple of the patch are zero-padded evenly and their
  logits cropped back (`pad_to_patch`). The shipped base config says `model_type='vanilla'` (query-key attention): the
  presets follow the paper and the demo (`ClearCLIP`); `--set attention=qk` runs the shipped default.
- **ResCLIP** (`resclip_<dataset>`, yvhangyang/ResCLIP, `test_all.sh wo_resi resclip 5`): NACLIP's attention with
  RCS (blocks 6-9, per-dataset [tau, lambda]) and SFR (per-dataset [tau, lambda] and `temp_thd`), both always on as
  in the official code; the SFR matrix cast to float16 as the official code does (`sfr_affinity_dtype=model`
  keeps the model's dtype); logit scale 40, no final PAMR, VOC21/VOC20 on the whole image; renormalised
  probabilities; SCLIP's class files.

RCS [tau, lambda] map to `attention_scale = tau` and `fuse_weight = 1 - lambda` on `fuse_blocks = (6, 7, 8, 9)`.

Other backbones (`itaclip_core.backbones`): crop and stride keep their size in patches (crop 0, the whole image,
stays 0). ResCLIP's RCS blocks (`fuse_blocks`) on ViT-L/14 are the official code's, blocks 6-9 (it hard-codes them
for every backbone, and its base config offers ViT-L/14), registered as published; on other depths (ViT-H/14 etc.)
the same relative depth (rule, not published). Its SFR settings are in patches or pixels of the image
(`sfr_sigma`, `sfr_pamr_dilations`) and need no change. NACLIP and ClearCLIP change the last block only: no block
numbers to fit.
"""

from __future__ import annotations

from typing import Any

from itaclip_core.backbones import register_method_rules, register_published, relative_blocks

# dataset -> (class file, background)
_DATASETS: dict[str, tuple[str, bool]] = {
    "voc21": ("cls_voc21.txt", True),
    "voc20": ("cls_voc20.txt", False),
    "context60": ("cls_context60.txt", True),
    "context59": ("cls_context59.txt", False),
    "coco_object": ("cls_coco_object.txt", True),
    "coco_stuff": ("cls_coco_stuff.txt", False),
    "cityscapes": ("cls_city_scapes.txt", False),
    "ade20k": ("cls_ade20k.txt", False),
}

# Settings common to the three methods (no image engineering, no closing, no area threshold).
_COMMON: dict[str, Any] = dict(image_engineering=False, closing=False, area_thd=None, fuse_blocks=(),
                               last_residual=False, last_mlp=False)

# NACLIP: dataset -> (short side, crop, stride, prob_thd); crop 0 = whole image.
_NACLIP = {
    "voc21": (336, 0, 112, 0.1), "voc20": (336, 0, 112, 0.0), "context60": (336, 224, 112, 0.1),
    "context59": (336, 224, 112, 0.0), "coco_object": (336, 224, 112, 0.1), "coco_stuff": (336, 224, 112, 0.0),
    "cityscapes": (560, 224, 112, 0.0), "ade20k": (336, 224, 112, 0.0),
}

# ClearCLIP: dataset -> (crop, stride, prob_thd); short side 448 everywhere.
_CLEARCLIP = {
    "voc21": (448, 224, 0.5), "voc20": (448, 224, 0.0), "context60": (448, 224, 0.15), "context59": (448, 224, 0.0),
    "coco_object": (448, 224, 0.4), "coco_stuff": (448, 224, 0.0), "cityscapes": (224, 224, 0.0),
    "ade20k": (448, 224, 0.0),
}
_CLEARCLIP_OWN_FILES = ("voc21", "voc20", "coco_object")

# ResCLIP: dataset -> (short side, crop, prob_thd, temp_thd, RCS (tau, lambda), SFR (tau, lambda)).
_RESCLIP = {
    "voc21": (336, 0, 0.1, 0.50, (2.0, 0.3), (2.2, 0.7)),
    "voc20": (336, 0, 0.0, 0.10, (2.0, 0.6), (2.1, 0.6)),
    "context60": (336, 224, 0.1, 0.30, (2.0, 0.3), (1.8, 0.7)),
    "context59": (336, 224, 0.0, 0.25, (2.0, 0.4), (1.8, 0.7)),
    "coco_object": (336, 224, 0.1, 0.11, (2.0, 0.4), (1.8, 0.7)),
    "coco_stuff": (336, 224, 0.0, 0.11, (2.0, 0.4), (1.8, 0.7)),
    "cityscapes": (560, 224, 0.0, 0.10, (2.0, 0.2), (2.1, 0.6)),
    "ade20k": (336, 224, 0.0, 0.25, (2.0, 0.3), (2.1, 0.7)),
}
RCS_BLOCKS = (6, 7, 8, 9)  # 1-based, of a 12-block tower

register_method_rules("resclip", {"fuse_blocks": relative_blocks})
register_published("resclip", "vit-l-14", {"fuse_blocks": RCS_BLOCKS},
                   source="yvhangyang/ResCLIP clip/model.py: RCS blocks 6-9 hard-coded for every backbone")


def zoo_a_presets(config_class: type) -> list:
    """The NACLIP, ClearCLIP and ResCLIP presets as `config_class` (SegmentorConfig) instances."""
    presets = []
    for dataset, (short, crop, stride, prob_thd) in _NACLIP.items():
        classes, background = _DATASETS[dataset]
        presets.append(config_class(
            name=f"naclip_{dataset}", method="naclip", dataset=dataset, classes=f"class_names/sclip/{classes}",
            background=background, short_side=short, crop=crop, stride=stride, attention="naclip",
            neighbourhood_sigma=5.0, pamr_steps=10, pamr_dilations=(8, 16), logit_scale=40.0, prob_thd=prob_thd,
            renormalize=True, **_COMMON))
    for dataset, (crop, stride, prob_thd) in _CLEARCLIP.items():
        classes, background = _DATASETS[dataset]
        folder = "clearclip" if dataset in _CLEARCLIP_OWN_FILES else "sclip"
        presets.append(config_class(
            name=f"clearclip_{dataset}", method="clearclip", dataset=dataset,
            classes=f"class_names/{folder}/{classes}", class_separator=",", background=background, short_side=448,
            crop=crop, stride=stride, attention="qq", pamr_steps=0, logit_scale=50.0, prob_thd=prob_thd,
            pad_to_patch=True, **_COMMON))
    for dataset, (short, crop, prob_thd, temp_thd, rcs, sfr) in _RESCLIP.items():
        classes, background = _DATASETS[dataset]
        common = dict(_COMMON, fuse_blocks=RCS_BLOCKS)
        presets.append(config_class(
            name=f"resclip_{dataset}", method="resclip", dataset=dataset, classes=f"class_names/sclip/{classes}",
            background=background, short_side=short, crop=crop, stride=112, readout="resclip", attention="resclip",
            fuse_attention="qk", fuse_weight=1.0 - rcs[1], attention_scale=rcs[0], neighbourhood_sigma=5.0,
            sfr_tau=sfr[0], sfr_lambda=sfr[1], sfr_temp_thd=temp_thd, sfr_sigma=5.0, sfr_delete_same_entity=True,
            sfr_affinity_dtype="float16", pamr_steps=0, logit_scale=40.0, prob_thd=prob_thd, renormalize=True,
            **common))
    return presets
