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
