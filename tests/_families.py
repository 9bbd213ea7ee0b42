"""One preset per method family, with the overrides it needs to run without downloads (tiny random weights):
mask-guided presets take superpixel masks and a random-tiny proxy model. Shared by the tests that run every
method (on every backbone, with every refinement)."""

from __future__ import annotations

from itaclip_core.presets import SegmentorConfig, get_preset

TEMPLATES = "notebooks/ci_templates.txt"
FAMILIES = {
    "itaclip_context60": {},
    "sclip_voc20": {},
    "naclip_context59": {},
    "clearclip_cityscapes": {},
    "resclip_context59": {},
    "scclip_voc20": {},
    "cliptrase_voc20_224": {},
    "proxyclip_voc20": {"proxy_checkpoint": "random-tiny"},
    "corrclip_style_voc20": {"masks": "superpixels", "mask_generator": None, "mask_model": None,
                             "mask_correlation": "clip", "mask_cache": False},
}


def family_config(preset: str) -> SegmentorConfig:
    """The preset with short side 112, stride = crop (one or two windows), the CI templates and its overrides."""
    tuned = get_preset(preset)
    return tuned.replace(short_side=112, stride=tuned.crop, templates=TEMPLATES, **FAMILIES[preset])
