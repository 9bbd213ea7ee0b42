"""LoftUp: parity with the official module's outputs (golden/loftup), the published key layout, strict and
weights_only loading with clear errors, shapes, determinism, any size, and the pipeline with and without it."""

from __future__ import annotations

import urllib.error
import warnings

import numpy as np
import pytest
import torch

from itaclip_core.inference.engine import DenseInference
from itaclip_core.model import weights as weights_module
from itaclip_core.model.weights import WeightsUnavailableError
from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor
from itaclip_core.upsamplers import LoftUp, build_loftup, build_upsampler, load_loftup, random_loftup
from itaclip_core.upsamplers.loftup import LoftUpCheckpointError, loftup_cache_path, num_parameters
from itaclip_core.upsamplers.window import LoftUpUpsampler


@pytest.fixture(scope="module")
def loftup_dir(golden_dir):
    return golden_dir / "loftup"


@pytest.fixture(scope="module")
def golden_state(loftup_dir):
    return torch.load(loftup_dir / "loftup_clip_random_fp16.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_loftup(golden_state):
    return build_loftup(golden_state, "golden")


@pytest.fixture(scope="module")
def golden_outputs(loftup_dir):
    return torch.load(loftup_dir / "loftup_clip_golden.pt", weights_only=True)


@pytest.mark.parametrize("size", ["28x28", "32x24"])
def test_outputs_match_the_official_module(golden_loftup, golden_outputs, size):
    out = golden_loftup(golden_outputs["lr_feats"], golden_outputs[f"image_{size}"])
    expected = golden_outputs[f"out_{size}"]
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert (out - expected).abs().max() < 1e-4
    chunked = golden_loftup(golden_outputs["lr_feats"], golden_outputs[f"image_{size}"], chunk_elements=5000)
    assert (chunked - expected).abs().max() < 1e-4


def test_intermediates_match_the_official_module(golden_loftup, golden_outputs):
    feats = golden_outputs["lr_feats"]
    image = golden_outputs["image_28x28"]
    core = golden_loftup.upsampler
    assert (golden_loftup.channelnorm(feats) - golden_outputs["lr_feats_channelnormed"]).abs().max() < 1e-5
    assert (core.lr_pe(feats[:, :0]) - golden_outputs["lr_pe"]).abs().max() < 1e-5
    assert (core.fourier_feat[0](image) - golden_outputs["minmax_image_28x28"]).abs().max() < 1e-6
    assert (core.fourier_feat(image) - golden_outputs["fourier_feats_28x28"]).abs().max() < 1e-4


def _published_layout(loftup_dir):
    rows = []
    for line in (loftup_dir / "loftup_clip_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype))
    return rows


def test_key_layout_is_the_published_one(loftup_dir, golden_state):
    published = _published_layout(loftup_dir)
    assert len(published) == 54
    state = LoftUp(512).state_dict()
    ours = [(key, tuple(value.shape), str(value.dtype).replace("torch.", "")) for key, value in state.items()]
    assert ours == published
    assert list(golden_state) == [key for key, _, _ in published]
    assert num_parameters(LoftUp(512)) == 7_165_462


def test_loading_from_a_path_is_strict_and_weights_only(tmp_path, golden_state, golden_outputs):
    path = tmp_path / "pytorch_model.bin"
    torch.save(golden_state, path)
    model = load_loftup(path)
    assert model.weights_id.startswith("pytorch_model.bin sha256:")
    out = model(golden_outputs["lr_feats"], golden_outputs["image_32x24"])
    assert (out - golden_outputs["out_32x24"]).abs().max() < 1e-4

    broken = dict(golden_state)
    broken.pop("upsampler.lr_pe.biases")
    broken["upsampler.extra.weight"] = torch.zeros(3)
    torch.save(broken, path)
    with pytest.raises(LoftUpCheckpointError, match=r"missing: upsampler.lr_pe.biases.*unexpected: upsampler.extra"):
        load_loftup(path)
    reshaped = dict(golden_state)
    reshaped["upsampler.first_conv.1.bias"] = torch.zeros(7)
    torch.save(reshaped, path)
    with pytest.raises(LoftUpCheckpointError, match="wrong shape: upsampler.first_conv.1.bias"):
        load_loftup(path)
    torch.save({"state_dict": {"upsampler." + k: v for k, v in golden_state.items()}}, path)  # training format
    with pytest.raises(LoftUpCheckpointError, match="published layout"):
        load_loftup(path)
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module: refused by weights_only
    with pytest.raises(LoftUpCheckpointError, match="weights_only"):
        load_loftup(path)
    with pytest.raises(FileNotFoundError, match="haiwen/loftup-clip"):
        load_loftup(tmp_path / "nowhere.bin")


def test_offline_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights_module, "urlopen", offline)
    target = loftup_cache_path(tmp_path)
    with pytest.raises(WeightsUnavailableError) as info:
        load_loftup(cache_dir=tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "haiwen/loftup-clip" in message and str(target) in message
    assert not target.exists() and not list(target.parent.glob("*.part"))


def test_the_cache_is_used_and_a_download_is_checked(tmp_path, monkeypatch, golden_state):
    import io

    buffer = io.BytesIO()
    torch.save(golden_state, buffer)
    payload = buffer.getvalue()

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    calls = []
    monkeypatch.setattr(weights_module, "urlopen", lambda url, timeout: calls.append(url) or Response(payload))
    model = load_loftup(cache_dir=tmp_path, progress=False)
    assert calls == ["https://huggingface.co/haiwen/loftup-clip/resolve/main/pytorch_model.bin"]
    assert loftup_cache_path(tmp_path).is_file() and model.dim == 512
    load_loftup(cache_dir=tmp_path, progress=False)
    assert len(calls) == 1  # the second load read the cache

    wrong = io.BytesIO()
    torch.save({"channelnorm.norm.weight": torch.zeros(512)}, wrong)
    monkeypatch.setattr(weights_module, "urlopen", lambda url, timeout: Response(wrong.getvalue()))
    with pytest.raises(LoftUpCheckpointError):
        load_loftup(cache_dir=tmp_path / "other", progress=False)
    assert not loftup_cache_path(tmp_path / "other").exists()  # a wrong download is not kept


@pytest.mark.parametrize("size", [(17, 23), (5, 9), (14, 14)])
def test_random_weights_any_size_and_determinism(size):
    model = random_loftup(64, seed=3)
    feats = torch.randn(1, 64, 4, 5)
    image = torch.rand(1, 3, *size)
    out = model(feats, image)
    assert out.shape == (1, 64, *size) and torch.isfinite(out).all()
    assert torch.equal(out, model(feats, image))
    assert torch.equal(out, random_loftup(64, seed=3)(feats, image))
    assert not torch.allclose(out, random_loftup(64, seed=4)(feats, image))
    # each pixel is layer-normalised over channels
    torch.testing.assert_close(out.mean(1), torch.zeros(1, *size), atol=1e-4, rtol=0)


def test_bad_shapes_are_explained():
    model = random_loftup(64)
    with pytest.raises(ValueError, match=r"\(B, 64, h, w\)"):
        model(torch.zeros(1, 32, 4, 4), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="image"):
        model(torch.zeros(1, 64, 4, 4), torch.zeros(1, 1, 8, 8))


def test_engine_matches_text_on_the_upsampled_features(tiny_clip):
    upsampler = LoftUpUpsampler(random_loftup(tiny_clip.config.embed_dim, seed=1))
    engine = DenseInference(tiny_clip, get_preset("sclip_voc20").dense_config(), crop=64, stride=64,
                            image_engineering=False, upsampler=upsampler)
    image = torch.randn(3, 64, 64)
    text = torch.nn.functional.normalize(torch.randn(5, tiny_clip.config.embed_dim), dim=-1)
    logits = engine.logits(image, text, (64, 64))  # one window: the stitch is the identity
    features = engine.window_features(image[None])  # (1, 4, 4, D)
    up = upsampler.loftup(features.permute(0, 3, 1, 2), image[None])[0]
    expected = torch.einsum("dhw,qd->qhw", torch.nn.functional.normalize(up, dim=0), text)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    plain = DenseInference(tiny_clip, get_preset("sclip_voc20").dense_config(), crop=64, stride=64,
                           image_engineering=False).logits(image, text, (64, 64))
    assert (plain - logits).abs().max() > 1e-3


def test_pipeline_with_and_without_loftup(tiny_clip):
    base = get_preset("open_vocab").replace(crop=64, stride=48, short_side=80, image_engineering=False,
                                            pamr_steps=0, templates="templates/openai_imagenet_templates.txt")
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3)).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = Segmentor(tiny_clip, base, classes="cat, dog, sky", cache_dir=None)
        upsampled = Segmentor(tiny_clip, base.replace(upsampler="loftup", upsampler_weights="random:2"), cache_dir=None)
    upsampled.classifier = plain.classifier
    a, b = plain.predict(image), upsampled.predict(image)
    assert a.probs.shape == b.probs.shape == (3, 60, 90)
    assert np.abs(a.probs - b.probs).max() > 1e-3
    assert np.array_equal(b.labels, upsampled.predict(image).labels)  # deterministic


def test_config_errors(tiny_clip, tmp_path, golden_state):
    with pytest.raises(ValueError, match="known upsamplers: loftup"):
        build_upsampler(get_preset("open_vocab").replace(upsampler="featup"), tiny_clip)
    path = tmp_path / "pytorch_model.bin"
    torch.save(golden_state, path)
    with pytest.raises(ValueError, match="512-d features but the CLIP's dense features are 64-d"):
        build_upsampler(get_preset("open_vocab").replace(upsampler="loftup", upsampler_weights=str(path)), tiny_clip)
