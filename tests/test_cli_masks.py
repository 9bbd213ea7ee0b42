"""`itaclip masks generate` and the mask options of `itaclip segment`, end to end on random models."""

from __future__ import annotations

import json
import sys
import urllib.error

import numpy as np
import pytest
from PIL import Image

from itaclip_core.cli import main
from itaclip_core.model import weights

SEGMENT = ["--classes", "cat, dog, sky", "--weights", "random-tiny", "--set", "stride=112", "--set", "pamr_steps=0",
           "--set", "short_side=112", "--set", "templates=notebooks/ci_templates.txt", "--no-progress"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(60, 80), (48, 48)]):
        path = tmp_path / f"img{i}.png"
        array = np.zeros((*size, 3), np.uint8)
        array[:, : size[1] // 2] = (200, 30, 30)
        array[:, size[1] // 2:] = (30, 30, 200)
        Image.fromarray(np.clip(array + rng.integers(0, 20, array.shape), 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_generate_is_resumable_and_skips_bad_images(images, tmp_path, capsys):
    out = tmp_path / "masks"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code = main(["masks", "generate", *map(str, images), str(bad), "--generator", "superpixels", "--out", str(out),
                 "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "generated masks for 2 image(s)" in captured.out and "skipped" in captured.err and "bad.png" in captured.err
    saved = np.load(out / "img0.npz")["masks"]
    assert saved.shape[1:] == (60, 80) and saved.dtype == np.bool_ and (saved.sum(axis=0) == 1).all()
    stamp = (out / "img0.npz").stat().st_mtime_ns
    (out / "img1.npz").write_bytes(b"torn")  # a torn file is generated again, a whole one is kept
    assert main(["masks", "generate", *map(str, images), "--generator", "superpixels", "--out", str(out),
                 "--no-progress"]) == 0
    assert "1 already there" in capsys.readouterr().out
    assert (out / "img0.npz").stat().st_mtime_ns == stamp
    assert np.load(out / "img1.npz")["masks"].shape[1:] == (48, 48)


def test_segment_with_a_mask_folder_votes_and_keeps_finished_images(images, tmp_path, capsys):
    folder = tmp_path / "masks"
    assert main(["masks", "generate", str(images[0]), "--generator", "superpixels", "--format", "png",
                 "--out", str(folder), "--no-progress"]) == 0
    regions = np.asarray(Image.open(folder / "img0.png")).astype(np.int64)
    out = tmp_path / "out"
    code = main(["segment", *map(str, images), "--masks", str(folder), "--mask-use", "vote", "--draw-masks",
                 "--out", str(out), *SEGMENT])
    assert code == 1  # img1 has no masks in the folder: reported and skipped, img0 is done
    err = capsys.readouterr().err
    assert "img1" in err and "no masks for image" in err and "Traceback" not in err
    labels = np.asarray(Image.open(out / "img0_labels.png"))
    for region in np.unique(regions[regions > 0]):
        assert len(np.unique(labels[regions == region])) == 1
    assert (out / "img0_overlay.png").is_file() and not (out / "img1_labels.png").exists()


@pytest.mark.parametrize("generator", ["sam", "sam2"])
def test_generate_and_segment_with_tiny_random_sam_models(generator, images, tmp_path, capsys):
    pytest.importorskip("segment_anything" if generator == "sam" else "sam2",
                        reason=f"the {generator} extra is not installed")
    out = tmp_path / "masks"
    code = main(["masks", "generate", str(images[1]), "--generator", generator, "--checkpoint", "random-tiny",
                 "--set", "points_per_side=4", "--set", "pred_iou_thresh=0", "--set", "stability_score_thresh=0",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0 and (out / "img1.npz").is_file()
    code = main(["segment", str(images[1]), "--masks", generator, "--set", "mask_checkpoint=random-tiny",
                 "--set", "mask_generator_args=points_per_side=4,pred_iou_thresh=0", "--mask-use", "attention",
                 "--out", str(tmp_path / "out"), *SEGMENT])
    assert code == 0 and (tmp_path / "out" / "img1_labels.png").is_file()


def test_proxy_from_the_cli(images, tmp_path):
    pytest.importorskip("timm", reason="the dino extra (timm) is not installed")
    code = main(["segment", str(images[0]), "--mask-use", "proxy", "--set", "proxy_checkpoint=random-tiny",
                 "--out", str(tmp_path / "out"), *SEGMENT])
    assert code == 0
    areas = json.loads((tmp_path / "out" / "img0_areas.json").read_text())
    assert sum(c["pixels"] for c in areas["classes"].values()) == 60 * 80


def test_missing_extra_offline_checkpoint_and_bad_settings_are_clear(images, tmp_path, capsys, monkeypatch):
    pytest.importorskip("segment_anything", reason="the sam extra is not installed")

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights, "urlopen", offline)
    code = main(["masks", "generate", *map(str, images), "--generator", "sam", "--out", str(tmp_path / "m"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "sam_vit_b_01ec64.pth" in err and "dl.fbaipublicfiles.com" in err and "put it at" in err
    code = main(["segment", str(images[0]), "--masks", "sam", "--out", str(tmp_path / "o"), *SEGMENT])
    err = capsys.readouterr().err
    assert code == 2 and "sam_vit_b_01ec64.pth" in err and "Traceback" not in err
    assert main(["segment", str(images[0]), "--set", "mask_vote=max", "--out", str(tmp_path / "o"), *SEGMENT]) == 2
    assert "mask_vote" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    assert main(["masks", "generate", str(images[0]), "--generator", "sam", "--out", str(tmp_path / "m")]) == 2
    assert "pip install 'itaclip-core[sam]'" in capsys.readouterr().err
    assert main(["segment", str(images[0]), "--masks", "sam", "--out", str(tmp_path / "o"), *SEGMENT]) == 2
    assert "itaclip-core[sam]" in capsys.readouterr().err


def test_eval_with_precomputed_masks_from_masks_generate(tmp_path, capsys):
    from itaclip_core.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset("voc21", tmp_path / "voc", num_images=2, sizes=((64, 80), (56, 72)), easy=True)
    folder = tmp_path / "masks"
    assert main(["masks", "generate", "--data-root", str(root), "--dataset", "voc21", "--generator", "superpixels",
                 "--out", str(folder), "--no-progress"]) == 0
    assert len(list(folder.glob("*.npz"))) == 2
    code = main(["eval", "--preset", "itaclip_voc21", "--data-root", str(root), "--weights", "random-tiny",
                 "--set", f"masks={folder}", "--set", "stride=112", "--set", "pamr_steps=0", "--set",
                 "short_side=112", "--set", "templates=notebooks/ci_templates.txt", "--workers", "0", "-q",
                 "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
