"""Presets of the mask-guided methods, added to `itaclip_core.presets.PRESETS`.

- `proxyclip_<dataset>`: ProxyCLIP (OpenAI ViT-B/16 with DINO ViT-B/8 as the proxy): proxy attention with beta 1.2
  and gamma 3.0, crop 336 and stride 112 (Cityscapes: crop 224), short side 336 (448 for ADE20K, COCO-Stuff and
  Cityscapes), logit scale 40, probability thresholds 0.2 (VOC21), 0.15 (Context60), 0.25 (COCO-Object); no image
  engineering, PAMR or closing. Class names: SCLIP's files (ProxyCLIP ships its own, which are not in texts/).
  COCO-Stuff uses 448 as SCLIP does (neither ProxyCLIP's nor CorrCLIP's value for it is recorded here).
- `corrclip_style_<dataset>`: CorrCLIP's recipe on OpenAI CLIP: SAM 2.0 Hiera-L masks generated on the fly with
  CorrCLIP's settings (8 points per side, IoU and stability 0.4, one mask per point, no SAM 2 post-processing),
  painted large-on-top, mask-scoped attention with DINO ViT-B/8 correlation (tau 4), the spatial and per-mask
  class-token branches (weights 1.0 and 0.5), and the final majority vote inside every mask after the probability
  threshold (0.2 VOC21, 0.15 Context60); crop 336 / stride 112 (Cityscapes 224), short side 336 (448 ADE20K and
  Cityscapes). The published CorrCLIP runs on MetaCLIP weights, and its DBSCAN merging of masks is not
  reproduced, hence "style": its numbers are not expected from these presets.
"""

from __future__ import annotations

from itaclip_core.presets import SegmentorConfig

# dataset -> (class file, background, short side, crop, ProxyCLIP prob_thd, CorrCLIP prob_thd)
_DATASETS = {
    "voc21": ("cls_voc21.txt", True, 336, 336, 0.2, 0.2),
    "context60": ("cls_context60.txt", True, 336, 336, 0.15, 0.15),
    "coco_object": ("cls_coco_object.txt", True, 336, 336, 0.25, 0.0),
    "voc20": ("cls_voc20.txt", False, 336, 336, 0.0, 0.0),
    "context59": ("cls_context59.txt", False, 336, 336, 0.0, 0.0),
    "coco_stuff": ("cls_coco_stuff.txt", False, 448, 336, 0.0, 0.0),
    "cityscapes": ("cls_city_scapes.txt", False, 448, 224, 0.0, 0.0),
    "ade20k": ("cls_ade20k.txt", False, 448, 336, 0.0, 0.0),
}


def _base(name: str, method: str, dataset: str, prob_thd: float) -> SegmentorConfig:
    classes, background, short_side, crop, _, _ = _DATASETS[dataset]
    return SegmentorConfig(
        name=name, method=method, dataset=dataset, classes=f"class_names/sclip/{classes}", background=background,
        short_side=short_side, crop=crop, stride=112, attention="qk", fuse_blocks=(), last_residual=False,
        last_mlp=False, image_engineering=False, pamr_steps=0, logit_scale=40.0, prob_thd=prob_thd, closing=False,
    )


MASK_PRESETS: list[SegmentorConfig] = []
for _dataset, (_, _, _, _, _proxy_thd, _corr_thd) in _DATASETS.items():
    MASK_PRESETS.append(_base(f"proxyclip_{_dataset}", "proxyclip", _dataset, _proxy_thd).replace(
        mask_use="proxy", proxy_model="dino_vitb8", proxy_beta=1.2, proxy_gamma=3.0))
    MASK_PRESETS.append(_base(f"corrclip_style_{_dataset}", "corrclip_style", _dataset, _corr_thd).replace(
        masks="sam2", mask_model="sam2_hiera_l", mask_generator="corrclip_8", mask_order="large_on_top",
        mask_use="attention", mask_correlation="dino", proxy_model="dino_vitb8", mask_tau=4.0,
        mask_spatial_weight=1.0, mask_semantic_weight=0.5, mask_final_vote=True, mask_vote="mode"))
