"""Reading checkpoints: formats, strictness, and clear errors for bad files. Nothing from a file is executed."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from itaclip_core import load_clip, random_clip_state_dict
from itaclip_core.model import CheckpointError, build_clip, read_state_dict
from itaclip_core.model.clip import CLIP, CLIPConfig

SMALL = CLIPConfig(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=1,
                   context_length=77, vocab_size=49408, text_width=64, text_layers=2, text_heads=1)


@pytest.fixture(scope="module")
def small_model() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory, small_model) -> Path:
    """A TorchScript archive of a CLIP with OpenAI's module names, as the official files are."""
    images = torch.randn(1, 3, 32, 32)
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    with pytest.warns(Warning):  # tracing warns about Python-side shape logic; irrelevant for the weights
        traced = torch.jit.trace(small_model, (images, tokens), check_trace=False)
    path = tmp_path_factory.mktemp("ts") / "small-clip.pt"
    traced.save(str(path))
    return path


def test_torchscript_archive_gives_the_state_dict(torchscript_file, small_model):
    state = read_state_dict(torchscript_file)
    expected = small_model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_torchscript_archive_loads_and_predicts_like_the_model(torchscript_file, small_model):
    model = load_clip(torchscript_file, device="cpu")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), small_model.encode_image(images), atol=1e-6)
    assert model.weights_id.startswith("small-clip.pt sha256:")


def test_torchscript_with_foreign_globals_is_refused(tmp_path, torchscript_file):
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(torchscript_file) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(os.system, protocol=2)  # a reference to os.system in place of the module
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_state_dict(bad)


def test_pickled_code_in_a_state_dict_is_not_executed(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "exploit.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a loadable weights file"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_plain_and_wrapped_state_dicts_in_fp16_and_fp32(tmp_path, wrapper):
    state = random_clip_state_dict("tiny", seed=1)
    for dtype in (torch.float16, torch.float32):
        stored = {k: v.to(dtype) for k, v in state.items()}
        path = tmp_path / f"w-{dtype}.pt"
        torch.save(stored if wrapper is None else {wrapper: stored, "epoch": 3}, path)
        model = load_clip(path, device="cpu")
        assert torch.equal(model.visual.proj, state["visual.proj"].to(dtype).float())


def test_missing_file_is_named():
    with pytest.raises(CheckpointError, match="weights=./no/such/file.pt.: checkpoint not found"):
        load_clip("/no/such/file.pt")


def test_truncated_file_is_reported(tmp_path, golden_dir):
    data = (golden_dir / "tiny_clip_openai_fp16.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: damaged, truncated"):
        load_clip(path)


def test_empty_and_non_checkpoint_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n" * 20)
    with pytest.raises(CheckpointError, match="notes.txt"):
        read_state_dict(text)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(listing)


def test_resnet_checkpoint_is_not_supported():
    state = random_clip_state_dict("tiny")
    state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    state["visual.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    state["visual.attnpool.positional_embedding"] = torch.zeros(50, 2048)
    with pytest.raises(CheckpointError, match="ResNet CLIP .* not supported"):
        build_clip(state, "rn50.pt")


def test_other_architecture_lists_missing_and_unexpected_keys():
    state = random_clip_state_dict("tiny")
    del state["visual.ln_post.weight"]
    state["head.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as error:
        build_clip(state, "other.pt")
    message = str(error.value)
    assert "missing keys: visual.ln_post.weight" in message and "unexpected keys: head.fc.weight" in message


def test_a_different_model_entirely():
    with pytest.raises(CheckpointError, match="not an OpenAI CLIP ViT checkpoint"):
        build_clip({"encoder.layer.0.weight": torch.zeros(2, 2)}, "bert.bin")


def test_meta_entries_are_accepted(golden_dir):
    state = read_state_dict(golden_dir / "tiny_clip_openai_fp16.pt")
    assert {"input_resolution", "context_length", "vocab_size"} <= set(state)
    build_clip(state, "golden")  # does not count them as unexpected
