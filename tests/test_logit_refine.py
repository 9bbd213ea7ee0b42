"""The logit-refinement registry (pamr, crf, guided), its config settings, the guided filters, and the pipeline and
CLI with refinements selected, on every method family (and LoftUp with them)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from _families import FAMILIES, family_config
from itaclip_core.cli import main
from itaclip_core.model import load_clip
from itaclip_core.postprocess import class_probabilities
from itaclip_core.presets import apply_overrides, get_preset
from itaclip_core.refinement import dense_crf, pamr
from itaclip_core.refinement.guided import GuidedFilterSettingError, guided_filter
from itaclip_core.refinement.logits import (
    LOGIT_REFINEMENTS,
    CRFRefinement,
    GuidedRefinement,
    PAMRRefinement,
    RefinementContext,
    build_logit_refinements,
    refine_logits,
)
from itaclip_core.segmentor import Segmentor


def _inputs(seed: int = 0, queries: int = 4, size: tuple[int, int] = (20, 26)):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 10, 13, generator=gen)  # a normalised model input at half the original size
    image[:, :, 6:] += 1.5  # an edge
    logits = torch.randn(queries, *size, generator=gen) * 0.05
    return image, logits


def test_registry_names_and_defaults():
    assert set(LOGIT_REFINEMENTS) == {"pamr", "crf", "guided"}
    itaclip = build_logit_refinements(get_preset("itaclip_voc21"))
    assert [type(r) for r in itaclip] == [PAMRRefinement] and itaclip[0].steps == 10
    assert build_logit_refinements(get_preset("sclip_voc20")) == []  # pamr_steps=0: no-op, left out
    chosen = build_logit_refinements(apply_overrides(get_preset("itaclip_voc21"), ["logit_refine=guided,crf,pamr"]))
    assert [r.name for r in chosen] == ["guided", "crf", "pamr"]
    assert build_logit_refinements(apply_overrides(get_preset("itaclip_voc21"), ["logit_refine=none"])) == []


def test_unknown_names_and_bad_settings_fail_before_any_image(tiny_clip):
    with pytest.raises(ValueError, match="known logit refinements: pamr, crf, guided"):
        build_logit_refinements(get_preset("open_vocab").replace(logit_refine=("pamr", "densecrf")))
    with pytest.raises(ValueError, match="crf_bilateral_srgb|bilateral_srgb"):
        Segmentor(tiny_clip, get_preset("open_vocab").replace(logit_refine=("crf",), crf_bilateral_srgb=0.0),
                  cache_dir=None)
    with pytest.raises(ValueError, match="guided_kernel"):
        build_logit_refinements(get_preset("open_vocab").replace(logit_refine=("guided",), guided_kernel=4))
    with pytest.raises(ValueError, match="guided_filter"):
        build_logit_refinements(get_preset("open_vocab").replace(logit_refine=("guided",), guided_filter="box"))
    with pytest.raises(ValueError, match="crf_backend|backend"):
        build_logit_refinements(get_preset("open_vocab").replace(logit_refine=("crf",), crf_backend="gpu"))


def test_refinements_run_in_the_configured_order():
    image, logits = _inputs()
    config = get_preset("itaclip_voc21").replace(logit_refine=("pamr", "crf"), crf_iterations=2,
                                                 crf_bilateral_sxy=10.0)
    out = refine_logits(logits, build_logit_refinements(config), image, (20, 26), 40.0)
    context = RefinementContext.from_resized(image, (20, 26), 40.0)
    guide = torch.nn.functional.interpolate(image[None], size=(20, 26), mode="bilinear")
    after_pamr = pamr(guide, logits[None], 10, (8, 16))[0]
    expected = CRFRefinement(2, bilateral_sxy=10.0)(after_pamr, context)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    reversed_order = refine_logits(logits, build_logit_refinements(config.replace(logit_refine=("crf", "pamr"))),
                                   image, (20, 26), 40.0)
    assert (reversed_order - out).abs().max() > 1e-4


def test_crf_refinement_gives_back_the_crf_probabilities_through_the_postprocessing():
    image, logits = _inputs(1, queries=3)
    context = RefinementContext.from_resized(image, (20, 26), 50.0)
    refined = CRFRefinement(iterations=3, bilateral_sxy=12.0)(logits, context)
    probs = class_probabilities(refined, [0, 1, 2], 50.0)
    expected = dense_crf((logits * 50.0).softmax(0), context.rgb_uint8(), iterations=3, bilateral_sxy=12.0)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert (probs.argmax(0) != (logits * 50).softmax(0).argmax(0)).any()


def test_context_rgb_undoes_the_normalisation():
    from itaclip_core.inference.preprocess import normalise_bgr

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    tensor = normalise_bgr(np.ascontiguousarray(rgb[:, :, ::-1]))
    context = RefinementContext.from_resized(tensor, (7, 9), 40.0)
    assert torch.equal(context.rgb_uint8(), torch.from_numpy(rgb))


def _kornia():
    return pytest.importorskip("kornia", reason="kornia (extra guided) is not installed")


@pytest.mark.parametrize("mode", ["guided", "joint_bilateral"])
def test_guided_filter_equals_kornia_and_chunks_do_not_matter(mode):
    kornia = _kornia()
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 18, 22, generator=gen)
    guide = torch.rand(3, 18, 22, generator=gen)
    out = guided_filter(scores, guide, mode=mode, kernel_size=5, eps=1e-2, sigma_color=0.2, sigma_space=2.0)
    chunked = guided_filter(scores, guide, mode=mode, kernel_size=5, eps=1e-2, sigma_color=0.2, sigma_space=2.0,
                            chunk_elements=18 * 22 * 2)
    if mode == "guided":
        expected = kornia.filters.guided_blur(guide[None], scores[None], 5, 1e-2)[0]
    else:
        expected = kornia.filters.joint_bilateral_blur(scores[None], guide[None], 5, 0.2, (2.0, 2.0))[0]
    # the exact colour guided filter is our own arithmetic (float32 box means): float32 rounding apart from kornia's
    torch.testing.assert_close(out, expected, atol=1e-5 if mode == "guided" else 1e-6, rtol=0)
    torch.testing.assert_close(chunked, out, atol=1e-6, rtol=0)
    assert (out - scores).abs().mean() > 0.1


@pytest.mark.parametrize("border", ["reflect", "replicate", "constant", "circular"])
@pytest.mark.parametrize("kernel_size, eps", [(3, 1e-3), (9, 1e-1)])
def test_own_colour_guided_filter_equals_kornia(border, kernel_size, eps):
    kornia = _kornia()
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 3, 21, 17, generator=gen)
    guide = torch.rand(2, 3, 21, 17, generator=gen)
    out = guided_filter(scores, guide, kernel_size=kernel_size, eps=eps, border=border)
    expected = kornia.filters.guided_blur(guide, scores, kernel_size, eps, border_type=border)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    fast = guided_filter(scores, guide, kernel_size=kernel_size, eps=eps, border=border, subsample=2)
    torch.testing.assert_close(fast, kornia.filters.guided_blur(guide, scores, kernel_size, eps, border_type=border,
                                                                subsample=2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("border", ["reflect", "replicate", "constant", "circular"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_means_equal_the_window_average(border, dtype):
    """Both box-mean paths (float32 depthwise convolutions, float64 running sums) equal the average over each
    window of the padded image, for a window nearly as large as the image."""
    from itaclip_core.refinement.guided import _box

    x = torch.randn(2, 3, 10, 13, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    padded = torch.nn.functional.pad(x, [4] * 4, mode=border)
    expected = padded.unfold(2, 9, 1).unfold(3, 9, 1).mean(dim=(-1, -2))
    out = _box(x.to(dtype), 9, border)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)


def test_guided_filter_follows_the_guides_edge():
    _kornia()
    guide = torch.zeros(3, 16, 16)
    guide[:, :, 8:] = 1.0
    scores = torch.zeros(1, 16, 16)
    scores[:, :, 6:] = 1.0  # the scores' edge is two pixels off the image's
    for mode in ("guided", "joint_bilateral"):
        out = guided_filter(scores, guide, mode=mode, kernel_size=7, eps=1e-3, sigma_color=0.1, sigma_space=3.0)
        jump = out[0, 8, 1:] - out[0, 8, :-1]
        assert int(jump.argmax()) + 1 == 8  # the steepest step moved to the guide's edge


@pytest.mark.parametrize(
    "changes, word",
    [(dict(kernel_size=0), "guided_kernel"), (dict(eps=-1.0), "guided_eps"), (dict(sigma_space=0.0),
     "guided_sigma_space"), (dict(subsample=0), "guided_subsample"), (dict(border="wrap"), "guided_border"),
     (dict(mode="box"), "guided_filter")],
)
def test_guided_settings_are_checked(changes, word):
    with pytest.raises(GuidedFilterSettingError, match=word):
        guided_filter(torch.zeros(1, 4, 4), torch.zeros(3, 4, 4), **changes)
    with pytest.raises(GuidedFilterSettingError, match="resize the guide"):
        guided_filter(torch.zeros(1, 4, 4), torch.zeros(3, 4, 5))


def test_guided_refinement_uses_the_rgb_guide():
    _kornia()
    image, logits = _inputs(3)
    context = RefinementContext.from_resized(image, (20, 26), 40.0)
    out = GuidedRefinement("joint_bilateral", 5, sigma_color=0.2, sigma_space=2.0)(logits, context)
    torch.testing.assert_close(out, guided_filter(logits, context.rgb(), "joint_bilateral", 5, sigma_color=0.2,
                                                  sigma_space=2.0), atol=0, rtol=0)


def test_missing_kornia_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("kornia"):
            raise ImportError("no kornia")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for mode, subsample in (("joint_bilateral", 1), ("guided", 2)):
        with pytest.raises(ImportError, match=r"itaclip-core\[guided\]"):
            guided_filter(torch.zeros(1, 4, 4), torch.zeros(3, 4, 4), mode=mode, subsample=subsample)
        config = get_preset("open_vocab").replace(logit_refine=("pamr", "guided"), guided_filter=mode,
                                                  guided_subsample=subsample)
        with pytest.raises(ImportError, match=r"itaclip-core\[guided\]"):  # when set up, before any image
            build_logit_refinements(config)
    # the exact guided filter is computed here: no kornia needed
    out = guided_filter(torch.ones(1, 4, 4), torch.rand(3, 4, 4), kernel_size=3)
    torch.testing.assert_close(out, torch.ones(1, 4, 4), atol=1e-5, rtol=0)
    assert [r.name for r in build_logit_refinements(get_preset("open_vocab").replace(logit_refine=("guided",)))] == [
        "guided"]


@pytest.fixture(scope="module")
def plain_segmentor(tiny_clip, golden_dir):
    base = get_preset("itaclip_voc21").replace(aux_file=str(golden_dir / "voc20_definitions_sample.txt"),
                                               stride=112, image_engineering=False, pamr_steps=2,
                                               crf_iterations=3, short_side=112)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Segmentor(tiny_clip, base, cache_dir=None)


@pytest.mark.parametrize("refine", [("crf",), ("pamr", "guided"), ("pamr", "crf", "guided")])
def test_pipeline_with_refinements(plain_segmentor, golden_dir, refine):
    if "guided" in refine:
        _kornia()
    plain = plain_segmentor
    refined = Segmentor(plain.model, plain.config.replace(logit_refine=refine, classes=None), cache_dir=None)
    refined.classifier = plain.classifier  # the same text side, built once
    small = np.asarray(Image.open(golden_dir / "synthetic_300x420.png").convert("RGB").resize((140, 100)))
    prepared = plain.prepare(small)
    a, b = plain.predict_prepared(prepared), refined.predict_prepared(prepared)
    assert b.probs.shape == a.probs.shape and b.labels.shape == (100, 140)
    assert np.isfinite(b.probs).all() and b.probs.min() >= 0 and b.probs.max() <= 1 + 1e-6
    assert np.abs(a.probs - b.probs).max() > 1e-3


def test_cli_segment_with_crf_and_guided(tmp_path, capsys):
    _kornia()
    image = np.zeros((40, 56, 3), np.uint8)
    image[:, 28:] = (200, 180, 30)
    path = tmp_path / "two.png"
    Image.fromarray(image).save(path)
    out = tmp_path / "out"
    code = main(["segment", str(path), "--classes", "cat, sky", "--weights", "random-tiny", "--out", str(out),
                 "--set", "stride=112", "--set", "logit_refine=pamr,crf,guided", "--set", "pamr_steps=1",
                 "--set", "crf_iterations=2", "--no-progress"])
    assert code == 0
    assert np.asarray(Image.open(out / "two_labels.png")).shape == (40, 56)
    code = main(["segment", str(path), "--classes", "cat, sky", "--weights", "random-tiny", "--out", str(out),
                 "--set", "logit_refine=pamr,dense", "--no-progress"])
    assert code != 0
    assert "known logit refinements" in capsys.readouterr().err


def test_cli_eval_with_logit_refinements(tmp_path, monkeypatch):
    import json

    from itaclip_core.data.synthetic import make_synthetic_dataset

    monkeypatch.setenv("ITACLIP_CACHE", str(tmp_path / "cache"))
    root = make_synthetic_dataset("voc21", tmp_path / "voc", num_images=1, sizes=[(48, 64)], easy=True)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    out = tmp_path / "run"
    code = main(["eval", "--preset", "itaclip_voc21", "--data-root", str(root), "--weights", "random-tiny",
                 "--out", str(out), "--workers", "0", "--set", "short_side=112", "--set", f"templates={templates}",
                 "--set", "stride=112", "--set", "logit_refine=pamr,crf", "--set", "crf_iterations=2",
                 "--device", "cpu", "-q"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["logit_refine"] == ["pamr", "crf"] and results["config"]["crf_iterations"] == 2
    assert results["num_images"] == 1 and "boundary" in results


# Method families whose readout makes its own patch logits (clustering, proxy attention, mask attention), where a
# feature upsampler has nothing to upsample.
PATCH_LOGIT_READOUTS = {"cliptrase_voc20_224": "cliptrase", "proxyclip_voc20": "proxy",
                        "corrclip_style_voc20": "mask_attention"}


@pytest.fixture(scope="module")
def random_tiny():
    return load_clip("random-tiny", device="cpu")


@pytest.mark.parametrize("preset", [*FAMILIES, "sclip_voc20+vote"])
def test_every_method_family_takes_the_refinements_and_loftup(random_tiny, preset):
    """Each method family (tiny random weights, the mask-guided ones with superpixels), and SCLIP in the mask mode
    (superpixel votes), with PAMR, DenseCRF and the guided filter in that order, and with LoftUp (random weights):
    valid probabilities at the prediction size that differ from the unrefined ones. LoftUp is refused, naming the
    readout, exactly where the readout makes its own patch logits."""
    image = (np.random.default_rng(3).random((60, 84, 3)) * 255).astype(np.uint8)
    if preset.endswith("+vote"):
        base = family_config(preset.removesuffix("+vote")).replace(masks="superpixels", mask_use="vote",
                                                                   mask_cache=False)
    else:
        base = family_config(preset)

    def predict(**changes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = Segmentor(random_tiny, base.replace(**changes), classes="cat, dog", cache_dir=False,
                            notes=lambda note: None)
            return seg.predict(image).probs

    plain = predict(logit_refine=("pamr",), pamr_steps=0)
    size = (base.crop, base.crop) if base.protocol == "centre_crop" else (60, 84)
    assert plain.shape == (2, *size)
    refined = predict(logit_refine=("pamr", "crf", "guided"), pamr_steps=1, crf_iterations=2)
    outputs = [refined]
    if preset in PATCH_LOGIT_READOUTS:
        with pytest.raises(ValueError, match=f"'{PATCH_LOGIT_READOUTS[preset]}' readout makes its own patch logits"):
            predict(upsampler="loftup", upsampler_weights="random:1")
    else:
        outputs.append(predict(upsampler="loftup", upsampler_weights="random:1"))
    for probs in outputs:
        assert probs.shape == plain.shape and np.isfinite(probs).all()
        assert probs.min() >= 0 and probs.max() <= 1 + 1e-5
        assert np.abs(probs - plain).max() > 1e-3
