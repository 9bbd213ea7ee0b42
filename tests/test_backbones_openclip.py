"""OpenCLIP ViTs in our CLIP classes: parity with open_clip itself, preprocessing constants, loading and refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch (extra `openclip`) is not installed")

from itaclip_core.model import load_clip  # noqa: E402
from itaclip_core.model import openclip as oc  # noqa: E402
from itaclip_core.model.checkpoint import CheckpointError  # noqa: E402
from itaclip_core.model.weights import WeightsUnavailableError  # noqa: E402
from itaclip_core.text.tokenizer import tokenize  # noqa: E402

# Families to hold against open_clip: (model name, widths kept as multiples of its own head width).
FAMILIES = ["ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14", "ViT-H-14", "ViT-M-16-alt", "ViT-bigG-14"]


def _tiny_cfg(name: str) -> dict:
    """The model's config at 2 of its own heads, 3 image and 2 text blocks (H/14 keeps 80-wide heads, bigG its
    MLP ratio, ViT-M-16-alt its layer scale)."""
    cfg = open_clip.get_model_config(name)
    head_width = cfg["vision_cfg"].get("head_width", 64)
    cfg = oc.shrink_config(cfg, layers=3, text_layers=2)
    cfg["vision_cfg"].update(width=2 * head_width, head_width=head_width)
    return cfg


def _open_clip_model(cfg: dict, seed: int) -> torch.nn.Module:
    """open_clip's own CLIP with random weights (no download), every parameter perturbed so that layer norms,
    biases and layer scales are not at their identity initialisation."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
        quick_gelu=cfg.get("quick_gelu", False),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "logit_scale":
                continue
            scale = 0.1 if param.ndim == 1 else 0.02
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_parity_with_open_clip(name):
    cfg = _tiny_cfg(name)
    reference = _open_clip_model(cfg, seed=FAMILIES.index(name))
    ours = oc.build_from_state_dict(oc.config_from_open_clip(name, cfg), reference.state_dict(), f"open_clip {name}")
    assert ours.config.activation == ("quick_gelu" if cfg.get("quick_gelu") else "gelu")
    assert ours.config.vision_heads == 2 and ours.config.patch_size == cfg["vision_cfg"]["patch_size"]

    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(["a photo of a cat", "a very long description of a dog on the grass in the sun"])

    captured: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n, block in enumerate(reference.visual.transformer.resblocks)]
    with torch.no_grad():
        ref_image = reference.encode_image(images)
        ref_text = reference.encode_text(tokens)
        our_image = ours.encode_image(images)
        our_text = ours.encode_text(tokens)
        _, our_blocks = ours.visual.forward_intermediates(images, indices=range(3))
    for hook in hooks:
        hook.remove()
    assert (our_image - ref_image).abs().max().item() < 1e-5
    assert (our_text - ref_text).abs().max().item() < 1e-5
    assert len(our_blocks) == 3
    for index, tokens_out in enumerate(our_blocks):
        ref_tokens = captured[index]
        if ref_tokens.shape[0] != images.shape[0]:  # a sequence-first open_clip
            ref_tokens = ref_tokens.transpose(0, 1)
        assert (tokens_out - ref_tokens).abs().max().item() < 1e-5
    assert (ours.logit_scale - reference.logit_scale).abs().item() == 0


def test_layer_scale_is_read_and_applied():
    cfg = _tiny_cfg("ViT-M-16-alt")
    config = oc.config_from_open_clip("ViT-M-16-alt", cfg)
    assert config.vision_layer_scale and not config.text_layer_scale
    reference = _open_clip_model(cfg, seed=5)
    state = reference.state_dict()
    ours = oc.build_from_state_dict(config, state, "m16")
    gamma = ours.visual.blocks[0].ls_1.gamma
    assert torch.equal(gamma, state["visual.transformer.resblocks.0.ls_1.gamma"])
    # Without layer scale the same weights (minus the gammas) give another embedding: the scale is not ignored.
    plain = oc.build_from_state_dict(dataclasses.replace(config, vision_layer_scale=False),
                                     {k: v for k, v in state.items() if ".ls_" not in k}, "m16 without ls")
    images = torch.randn(1, 3, 224, 224)
    assert (plain.encode_image(images) - ours.encode_image(images)).abs().max() > 1e-4


