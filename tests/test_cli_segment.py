"""`itaclip segment` end to end with a random CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from itaclip_core.cli import main

FAST = ["--set", "stride=112", "--set", "pamr_steps=1", "--no-progress"]


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, size in enumerate([(90, 120), (64, 64)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((*size, 3), 40 * (i + 1), np.uint8)).save(path)
        paths.append(path)
    return paths


def test_segment_writes_labels_overlay_areas_and_npz(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", *map(str, images), "--classes", "cat, dog|puppy, sky", "--weights", "random-tiny",
                 "--out", str(out), "--save-npz", *FAST])
    assert code == 0
    for i, (h, w) in enumerate([(90, 120), (64, 64)]):
        labels = np.asarray(Image.open(out / f"img{i}_labels.png"))
        assert labels.shape == (h, w) and labels.max() < 3
        overlay = Image.open(out / f"img{i}_overlay.png")
        assert overlay.size[1] >= h and overlay.size[0] > w  # the legend is beside the image
        areas = json.loads((out / f"img{i}_areas.json").read_text())
        assert set(areas["classes"]) <= {"cat", "dog", "sky"}
        assert sum(c["pixels"] for c in areas["classes"].values()) == h * w
        saved = np.load(out / f"img{i}.npz")
        assert saved["probs"].shape == (3, h, w) and np.array_equal(saved["labels"], labels)
        assert list(saved["class_names"]) == ["cat", "dog", "sky"]
    assert "segmented 2 of 2" in capsys.readouterr().out


def test_unreadable_image_is_skipped_and_the_rest_done(images, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "out"
    code = main(["segment", str(bad), str(images[0]), "--classes", "cat, sky", "--weights", "random-tiny",
                 "--out", str(out), *FAST])
    assert code == 1
    assert (out / "img0_labels.png").exists() and not (out / "broken_labels.png").exists()
    captured = capsys.readouterr()
    assert "segmented 1 of 2" in captured.out and "broken.jpg" in captured.err


def test_preset_classes_and_overrides(images, tmp_path):
    out = tmp_path / "out"
    code = main(["segment", str(images[1]), "--preset", "sclip_voc20", "--weights", "random-tiny",
                 "--out", str(out), "--save-npz", *FAST])
    assert code == 0
    assert np.load(out / "img1.npz")["probs"].shape == (20, 64, 64)


@pytest.mark.parametrize(
    "arguments,message",
    [(["--classes", "cat, , dog"], "class 2 has an empty name"),
     (["--classes", "cat", "--weights", "/missing/ViT.pt"], "--weights /missing/ViT.pt: checkpoint not found"),
     (["--classes", "cat", "--set", "stride=x"], "cannot read 'x' for stride"),
     ([], "give the classes")],
)
def test_bad_arguments_give_clear_errors(images, tmp_path, capsys, arguments, message):
    weights = [] if "--weights" in arguments else ["--weights", "random-tiny"]
    code = main(["segment", str(images[0]), *weights, *arguments, "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_duplicate_names_do_not_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / folder / "same.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png"), "--classes", "cat",
                 "--weights", "random-tiny", "--out", str(out), *FAST]) == 0
    assert (out / "same_labels.png").exists() and (out / "same_2_labels.png").exists()
