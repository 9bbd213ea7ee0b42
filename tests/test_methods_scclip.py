"""SC-CLIP against the output of its official code (tiny reference CLIP, float32): dense features, anomaly picks,
repaired tokens, affinities; the whole VOC21 pipeline; and properties that must hold for any weights and sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itaclip_core.methods.scclip import (
    SCCLIPSettings,
    detect_outliers,
    lof_scores,
    repair_tokens,
    scclip_tokens,
)

CASES = [("224", lambda g: g["image_224"]), ("240x240", lambda g: g["image_240x320"][..., :240])]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "methods" / "scclip_dense.npz")


def _grid(tokens: torch.Tensor) -> torch.Tensor:
    batch, count, channels = tokens.shape
    side = int(round(count**0.5))
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("key,image", CASES, ids=[c[0] for c in CASES])
def test_dense_features_and_steps_match_the_official_code(tiny_clip, golden_forward, golden, key, image, explicit):
    inter: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = scclip_tokens(tiny_clip.visual, image(golden_forward), explicit=explicit, intermediates=inter)
    expected = torch.from_numpy(golden[f"dense_{key}"])
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() < 1e-4
    assert np.array_equal(inter["outlier_mask"].numpy(), golden[f"outlier_mask_{key}"])
    assert golden[f"outlier_mask_{key}"].any()
    assert (inter["outlier_scores"] - torch.from_numpy(golden[f"lof_scores_{key}"])).abs().max() < 1e-4
    assert (_grid(inter["repaired"]) - torch.from_numpy(golden[f"x11_fixed_{key}"])).abs().max() < 1e-4
    assert (inter["affinity_mid"] - torch.from_numpy(golden[f"affinity_mid_{key}"])).abs().max() < 1e-4
    assert (inter["affinity_post"] - torch.from_numpy(golden[f"affinity_post_{key}"])).abs().max() < 1e-4


def test_batched_images_give_each_image_its_own_result(tiny_clip, golden_forward):
    images = torch.cat([golden_forward["image_224"], golden_forward["image_224"].flip(-1)])
    with torch.no_grad():
        together = scclip_tokens(tiny_clip.visual, images)
        alone = torch.cat([scclip_tokens(tiny_clip.visual, images[i : i + 1]) for i in range(len(images))])
    assert (together - alone).abs().max() < 1e-5


def _naive_lof(x: torch.Tensor, k: int) -> torch.Tensor:
    """LOF with the textbook reach distance max(kdist(o), d(p, o)) replaced as the official code does."""
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    order = d.argsort(dim=1)[:, 1 : k + 1]
    knn = torch.gather(d, 1, order)
    kdist = knn[:, -1]
    lrd = k / kdist
    return (lrd[order] / lrd[:, None]).mean(1)


def test_lof_scores_for_any_points():
    torch.manual_seed(3)
    points = torch.randn(2, 40, 5, dtype=torch.float64)
    points[0, 7] *= 8  # a clear outlier
    scores = lof_scores(points, 6)
    for b in range(2):
        assert torch.allclose(scores[b], _naive_lof(points[b], 6))
    mask, _ = detect_outliers(points, SCCLIPSettings(lof_neighbors=6, contamination=0.05))
    assert mask[0, 7] and mask.sum(dim=1).tolist() == [2, 2]  # 40 points, 0.95 quantile: two above it


def test_l2norm_detector_picks_the_largest_norms():
    torch.manual_seed(4)
    tokens = torch.randn(1, 30, 4)
    mask, norms = detect_outliers(tokens, SCCLIPSettings(detector="l2norm", top_norms=3))
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == set(norms[0].topk(3).indices.tolist())


def test_repair_on_a_non_square_grid_uses_row_major_neighbours():
    rows, cols = 3, 5
    tokens = torch.arange(rows * cols, dtype=torch.float32).view(1, -1, 1)
    mask = torch.zeros(1, rows * cols, dtype=torch.bool)
    mask[0, 1 * cols + 4] = True  # row 1, last column
    mask[0, 0] = True
    out = repair_tokens(tokens, mask, rows, cols)[0, :, 0]
    # (1, 4)'s neighbours: (0, 3), (0, 4), (1, 3), (2, 3), (2, 4) -> 3, 4, 8, 13, 14
    assert out[1 * cols + 4] == pytest.approx((3 + 4 + 8 + 13 + 14) / 5)
    # (0, 0)'s unmasked neighbours: (0, 1), (1, 0), (1, 1) -> 1, 5, 6
    assert out[0] == pytest.approx(4.0)
    assert torch.equal(out[~mask[0]], tokens[0, ~mask[0], 0])


def test_an_isolated_outlier_is_kept():
    tokens = torch.randn(1, 4, 3)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(repair_tokens(tokens, mask, 2, 2), tokens)


def test_non_square_images_run_and_block_numbers_are_checked(tiny_clip):
    images = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        out = scclip_tokens(tiny_clip.visual, images)
    assert out.shape == (1, 6 * 10, tiny_clip.visual.output_dim) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multi_blocks"):
        scclip_tokens(tiny_clip.visual, images, SCCLIPSettings(multi_blocks=(4, 12)))
    with pytest.raises(ValueError, match="detector"):
        scclip_tokens(tiny_clip.visual, images, SCCLIPSettings(detector="iforest"))
    with pytest.raises(ValueError, match="lof_neighbors"):
        scclip_tokens(tiny_clip.visual, torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------------ whole pipeline
@pytest.fixture(scope="module")
def pipeline_golden(golden_dir):
    return np.load(golden_dir / "methods" / "scclip_voc21_synthetic.npz")


@pytest.fixture(scope="module")
def segmentor(tiny_clip):
    from itaclip_core.segmentor import Segmentor

    return Segmentor(tiny_clip, "scclip_voc21", cache_dir=None)


def test_voc21_pipeline_matches_the_official_code(segmentor, golden_dir, pipeline_golden):
    assert np.abs(segmentor.classifier.features.numpy() - pipeline_golden["query_features"]).max() < 1e-5
    windows = segmentor.engine.windows(*segmentor.prepare(golden_dir / "synthetic_300x420.png").tensor.shape[-2:])
    assert [[w.y1, w.y2, w.x1, w.x2] for w in windows] == pipeline_golden["crop_boxes"].tolist()
    prediction = segmentor.predict(golden_dir / "synthetic_300x420.png")
    assert prediction.probs.shape == pipeline_golden["logits"].shape == (21, 300, 420)
    assert np.abs(prediction.probs - pipeline_golden["logits"]).max() < 1e-4
    assert (prediction.labels == pipeline_golden["pred"]).mean() >= 0.9999


def test_every_window_takes_the_official_steps(segmentor, golden_dir, pipeline_golden, tiny_clip):
    prepared = segmentor.prepare(golden_dir / "synthetic_300x420.png")
    boxes = pipeline_golden["crop_boxes"]
    crops = torch.stack([prepared.tensor[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    inter: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = scclip_tokens(tiny_clip.visual, crops, intermediates=inter)
    assert (out - torch.from_numpy(pipeline_golden["enc_out"])).abs().max() < 1e-4
    assert np.array_equal(inter["outlier_mask"].numpy(), pipeline_golden["outlier_mask"])
    assert (inter["outlier_scores"] - torch.from_numpy(pipeline_golden["lof_scores"])).abs().max() < 1e-4
    assert (_grid(inter["repaired"]) - torch.from_numpy(pipeline_golden["x11_fixed"])).abs().max() < 1e-4
    for key in ("affinity_mid", "affinity_pre", "affinity_post"):
        assert (inter[key] - torch.from_numpy(pipeline_golden[key])).abs().max() < 1e-4, key


def test_the_straightforward_route_gives_the_same_numbers(segmentor, golden_dir, pipeline_golden, tiny_clip):
    from itaclip_core.methods.straightforward_scclip_cliptrase import scclip_predict

    prepared = segmentor.prepare(golden_dir / "synthetic_300x420.png")
    probs, labels = scclip_predict(tiny_clip, prepared.tensor, prepared.original_size, segmentor.classifier,
                                   segmentor.config)
    assert np.abs(probs.numpy() - pipeline_golden["logits"]).max() < 1e-4
    assert (labels == pipeline_golden["pred"]).mean() >= 0.9999


def test_the_l2norm_detector_preset_option_runs_and_differs(tiny_clip, golden_dir, pipeline_golden):
    from itaclip_core.presets import apply_overrides, get_preset
    from itaclip_core.segmentor import Segmentor

    config = apply_overrides(get_preset("scclip_voc21"), ["scclip_detector=l2norm"])
    prediction = Segmentor(tiny_clip, config, cache_dir=None).predict(golden_dir / "synthetic_300x420.png")
    assert prediction.probs.shape == (21, 300, 420) and np.isfinite(prediction.probs).all()
    assert np.abs(prediction.probs - pipeline_golden["logits"]).max() > 1e-4


@pytest.mark.parametrize("override,match", [("scclip_detector=iforest", "scclip_detector"),
                                            ("scclip_blocks=9,4,4", "scclip_blocks"),
                                            ("scclip_blocks=9,4,4,12", "multi_blocks")])
def test_bad_settings_are_refused_before_any_work(tiny_clip, override, match):
    from itaclip_core.presets import apply_overrides, get_preset
    from itaclip_core.segmentor import Segmentor

    with pytest.raises(ValueError, match=match):
        Segmentor(tiny_clip, apply_overrides(get_preset("scclip_voc21"), [override]), cache_dir=None)