@pytest.mark.parametrize("name,tag", [("ViT-B-16", "laion2b_s34b_b88k"), ("ViT-L-14", "laion2b_s32b_b82k"),
                                      ("ViT-H-14", "laion2b_s32b_b79k"), ("ViT-B-16-quickgelu", "metaclip_fullcc"),
                                      ("ViT-H-14-378-quickgelu", "dfn5b")])
def test_preprocessing_constants_come_from_the_tag(name, tag):
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    expected = merge_preprocess_dict(dataclasses.asdict(PreprocessCfg()), open_clip.get_pretrained_cfg(name, tag))
    config = oc.config_from_open_clip(name, oc.model_config(name), oc.pretrained_config(name, tag))
    assert config.image_mean == tuple(expected["mean"])
    assert config.image_std == tuple(expected["std"])
    assert config.interpolation == expected["interpolation"]
    assert config.image_size == open_clip.get_model_config(name)["vision_cfg"]["image_size"]


def test_laion_l14_uses_its_own_mean_and_std_in_the_pipeline():
    from itaclip_core.inference.preprocess import CLIP_MEAN_255, CLIP_STD_255, renormalise_for

    config = oc.config_from_open_clip("ViT-L-14", oc.model_config("ViT-L-14"),
                                      oc.pretrained_config("ViT-L-14", "laion2b_s32b_b82k"))
    assert config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (0.5, 0.5, 0.5)
    pixels = torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    clip_normalised = (pixels - torch.tensor(CLIP_MEAN_255).view(3, 1, 1)) / torch.tensor(CLIP_STD_255).view(3, 1, 1)
    renormalised = renormalise_for(clip_normalised, config.image_mean, config.image_std)
    expected = (pixels / 255.0 - 0.5) / 0.5
    assert (renormalised - expected).abs().max().item() < 1e-5
    same = renormalise_for(clip_normalised, oc.OPENAI_MEAN, oc.OPENAI_STD)
    assert same is clip_normalised


def test_engine_renormalises_windows_for_the_model():
    from itaclip_core.attention.dense import DenseConfig, dense_tokens
    from itaclip_core.inference.engine import DenseInference

    model = load_clip("random-open_clip:ViT-B-16", device="cpu")
    half = dataclasses.replace(model.config, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    other = oc.build_from_state_dict(half, model.state_dict(), "same weights, other constants")
    crops = torch.randn(2, 3, 224, 224)
    engine = DenseInference(other, DenseConfig(), image_engineering=False)
    features = engine.window_features(crops)
    from itaclip_core.inference.preprocess import renormalise_for

    direct = dense_tokens(other.visual, renormalise_for(crops, (0.5,) * 3, (0.5,) * 3), DenseConfig())[:, 1:]
    direct = torch.nn.functional.normalize(direct, dim=-1).view(2, 14, 14, -1)
    assert (features - direct).abs().max().item() < 1e-5
    plain = DenseInference(model, DenseConfig(), image_engineering=False).window_features(crops)
    assert (features - plain).abs().max().item() > 1e-3


def test_random_open_clip_keeps_depth_and_patch():
    model = load_clip("random-open_clip:ViT-H-14:2", device="cpu")
    assert (model.config.vision_layers, model.config.patch_size, model.config.text_layers) == (32, 14, 24)
    assert model.config.activation == "gelu" and model.config.vision_width == oc.TINY_VISION_WIDTH
    assert model.weights_id == "random-open_clip:ViT-H-14:2"
    again = load_clip("random-open_clip:ViT-H-14:2", device="cpu")
    assert torch.equal(model.visual.conv1.weight, again.visual.conv1.weight)
    quick = load_clip("random-open_clip:ViT-B-16-quickgelu", device="cpu")
    assert quick.config.activation == "quick_gelu"


@pytest.mark.parametrize("spec,words", [
    ("open_clip:ViT-B-16-SigLIP/webli", ["ViT-B-16-SigLIP", "timm", "Supported", "ViT-L-14"]),
    ("open_clip:RN50/openai", ["RN50", "ResNet"]),
    ("open_clip:ViT-H-14-CLIPA/datacomp1b", ["ViT-H-14-CLIPA"]),
    ("open_clip:coca_ViT-B-32/laion2b_s13b_b90k", ["coca_ViT-B-32"]),
    ("open_clip:NoSuchModel/x", ["NoSuchModel", "ViT-B-16-quickgelu"]),
    ("open_clip:ViT-B-16/no_such_tag", ["no_such_tag", "laion2b_s34b_b88k"]),
    ("open_clip:ViT-B-16", ["open_clip:<model>/"]),
    ("random-open_clip:ViT-B-16-SigLIP", ["ViT-B-16-SigLIP", "timm"]),
])
def test_bad_specs_are_refused_with_the_reason(spec, words):
    with pytest.raises(ValueError) as info:
        load_clip(spec, device="cpu")
    for word in words:
        assert word in str(info.value)


def test_local_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    cfg = oc.shrink_config(open_clip.get_model_config("ViT-B-16"))
    reference = _open_clip_model(cfg, seed=3)
    ddp = {f"module.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / "b16.pt"
    torch.save({"state_dict": ddp, "epoch": 3}, path)
    # The file holds a tiny-width B/16: named as the full-width ViT-B-16 it does not fit, and the error says why.
    with pytest.raises(CheckpointError) as info:
        load_clip(f"open_clip:ViT-B-16/{path}", device="cpu")
    assert "ViT-B-16" in str(info.value) and "shape" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_clip(f"open_clip:ViT-L-14/{path}", device="cpu")
    assert "ViT-L-14" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_clip(f"open_clip:ViT-B-16/{tmp_path / 'missing.pt'}", device="cpu")
    assert "missing.pt" in str(info.value)


def test_local_checkpoint_loads_strictly(tmp_path, monkeypatch):
    cfg = oc.shrink_config(open_clip.get_model_config("ViT-L-14"), layers=2, text_layers=2)
    monkeypatch.setattr(oc, "model_config", lambda name: cfg)
    reference = _open_clip_model(cfg, seed=4)
    path = tmp_path / "l14.pt"
    torch.save(reference.state_dict(), path)
    with pytest.warns(UserWarning, match="laion2b_s32b_b82k"):  # that tag uses mean = std = 0.5
        model = load_clip(f"open_clip:ViT-L-14/{path}", device="cpu")
    assert model.weights_id.startswith("open_clip:ViT-L-14/l14.pt sha256:")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images)).abs().max().item() < 1e-5
    extra = dict(reference.state_dict(), logit_bias=torch.zeros(()))
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match="unexpected keys: logit_bias"):
        load_clip(f"open_clip:ViT-L-14/{path}", device="cpu")


