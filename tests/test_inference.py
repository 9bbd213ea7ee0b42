"""Sliding windows, image engineering and the batched engine against the straightforward algorithm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itaclip_core import reference
from itaclip_core.attention import DENSE_METHODS
from itaclip_core.inference.engine import DenseInference
from itaclip_core.inference.sliding import bilinear_matrix, sliding_windows, stitch, window_starts
from itaclip_core.inference.views import make_views, mix_views


def test_window_grid_follows_the_protocol():
    assert window_starts(470, 224, 28) == [(min(i * 28, 246), min(i * 28, 246) + 224) for i in range(10)]
    assert window_starts(336, 224, 28)[-1] == (112, 336)
    assert window_starts(100, 224, 28) == [(0, 100)]  # smaller than a crop: processed whole
    assert window_starts(224, 224, 112) == [(0, 224)]
    assert len(sliding_windows(336, 470, 224, 28)) == 50
    with pytest.raises(ValueError):
        window_starts(100, 224, 0)


@pytest.mark.parametrize("out_size,in_size", [(224, 14), (100, 6), (375, 336), (336, 375), (9, 9), (1000, 14)])
def test_bilinear_matrix_equals_torch_interpolate(out_size, in_size):
    x = torch.randn(2, 3, in_size, 5)
    expected = F.interpolate(x, size=(out_size, 5), mode="bilinear")
    got = torch.einsum("oi,bcij->bcoj", bilinear_matrix(out_size, in_size, torch.float32), x)
    assert (got - expected).abs().max().item() < 5e-6


@pytest.mark.parametrize(
    "resized,original,crop,stride",
    [((336, 470), (300, 420), 224, 28), ((336, 448), (480, 640), 224, 112), ((100, 80), (100, 80), 224, 28),
     ((205, 2048), (100, 1000), 224, 28)],
)
def test_stitch_equals_upsample_place_average_upsample(resized, original, crop, stride):
    torch.manual_seed(0)
    windows = sliding_windows(*resized, crop, stride)
    height, width = min(crop, resized[0]), min(crop, resized[1])
    rows, cols = height // 16, width // 16
    logits = torch.randn(len(windows), 4, rows, cols)
    canvas = torch.zeros(1, 4, *resized)
    count = torch.zeros(1, 1, *resized)
    for w, patch in zip(windows, logits):
        canvas[:, :, w.y1 : w.y2, w.x1 : w.x2] += F.interpolate(patch[None], size=(w.y2 - w.y1, w.x2 - w.x1),
                                                                 mode="bilinear")
        count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    expected = F.interpolate(canvas / count, size=original, mode="bilinear")[0]
    got = stitch(logits, windows, resized, original)
    assert got.shape == (4, *original)
    assert (got - expected).abs().max().item() < 1e-5


def test_view_mixing_on_patches_equals_mixing_upsampled_logits():
    """Mixing flipped features on the patch grid, then projecting and upsampling once, is the published mix."""
    torch.manual_seed(0)
    features = F.normalize(torch.randn(5, 2, 6, 5, 8), dim=-1)
    text = torch.randn(3, 8)
    mixed = mix_views(features, 0.7) @ text.T  # (2, 6, 5, 3)
    ours = F.interpolate(mixed.permute(0, 3, 1, 2), size=(100, 83), mode="bilinear")

    def up(f):
        return F.interpolate((f @ text.T).permute(0, 3, 1, 2), size=(100, 83), mode="bilinear")

    first = up(features[:3].mean(0))
    flipped = (torch.flip(up(features[3]), dims=[-2]) + torch.flip(up(features[4]), dims=[-1])) / 2
    assert (ours - (0.7 * first + 0.3 * flipped)).abs().max().item() < 1e-5


def test_views_are_ordered_and_flipped():
    crops = torch.randn(2, 3, 32, 48)
    views = make_views(crops).view(5, 2, 3, 32, 48)
    assert torch.equal(views[0], crops)
    assert torch.equal(views[3], torch.flip(crops, dims=[-2])) and torch.equal(views[4], torch.flip(crops, dims=[-1]))
    assert torch.equal(views[1][:, 0], views[1][:, 2])  # gray replicated
    assert torch.equal(make_views(crops, image_engineering=False), crops)


@pytest.mark.parametrize("image_engineering", [True, False])
def test_batched_engine_equals_one_window_one_view_at_a_time(tiny_clip, image_engineering):
    from itaclip_core.presets import get_preset

    config = get_preset("itaclip_voc21").replace(stride=112, image_engineering=image_engineering)
    torch.manual_seed(0)
    image = torch.randn(3, 240, 300)
    text = F.normalize(torch.randn(5, 64), dim=-1)
    engine = DenseInference(tiny_clip, DENSE_METHODS["itaclip"], crop=224, stride=112,
                            image_engineering=image_engineering, img_eng_coef=0.7, batch_size=7)
    fast = engine.logits(image, text, (200, 260))
    slow = reference.image_logits(tiny_clip, image, text, config, (200, 260))
    assert fast.shape == (5, 200, 260)
    assert (fast - slow).abs().max().item() < 1e-5


def test_batch_size_does_not_change_the_result(tiny_clip):
    torch.manual_seed(1)
    image = torch.randn(3, 230, 250)
    text = F.normalize(torch.randn(4, 64), dim=-1)
    results = [
        DenseInference(tiny_clip, DENSE_METHODS["itaclip"], stride=56, batch_size=b).logits(image, text, (230, 250))
        for b in (1, 9, 64)
    ]
    assert (results[0] - results[1]).abs().max().item() < 1e-5
    assert (results[0] - results[2]).abs().max().item() < 1e-5
