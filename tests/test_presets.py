"""Presets carry the published settings, and their files exist and agree with each other."""

from __future__ import annotations

import pytest

from itaclip_core.presets import PRESETS, apply_overrides, get_preset
from itaclip_core.segmentor import resolve_text_path
from itaclip_core.text.classes import check_aux_matches, read_aux_file, read_class_file

# (short side, logit scale, prob thd, area thd, image-engineering coef, aux kind, aux coef): ITACLIP's table.
ITACLIP = {
    "itaclip_coco_stuff": (448, 40, 0.0, None, 0.75, "definitions", 0.20),
    "itaclip_coco_object": (336, 50, 0.1, None, 0.75, "synonyms", 0.10),
    "itaclip_voc21": (336, 60, 0.1, 0.1, 0.70, "definitions", 0.05),
    "itaclip_context60": (336, 55, 0.1, None, 0.75, "definitions", 0.15),
    "itaclip_cityscapes": (560, 40, 0.0, None, 0.70, "synonyms", 0.05),
}
# (short side, logit scale, prob thd, area thd): SCLIP's settings.
SCLIP = {
    "sclip_voc21": (336, 65, 0.1, 0.1), "sclip_voc20": (336, 40, 0.0, None),
    "sclip_context60": (336, 50, 0.1, None), "sclip_context59": (336, 40, 0.0, None),
    "sclip_coco_object": (336, 50, 0.1, None), "sclip_coco_stuff": (448, 40, 0.0, None),
    "sclip_cityscapes": (560, 40, 0.0, None), "sclip_ade20k": (336, 40, 0.0, None),
}


@pytest.mark.parametrize("name", sorted(ITACLIP))
def test_itaclip_presets(name):
    c = get_preset(name)
    short, scale, prob, area, coef, kind, aux_coef = ITACLIP[name]
    assert (c.short_side, c.logit_scale, c.prob_thd, c.area_thd, c.img_eng_coef, c.aux_coef) == (
        short, scale, prob, area, coef, aux_coef)
    assert c.aux_file.startswith(kind + "/") and c.classes.startswith("class_names/itaclip/")
    assert (c.crop, c.stride, c.pamr_steps, c.pamr_dilations, c.closing, c.image_engineering) == (
        224, 28, 10, (8, 16), True, True)
    dense = c.dense_config()
    assert (dense.variant, dense.fuse_blocks, dense.fuse_weight, dense.last_residual, dense.last_mlp) == (
        "selfself", (7, 8, 10), 0.5, True, False)


@pytest.mark.parametrize("name", sorted(SCLIP))
def test_sclip_presets(name):
    c = get_preset(name)
    assert (c.short_side, c.logit_scale, c.prob_thd, c.area_thd) == SCLIP[name]
    assert (c.crop, c.stride, c.pamr_steps, c.closing, c.image_engineering, c.aux_file) == (
        224, 112, 0, False, False, None)
    dense = c.dense_config()
    assert (dense.variant, dense.fuse_blocks, dense.last_residual, dense.last_mlp) == ("selfself", (), True, True)
    assert c.classes.startswith("class_names/sclip/")


@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].classes])
def test_preset_files_exist_and_agree(name):
    c = get_preset(name)
    vocab = read_class_file(resolve_text_path(c.classes, "class file"), c.class_separator)
    expected = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
                "cityscapes": 19, "ade20k": 150}[c.dataset]
    assert vocab.num_classes == expected
    # Background first: SCLIP-style files lead with "sky", ClearCLIP's and CLIPtrase's with the word "background".
    assert (vocab.class_names[0] in ("sky", "background") or not c.background) or c.dataset != "voc21"
    if c.aux_file:
        aux = read_aux_file(resolve_text_path(c.aux_file, "aux file"))
        check_aux_matches(aux, vocab, c.background, c.aux_file, strict_names=True)


def test_overrides_are_typed_and_checked():
    c = apply_overrides(get_preset("itaclip_voc21"), ["stride=56", "area_thd=none", "fuse_blocks=8,9",
                                                       "closing=false", "aux_file=none", "logit_scale=50"])
    assert (c.stride, c.area_thd, c.fuse_blocks, c.closing, c.aux_file, c.logit_scale) == (
        56, None, (8, 9), False, None, 50.0)
    with pytest.raises(ValueError, match="expected key=value with key one of"):
        apply_overrides(c, ["strid=3"])
    with pytest.raises(ValueError, match="cannot read 'x' for stride"):
        apply_overrides(c, ["stride=x"])
    with pytest.raises(ValueError, match="cannot read 'maybe' for closing"):
        apply_overrides(c, ["closing=maybe"])
    with pytest.raises(ValueError, match="unknown preset 'voc'"):
        get_preset("voc")