def test_offline_error_names_the_file(tmp_path, monkeypatch):
    def offline(repo_id, filename, cache_dir):
        raise OSError("network is unreachable")

    monkeypatch.setattr(oc, "hf_download", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        oc.download_open_clip("ViT-B-16", "laion2b_s34b_b88k", cache_dir=tmp_path)
    message = str(info.value)
    assert "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in message and "open_clip_pytorch_model.bin" in message
    assert "open_clip:ViT-B-16//" in message


def test_download_is_verified_against_the_hub_blob_sha(tmp_path, monkeypatch):
    import hashlib

    payload = b"weights"
    sha = hashlib.sha256(payload).hexdigest()
    calls = []

    def fake_download(repo_id, filename, cache_dir, content=[b"corrupt", payload]):
        calls.append(filename)
        blob = Path(cache_dir) / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content[min(len(calls) - 1, 1)])
        link = Path(cache_dir) / "snapshots" / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(blob)
        return str(link)

    monkeypatch.setattr(oc, "hf_download", fake_download)
    path, got = oc.download_open_clip("ViT-B-16", "laion2b_s34b_b88k", cache_dir=tmp_path)
    assert got == sha and path.read_bytes() == payload
    assert len(calls) == 2  # the corrupt first copy was fetched again



def test_parity_fails_with_the_wrong_activation():
    cfg = _tiny_cfg("ViT-B-16-quickgelu")
    reference = _open_clip_model(cfg, seed=9)
    wrong = dataclasses.replace(oc.config_from_open_clip("ViT-B-16-quickgelu", cfg), activation="gelu")
    ours = oc.build_from_state_dict(wrong, reference.state_dict(), "wrong activation")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours.encode_image(images) - reference.encode_image(images)).abs().max().item() > 1e-4


def test_missing_extra_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    with pytest.raises(ImportError) as info:
        load_clip("open_clip:ViT-B-16/laion2b_s34b_b88k", device="cpu")
    assert "itaclip-core[openclip]" in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ImportError, match="openclip"):
        load_clip("random-open_clip:ViT-L-14", device="cpu")


