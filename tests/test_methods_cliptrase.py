"""CLIPtrase against the output of its official script (tiny reference CLIP, float32): dense features, block 11's
correlation, the centre crop, DBSCAN clusters, filtered cluster maps, assignment and votes; plus properties that must
hold for any input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from itaclip_core.methods.cliptrase import (
    CLIPtraseSettings,
    centre_crop_image,
    cliptrase_tokens,
    denoised_correlation,
    majority_vote,
    normalise_rgb,
    window_votes,
)

SETTINGS = {336: CLIPtraseSettings(eps=1.1, min_samples=7), 224: CLIPtraseSettings(eps=0.7, min_samples=3)}


@pytest.fixture(scope="module")
def dense_golden(golden_dir):
    return np.load(golden_dir / "methods" / "cliptrase_dense.npz")


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("key", ["224", "240x320"])
def test_dense_features_and_correlation_match_the_official_code(tiny_clip, golden_forward, dense_golden, key,
                                                                explicit):
    with torch.no_grad():
        tokens, matrix = cliptrase_tokens(tiny_clip.visual, golden_forward[f"image_{key}"], explicit=explicit)
    expected = torch.from_numpy(dense_golden[f"dense_{key}"])
    assert tokens.shape == expected.shape
    assert (tokens - expected).abs().max() < 1e-4
    assert (matrix - torch.from_numpy(dense_golden[f"attn11_{key}"])).abs().max() < 1e-4


@pytest.mark.parametrize("size", [336, 224])
def test_crop_and_discrete_steps_match_the_official_script(tiny_clip, golden_dir, size):
    golden = np.load(golden_dir / "methods" / f"cliptrase_voc21_{size}_synthetic.npz")
    crop = normalise_rgb(centre_crop_image(Image.open(golden_dir / "synthetic_300x420.png"), size))
    assert (crop - torch.from_numpy(golden["image_input"])).abs().max() < 1e-5
    with torch.no_grad():
        tokens, matrix = cliptrase_tokens(tiny_clip.visual, crop[None])
    assert (tokens[0] - torch.from_numpy(golden["enc_out"])).abs().max() < 1e-4
    assert (matrix[0] - torch.from_numpy(golden["attn11_raw"])).abs().max() < 1e-4
    rows_of_w = denoised_correlation(matrix[0])
    assert (rows_of_w - torch.from_numpy(golden["attn11_denoised"])).abs().max() < 1e-4
    # The vote from the official pre-vote labels, so that this test holds the discrete steps on their own.
    before = torch.from_numpy(golden["pred_before_vote"])
    voted, details = window_votes(rows_of_w, (size // 16, size // 16), before, SETTINGS[size])
    assert np.array_equal(details["dbscan_labels"], golden["dbscan_labels"])
    maps = details["cluster_maps"]
    assert maps.shape == golden["cluster_maps_filtered"].shape
    assert (maps - torch.from_numpy(golden["cluster_maps_filtered"])).abs().max() < 1e-4
    assert np.array_equal(details["assignment"].numpy(), golden["cluster_assign"])
    assert np.array_equal(voted.numpy(), golden["pred"])


def test_all_noise_keeps_the_labels():
    rows_of_w = torch.eye(9) * 10  # every point far from every other
    labels = torch.randint(0, 3, (12, 12))
    voted, details = window_votes(rows_of_w, (3, 3), labels, CLIPtraseSettings(eps=0.5, min_samples=2))
    assert details["cluster_maps"] is None and torch.equal(voted, labels)


def test_vote_ties_go_to_the_smallest_label_and_regions_are_independent():
    labels = torch.tensor([[2, 1, 5, 5], [1, 2, 5, 0]])
    assignment = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert majority_vote(labels, assignment, 2).tolist() == [[1, 1, 5, 5], [1, 1, 5, 5]]
    # A cluster that owns no pixel changes nothing.
    assert majority_vote(labels, torch.zeros_like(labels), 3).unique().tolist() == [5]


def test_centre_crop_of_portrait_and_landscape_images():
    portrait = Image.new("RGB", (100, 250), (10, 20, 30))
    assert centre_crop_image(portrait, 64).size == (64, 64)
    landscape = Image.fromarray(np.arange(50 * 80 * 3, dtype=np.uint8).reshape(50, 80, 3) % 251)
    crop = centre_crop_image(landscape, 50)  # no resize: only the crop, (80 - 50) / 2 = 15 columns off the left
    assert np.array_equal(np.asarray(crop), np.asarray(landscape)[:, 15:65])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="eps"):
        CLIPtraseSettings(eps=0).check()
    with pytest.raises(ValueError, match="min_samples"):
        CLIPtraseSettings(min_samples=0).check()


# ------------------------------------------------------------------------------------------------ whole pipeline
SCRIPT_ORDER = "class_names/cliptrase/script_order/cls_voc21.txt"


def _segmentor(tiny_clip, preset: str, *overrides: str):
    from itaclip_core.presets import apply_overrides, get_preset
    from itaclip_core.segmentor import Segmentor

    # The script's order puts the background words on the last line: class 0 is no background class there.
    settings = [f"classes={SCRIPT_ORDER}", "background=false", *overrides]
    return Segmentor(tiny_clip, apply_overrides(get_preset(preset), settings),
                     cache_dir=None)


@pytest.mark.parametrize("size", [336, 224])
def test_voc21_presets_reproduce_the_official_script(tiny_clip, golden_dir, size):
    golden = np.load(golden_dir / "methods" / f"cliptrase_voc21_{size}_synthetic.npz")
    segmentor = _segmentor(tiny_clip, "cliptrase_voc21" if size == 336 else "cliptrase_voc21_224")
    assert np.abs(segmentor.classifier.features.numpy() - golden["text_features"]).max() < 1e-5
    image = golden_dir / "synthetic_300x420.png"
    prepared = segmentor.prepare(image)
    assert prepared.original_size == (size, size)
    assert (prepared.tensor - torch.from_numpy(golden["image_input"])).abs().max() < 1e-5
    # The script's scores: the model's logit scale times the cosine, the maximum over each class's words.
    logits = segmentor.query_logits(prepared) * tiny_clip.logit_scale.exp()
    index = segmentor.classifier.query_to_class
    scores = torch.stack([logits[index == c].max(dim=0).values for c in range(21)])
    assert (scores - torch.from_numpy(golden["logits"])).abs().max() < 1e-4
    prediction = segmentor.predict(image)
    assert prediction.labels.shape == prediction.probs.shape[1:] == (size, size)
    assert np.array_equal(prediction.probs.argmax(axis=0), golden["pred_before_vote"])
    assert (prediction.labels == golden["pred"]).mean() >= 0.9999
    assert prediction.class_names[20] == "background" and prediction.class_names[0] == "aeroplane"


def test_benchmark_order_puts_background_first(tiny_clip, golden_dir):
    from itaclip_core.segmentor import Segmentor

    golden = np.load(golden_dir / "methods" / "cliptrase_voc21_224_synthetic.npz")
    prediction = Segmentor(tiny_clip, "cliptrase_voc21_224", cache_dir=None).predict(
        golden_dir / "synthetic_300x420.png")
    assert prediction.class_names[0] == "background"
    expected = np.where(golden["pred"] == 20, 0, golden["pred"] + 1)  # the same map in the benchmark's order
    assert (prediction.labels == expected).mean() >= 0.9999


def test_the_straightforward_route_gives_the_same_labels(tiny_clip, golden_dir):
    from itaclip_core.methods.straightforward_scclip_cliptrase import cliptrase_predict

    golden = np.load(golden_dir / "methods" / "cliptrase_voc21_224_synthetic.npz")
    segmentor = _segmentor(tiny_clip, "cliptrase_voc21_224")
    prepared = segmentor.prepare(golden_dir / "synthetic_300x420.png")
    probs, labels = cliptrase_predict(tiny_clip, prepared.tensor, prepared.original_size, segmentor.classifier,
                                      segmentor.config)
    assert (labels == golden["pred"]).mean() >= 0.9999
    assert np.abs(probs.numpy() - segmentor.predict(golden_dir / "synthetic_300x420.png").probs).max() < 1e-4


def test_standard_protocol_runs_windows_at_the_original_size(tiny_clip, golden_dir):
    from itaclip_core.methods.straightforward_scclip_cliptrase import cliptrase_predict

    segmentor = _segmentor(tiny_clip, "cliptrase_voc21_224", "protocol=standard")
    prepared = segmentor.prepare(golden_dir / "synthetic_300x420.png")
    assert prepared.original_size == (300, 420) and len(segmentor.engine.windows(*prepared.tensor.shape[-2:])) > 1
    prediction = segmentor.predict_prepared(prepared)
    assert prediction.labels.shape == (300, 420)
    _, labels = cliptrase_predict(tiny_clip, prepared.tensor, prepared.original_size, segmentor.classifier,
                                  segmentor.config)
    assert (prediction.labels == labels).mean() >= 0.9999
    # The vote changes the stitched argmax somewhere but only to labels some window voted for.
    before = prediction.probs.argmax(axis=0)
    assert set(np.unique(prediction.labels)) <= set(np.unique(before))


def test_vote_over_overlapping_windows_takes_the_majority():
    from itaclip_core.inference.sliding import Window
    from itaclip_core.methods.cliptrase import vote_on_windows

    labels = torch.tensor([[1, 2, 2, 3]])
    one = torch.ones(1, 4, 4)  # a single cluster covering its window
    windows = [Window(0, 1, 0, 2), Window(0, 1, 1, 3), Window(0, 1, 1, 4)]
    voted = vote_on_windows(labels, windows, [one, one, None], (1, 4))
    # Window 0 votes 1 on [0, 2) (tie 1/2 goes to 1); window 1 votes 2 on [1, 3); window 2 keeps [2, 2, 3].
    # Pixel 1: votes 1, 2, 2 -> 2. Pixel 2: votes 2, 2 -> 2. Pixel 3: only window 2 -> 3.
    assert voted.tolist() == [[1, 2, 2, 3]]
    voted = vote_on_windows(torch.tensor([[1, 2, 5, 5]]), windows[:1], [one], (1, 4))
    assert voted.tolist() == [[1, 1, 5, 5]]


def test_centre_crop_is_only_for_cliptrase_and_protocols_are_checked(tiny_clip):
    from itaclip_core.presets import apply_overrides, get_preset
    from itaclip_core.segmentor import Segmentor

    with pytest.raises(ValueError, match="protocol must be one of standard, centre_crop"):
        Segmentor(tiny_clip, apply_overrides(get_preset("cliptrase_voc21"), ["protocol=crop"]), cache_dir=None)
    with pytest.raises(ValueError, match="centre_crop is CLIPtrase's"):
        Segmentor(tiny_clip, apply_overrides(get_preset("sclip_voc21"), ["protocol=centre_crop"]), cache_dir=None)
    with pytest.raises(ValueError, match="eps"):
        Segmentor(tiny_clip, apply_overrides(get_preset("cliptrase_voc21"), ["cliptrase_eps=0"]), cache_dir=None)


def test_voc20_multiplies_by_the_class_token_scores(tiny_clip, golden_dir):
    from itaclip_core.methods.cliptrase import window_logits_and_clusters

    crop = normalise_rgb(centre_crop_image(Image.open(golden_dir / "synthetic_300x420.png"), 224))[None]
    text = F.normalize(torch.randn(5, tiny_clip.visual.output_dim), dim=-1)
    with torch.no_grad():
        plain, _ = window_logits_and_clusters(tiny_clip.visual, crop, text, CLIPtraseSettings(0.7, 3), 100.0)
        weighted, _ = window_logits_and_clusters(tiny_clip.visual, crop, text,
                                                 CLIPtraseSettings(0.7, 3, cls_weighting=True), 100.0)
        tokens, _ = cliptrase_tokens(tiny_clip.visual, crop)
    cls_scores = 100.0 * F.normalize(tokens[0, 0], dim=-1) @ text.T  # (5,)
    assert torch.allclose(weighted[0], plain[0] * cls_scores[:, None, None], atol=1e-5)


def test_ground_truth_is_cropped_like_the_image():
    from itaclip_core.methods.cliptrase import crop_label_map

    labels = np.repeat(np.arange(10, dtype=np.int64)[None], 4, axis=0)  # 4 x 10, column index as the label
    cropped = crop_label_map(labels, 4)  # no resize (short side 4), centre crop: columns 3 .. 6
    assert cropped.tolist() == [[3, 4, 5, 6]] * 4 and cropped.dtype == labels.dtype


def test_evaluation_scores_the_crop_against_the_cropped_labels(tiny_clip, tmp_path):
    from itaclip_core.data import get_dataset
    from itaclip_core.data.synthetic import make_synthetic_dataset
    from itaclip_core.evaluation import EvalOptions, evaluate
    from itaclip_core.metrics import IoUAccumulator
    from itaclip_core.presets import apply_overrides, get_preset
    from itaclip_core.methods.cliptrase import crop_label_map
    from itaclip_core.segmentor import Segmentor

    root = make_synthetic_dataset("voc21", tmp_path / "voc", num_images=2, sizes=((120, 160), (150, 100)), easy=True)
    dataset = get_dataset("voc21", root)
    config = apply_overrides(get_preset("cliptrase_voc21_224"), ["templates=notebooks/ci_templates.txt"])
    segmentor = Segmentor(tiny_clip, config, cache_dir=None)
    options = EvalOptions(out_dir=tmp_path / "run", preset=config.name, weights_id=tiny_clip.weights_id, workers=0,
                          progress=False, save_vis=1)
    results = evaluate(segmentor, dataset, options)
    expected = IoUAccumulator(dataset.num_classes)
    for index, sample in enumerate(dataset.samples):
        labels = segmentor.predict(sample.image_path).labels
        assert labels.shape == (224, 224)
        expected.update(labels, crop_label_map(dataset.load_label(index), 224))
    assert results["counts"] == expected.results()["counts"] and results["num_images"] == 2
    assert (tmp_path / "run" / "vis").is_dir()
