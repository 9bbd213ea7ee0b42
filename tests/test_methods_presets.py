"""SC-CLIP and CLIPtrase presets: the published settings, every preset from the API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from itaclip_core.cli import main
from itaclip_core.methods.scclip_cliptrase_presets import CLIPTRASE_PRESETS, SCCLIP_PRESETS
from itaclip_core.presets import PRESETS, apply_overrides, get_preset
from itaclip_core.segmentor import Segmentor, resolve_text_path
from itaclip_core.text.classes import read_class_file

# SC-CLIP's configs: (short side, logit scale, prob_thd, area_thd).
SCCLIP = {
    "scclip_voc21": (336, 50, 0.15, 0.1), "scclip_voc20": (336, 40, 0.0, None),
    "scclip_context60": (336, 40, 0.15, None), "scclip_context59": (336, 40, 0.0, None),
    "scclip_coco_object": (336, 55, 0.35, None), "scclip_coco_stuff": (336, 40, 0.0, None),
    "scclip_cityscapes": (560, 40, 0.0, None), "scclip_ade20k": (336, 40, 0.0, None),
}
FAST = ["templates=notebooks/ci_templates.txt"]  # two templates: the text tower is not what is tested here


def test_every_benchmark_preset_is_registered():
    assert {p.name for p in SCCLIP_PRESETS} == set(SCCLIP)
    datasets = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "ade20k")
    assert {p.name for p in CLIPTRASE_PRESETS} == {f"cliptrase_{d}{s}" for d in datasets for s in ("", "_224")}
    assert all(p.name in PRESETS for p in SCCLIP_PRESETS + CLIPTRASE_PRESETS)


@pytest.mark.parametrize("name", sorted(SCCLIP))
def test_scclip_presets_carry_the_published_settings(name):
    c = get_preset(name)
    assert (c.short_side, c.logit_scale, c.prob_thd, c.area_thd) == SCCLIP[name]
    assert (c.readout, c.crop, c.stride, c.pamr_steps, c.image_engineering, c.closing, c.protocol) == (
        "scclip", 224, 112, 0, False, False, "standard")
    assert (c.scclip_detector, c.scclip_blocks, c.scclip_res_cls) == ("lof", (9, 4, 4, 10), 0.3)
    assert c.classes.startswith("class_names/scclip/")


@pytest.mark.parametrize("preset", CLIPTRASE_PRESETS, ids=lambda p: p.name)
def test_cliptrase_presets_carry_the_script_settings(preset):
    size = 224 if preset.name.endswith("_224") else 336
    expected = {336: (1.1, 7), 224: (0.7, 3)}[size]
    assert (preset.crop, preset.cliptrase_eps, preset.cliptrase_min_samples) == (size, *expected)
    assert (preset.readout, preset.protocol, preset.prob_thd, preset.area_thd, preset.pamr_steps) == (
        "cliptrase", "centre_crop", 0.0, None, 0)
    assert preset.cliptrase_cls_weighting == (preset.dataset == "voc20")
    vocab = read_class_file(resolve_text_path(preset.classes, "class file"))
    # Background benchmarks: class 0 holds the script's background words (VOC21: 33 of them, COCO-Object 107).
    first_background_word = {"voc21": ("background", 33), "context60": ("background", 1),
                             "coco_object": ("textile", 107)}
    assert preset.background == (preset.dataset in first_background_word)
    if preset.background:
        assert (vocab.variants[0][0], len(vocab.variants[0])) == first_background_word[preset.dataset]


@pytest.mark.parametrize("name", [p.name for p in SCCLIP_PRESETS + CLIPTRASE_PRESETS])
def test_every_preset_runs_from_the_api(name, tiny_clip):
    segmentor = Segmentor(tiny_clip, apply_overrides(get_preset(name), FAST), cache_dir=None)
    image = np.random.default_rng(0).integers(0, 255, (120, 150, 3), dtype=np.uint8)
    prediction = segmentor.predict(image)
    size = (120, 150) if name.startswith("scclip") else (segmentor.config.crop,) * 2
    assert prediction.labels.shape == size and prediction.probs.shape == (segmentor.num_classes, *size)
    assert np.isfinite(prediction.probs).all() and prediction.labels.max() < segmentor.num_classes


@pytest.mark.parametrize("preset,size", [("scclip_voc21", (90, 120)), ("cliptrase_voc21", (336, 336)),
                                         ("cliptrase_voc20_224", (224, 224))])
def test_presets_run_from_the_cli(preset, size, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    code = main(["segment", str(image), "--preset", preset, "--weights", "random-tiny", "--out", str(out),
                 "--set", FAST[0], "--save-npz", "--no-progress"])
    assert code == 0
    labels = np.asarray(Image.open(out / "img_labels.png"))
    assert labels.shape == size
    areas = json.loads((out / "img_areas.json").read_text())
    assert sum(c["pixels"] for c in areas["classes"].values()) == size[0] * size[1]
    assert Image.open(out / "img_overlay.png").size[1] >= size[0]


def test_standard_protocol_from_the_cli(tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["segment", str(image), "--preset", "cliptrase_voc21_224", "--weights", "random-tiny", "--out",
                 str(out), "--set", FAST[0], "--set", "protocol=standard", "--no-progress"]) == 0
    assert np.asarray(Image.open(out / "img_labels.png")).shape == (90, 120)


def test_a_bad_setting_is_reported_without_output(tmp_path, capsys):
    out = tmp_path / "out"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["segment", str(tmp_path / "x.png"), "--preset", "scclip_voc21", "--weights", "random-tiny",
                 "--out", str(out), "--set", "scclip_detector=iforest", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "scclip_detector must be one of lof, l2norm" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ beyond the golden case
@pytest.fixture(scope="module")
def random_clip():
    from itaclip_core import load_clip

    return load_clip("random-tiny:11", device="cpu")


@pytest.fixture(scope="module")
def blocky_image():
    rng = np.random.default_rng(5)
    big = np.kron(rng.random((6, 8, 3)), np.ones((32, 32, 1)))[:190, :250]
    return np.clip(200 * big + rng.integers(0, 50, big.shape), 0, 255).astype(np.uint8)


GENERAL = [
    ("scclip_context60", ["short_side=200", "crop=112", "stride=64", "batch_size=3"]),
    ("scclip_voc21", ["short_side=180", "scclip_detector=l2norm", "scclip_blocks=8,3,2,9", "scclip_res_cls=0.5"]),
    ("scclip_coco_object", ["short_side=200", "crop=160", "stride=96", "refine=selfcorr,regional"]),
    ("cliptrase_voc21_224", ["protocol=standard", "short_side=200", "crop=112", "stride=64", "batch_size=2",
                             "cliptrase_eps=0.5", "cliptrase_min_samples=2"]),
    ("cliptrase_voc20", ["crop=160", "cliptrase_eps=0.6", "cliptrase_min_samples=3"]),
    ("cliptrase_context59_224", ["protocol=standard", "short_side=180", "refine=selfcorr", "cliptrase_eps=0.5"]),
    ("scclip_voc20", ["crop=0", "short_side=150"]),  # whole image, non-square grid
]


@pytest.mark.parametrize("preset,overrides", GENERAL, ids=[f"{c[0]}-{i}" for i, c in enumerate(GENERAL)])
def test_batched_engine_equals_the_straightforward_route(random_clip, blocky_image, preset, overrides):
    from itaclip_core.methods import straightforward

    config = apply_overrides(get_preset(preset), overrides)
    segmentor = Segmentor(random_clip, config, classes=["sky", "tree, forest", "road", "dog", "person"],
                          cache_dir=None)
    prepared = segmentor.prepare(blocky_image)
    prediction = segmentor.predict_prepared(prepared)
    probs, labels = straightforward.predict(random_clip, prepared.tensor, prepared.original_size,
                                            segmentor.classifier, segmentor.config)  # own classes: no thresholds
    assert np.abs(prediction.probs - probs.numpy()).max() < 1e-4
    assert (prediction.labels == labels).mean() >= 0.9999
    if config.readout == "cliptrase":  # the vote acted, so the equality above covers it
        assert (prediction.labels != prediction.probs.argmax(axis=0)).mean() > 0.01