def test_cli_reports_an_unsupported_model(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from itaclip_core.cli import main

    Image.fromarray(np.zeros((32, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = main(["segment", str(tmp_path / "x.png"), "--classes", "cat, dog", "--weights",
                 "open_clip:ViT-B-16-SigLIP/webli", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ViT-B-16-SigLIP" in err and "Supported open_clip models" in err
    assert not (tmp_path / "out").exists()


def test_text_shortcuts_hold_with_layer_scale_and_gelu():
    """The shared-prefix text encoder (used for every template) equals encode_text with GELU and layer scale."""
    from itaclip_core.model.random import random_state_dict_for
    from itaclip_core.model.weights import build_clip

    cfg = oc.shrink_config(open_clip.get_model_config("ViT-M-16-alt"), layers=2, text_layers=3)
    cfg["text_cfg"]["ls_init_value"] = 1e-4
    config = oc.config_from_open_clip("ViT-M-16-alt", cfg)
    assert config.text_layer_scale and config.activation == "gelu"
    model = build_clip(random_state_dict_for(config, seed=2), "random", config=config)
    tokens = tokenize(["a photo of a cat.", "a photo of a small dog on grass.", "a photo of a x."])
    with torch.no_grad():
        full = model.encode_text(tokens, trim=False)
        shared = model.encode_text_shared_prefix(tokens, prefix_length=4)
    assert (full - shared).abs().max().item() < 1e-5


def test_pretrained_tag_end_to_end_with_a_fake_hub(tmp_path, monkeypatch):
    import hashlib

    from safetensors.torch import save_file

    cfg = oc.shrink_config(open_clip.get_model_config("ViT-L-14"), layers=2, text_layers=2)
    monkeypatch.setattr(oc, "model_config", lambda name: cfg)
    reference = _open_clip_model(cfg, seed=6)
    staging = tmp_path / "staging.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(staging))
    payload = staging.read_bytes()
    sha = hashlib.sha256(payload).hexdigest()

    def fake_download(repo_id, filename, cache_dir):
        assert repo_id == "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
        if filename != "open_clip_model.safetensors":
            raise FileNotFoundError(filename)
        blob = Path(cache_dir) / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(payload)
        link = Path(cache_dir) / "snapshots" / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(blob)
        return str(link)

    monkeypatch.setattr(oc, "hf_download", fake_download)
    model = load_clip("open_clip:ViT-L-14/laion2b_s32b_b82k", device="cpu", cache_dir=tmp_path / "cache")
    assert model.weights_id == f"open_clip:ViT-L-14/laion2b_s32b_b82k sha256:{sha}"
    assert model.config.image_mean == (0.5, 0.5, 0.5)  # the tag's constants
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images)).abs().max().item() < 1e-5


def test_inspection_and_reference_paths_use_the_model_constants():
    """explore's per-view logits and the straightforward reference re-normalise as the engine does."""
    import numpy as np

    from itaclip_core import explore, reference
    from itaclip_core.presets import get_preset
    from itaclip_core.segmentor import Segmentor

    model = load_clip("random-open_clip:ViT-B-16", device="cpu")
    half = dataclasses.replace(model.config, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    other = oc.build_from_state_dict(half, model.state_dict(), "other constants")
    config = get_preset("open_vocab").replace(templates="notebooks/ci_templates.txt", stride=112, pamr_steps=0)
    seg = Segmentor(other, config, classes="cat, dog", cache_dir=False)
    image = (np.random.default_rng(1).random((230, 250, 3)) * 255).astype(np.uint8)
    prepared = seg.prepare(image)
    tensor = prepared.tensor
    engine = seg.engine.logits(tensor, seg.classifier.features, prepared.original_size)
    mixed = explore.mix_view_logits(explore.view_logits(seg, prepared), config.img_eng_coef)
    assert (engine - mixed).abs().max().item() < 1e-4
    crop = tensor[None, :, :224, :224]
    ours = seg.engine.patch_logits(tensor[:, :224, :224], seg.classifier.features)[0]
    ref = reference.window_logits(other, crop, seg.classifier.features, config.dense_config(), True,
                                  config.img_eng_coef)
    up = torch.nn.functional.interpolate(ours, size=(224, 224), mode="bilinear")
    assert (up - ref).abs().max().item() < 1e-4
