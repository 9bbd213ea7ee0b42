"""NACLIP, ClearCLIP and ResCLIP beyond the golden case: other weights, sizes, windows, batches and settings,
against the straightforward per-window route; options and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itaclip_core import load_clip
from itaclip_core.methods import get_readout, straightforward
from itaclip_core.presets import PRESETS, apply_overrides, get_preset
from itaclip_core.segmentor import Segmentor


@pytest.fixture(scope="module")
def random_clip():
    return load_clip("random-tiny:7", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    smooth = rng.random((6, 8, 3))
    big = np.kron(smooth, np.ones((32, 32, 1)))[:190, :250]  # blocky, so labels form regions
    # plus noise: PAMR divides by the local colour spread, which flat regions would make 0 (a rounding knife edge)
    return np.clip(200 * big + rng.integers(0, 50, big.shape), 0, 255).astype(np.uint8)


CASES = [
    ("naclip_context60", ["short_side=200", "crop=112", "stride=64", "batch_size=2"]),
    ("naclip_voc20", ["short_side=180"]),  # whole image, non-square grid
    ("clearclip_voc21", ["short_side=200", "crop=144", "stride=96", "batch_size=3"]),
    ("clearclip_context60", ["short_side=200", "crop=150", "stride=100"]),  # windows padded to a patch multiple
    ("clearclip_voc20", ["short_side=170", "crop=0"]),  # the whole 170x223 image padded
    ("resclip_coco_object", ["short_side=200", "crop=112", "stride=64", "batch_size=3", "sfr_temp_thd=0.0"]),
    ("resclip_voc21", ["short_side=190", "sfr_temp_thd=0.0", "sfr_affinity_dtype=model"]),
    ("naclip_voc21", ["short_side=160", "refine=selfcorr,regional,sfr", "sfr_temp_thd=0.0"]),
]


@pytest.mark.parametrize("preset,overrides", CASES, ids=[c[0] + "-" + str(i) for i, c in enumerate(CASES)])
def test_batched_engine_equals_the_straightforward_route(random_clip, image, preset, overrides):
    config = apply_overrides(get_preset(preset), overrides)
    segmentor = Segmentor(random_clip, config, classes=["sky", "tree, forest", "road", "dog", "person"],
                          cache_dir=None)
    prepared = segmentor.prepare(image)
    prediction = segmentor.predict_prepared(prepared)
    probs, labels = straightforward.predict(random_clip, prepared.tensor, prepared.original_size,
                                            segmentor.classifier, segmentor.config)  # own classes: no thresholds
    assert np.abs(prediction.probs - probs.numpy()).max() < 1e-4
    assert (prediction.labels == labels).mean() >= 0.9999
    if config.renormalize:
        assert np.allclose(prediction.probs.sum(axis=0), 1.0, atol=1e-5)


def test_resclip_sfr_is_not_trivial_on_this_image(random_clip, image):
    """The case above would hide a broken SFR if every patch had one label: check that they do not."""
    from itaclip_core.attention import last_block, run_trunk
    from itaclip_core.methods.resclip import first_pass_labels

    config = apply_overrides(get_preset("resclip_voc21"), ["short_side=190", "sfr_temp_thd=0.0"])
    segmentor = Segmentor(random_clip, config, classes=["sky", "tree, forest", "road", "dog", "person"],
                          cache_dir=None)
    tensor = segmentor.prepare(image).tensor[None]
    readout = segmentor.engine.readout
    with torch.no_grad():
        state = run_trunk(random_clip.visual, tensor, readout.dense)
        first = torch.nn.functional.normalize(last_block(random_clip.visual, state, readout.dense)[:, 1:], dim=-1)
        rows, cols = random_clip.visual.grid_size(*tensor.shape[-2:])
        logits = (first @ segmentor.classifier.features.T).permute(0, 2, 1).reshape(1, -1, rows, cols)
        _, labels = first_pass_labels(logits, tensor, 16, config.logit_scale, 0.0)
    assert len(labels.unique()) > 1


def test_official_code_options_change_the_output(tiny_clip, golden_forward):
    from itaclip_core.attention import dense_tokens

    images = golden_forward["image_224"][:1]
    shipped = get_preset("clearclip_voc21").replace(attention="qk")  # ClearCLIP's shipped `vanilla` default
    paper = get_preset("clearclip_voc21")
    with torch.no_grad():
        a = dense_tokens(tiny_clip.visual, images, paper.dense_config())
        b = dense_tokens(tiny_clip.visual, images, shipped.dense_config())
    assert not torch.allclose(a, b, atol=1e-3)
    text = torch.nn.functional.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    fp16 = get_readout(get_preset("resclip_voc20").replace(sfr_temp_thd=0.0))
    model = get_readout(get_preset("resclip_voc20").replace(sfr_temp_thd=0.0, sfr_affinity_dtype="model"))
    with torch.no_grad():
        x = fp16.patch_tokens(tiny_clip.visual, images, text)
        y = model.patch_tokens(tiny_clip.visual, images, text)
    assert 0 < (x - y).abs().max().item() < 1e-2  # the float16 cast is a small but real difference


@pytest.mark.parametrize("overrides,message", [
    (["readout=nope"], "readout='nope': unknown dense readout; registered: .*resclip.*tokens"),
    (["attention=nope"], "attention='nope' is not a known attention variant; choose one of .*naclip.*resclip"),
    (["sfr_affinity_dtype=half"], "sfr_affinity_dtype='half': allowed float16, model"),
    (["attention=naclip"], "attention='naclip' does not fit readout=resclip.*allowed: attention=resclip"),
    (["sfr_lambda=1.5"], "sfr_lambda=1.5: must be in \\[0, 1\\]"),
    (["neighbourhood_sigma=0"], "neighbourhood_sigma must be > 0"),
])
def test_bad_method_settings_are_refused_before_any_work(tiny_clip, overrides, message):
    config = apply_overrides(get_preset("resclip_voc21"), overrides)
    with pytest.raises(ValueError, match=message):
        Segmentor(tiny_clip, config, cache_dir=None)  # refused when built, before any text or image work


def test_every_zoo_a_preset_has_its_class_file_and_published_settings():
    from itaclip_core.segmentor import resolve_text_path
    from itaclip_core.text.classes import read_class_file

    names = [n for n in PRESETS if n.split("_")[0] in ("naclip", "clearclip", "resclip")]
    assert len(names) == 24
    for name in names:
        config = PRESETS[name]
        vocab = read_class_file(resolve_text_path(config.classes, "class file"), config.class_separator)
        assert vocab.num_classes == {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81,
                                     "coco_stuff": 171, "cityscapes": 19, "ade20k": 150}[config.dataset]
        get_readout(config)
    assert get_preset("naclip_voc21").crop == 0 and get_preset("naclip_context60").crop == 224
    assert get_preset("clearclip_cityscapes").crop == 224 and get_preset("clearclip_ade20k").crop == 448
    rc = get_preset("resclip_voc20")
    assert (rc.attention_scale, 1 - rc.fuse_weight, rc.sfr_tau, rc.sfr_lambda, rc.sfr_temp_thd) == \
        pytest.approx((2.0, 0.6, 2.1, 0.6, 0.1))


@pytest.mark.parametrize("preset", ["naclip_voc21", "clearclip_context60", "resclip_cityscapes"])
def test_presets_run_from_the_cli_and_the_api(preset, tmp_path):
    import json

    from PIL import Image

    from itaclip_core.cli import main

    path = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    small = ["--set", "short_side=64", "--set", "crop=0" if preset.startswith("naclip") else "crop=32",
             "--set", "stride=32", "--no-progress"]
    out = tmp_path / "out"
    assert main(["segment", str(path), "--preset", preset, "--weights", "random-tiny", "--out", str(out),
                 "--save-npz", *small]) == 0
    saved = np.load(out / "img.npz")
    areas = json.loads((out / "img_areas.json").read_text())
    assert sum(c["pixels"] for c in areas["classes"].values()) == 70 * 90
    overrides = [item for item in small[:-1] if item != "--set"]
    segmentor = Segmentor.from_preset(preset, weights="random-tiny", device="cpu", overrides=overrides)
    prediction = segmentor.predict(path)
    assert np.array_equal(prediction.labels, saved["labels"])
    assert np.abs(prediction.probs - saved["probs"]).max() < 1e-5


def test_clearclip_pads_windows_to_a_patch_multiple(tiny_clip):
    from itaclip_core.methods.base import crop_padded_logits, patch_padding

    assert patch_padding(150, 219, 16) == (2, 3, 5, 5)  # 10 rows and 5 columns to add
    assert patch_padding(224, 448, 16) is None
    logits = torch.arange(4.0).view(1, 1, 2, 2)
    cut = crop_padded_logits(logits, (32, 32), (1, 2, 3, 0))
    assert cut.shape == (1, 1, 29, 29)
    assert torch.equal(cut, F.interpolate(logits, size=(32, 32), mode="bilinear")[:, :, 3:, 1:30])
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (120, 150, 3), dtype=np.uint8)
    config = apply_overrides(get_preset("clearclip_voc20"), ["short_side=150", "crop=0"])
    padded = Segmentor(tiny_clip, config, cache_dir=None).predict(image)
    plain = Segmentor(tiny_clip, config.replace(pad_to_patch=False), cache_dir=None).predict(image)
    assert padded.probs.shape == plain.probs.shape == (20, 120, 150)
    assert np.abs(padded.probs - plain.probs).max() > 1e-3
