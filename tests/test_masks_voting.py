"""Partition and votes on hand-built masks with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itaclip_core.masks import (MaskError, MaskSet, as_mask_set, partition, vote_features, vote_logits, vote_mode,
                                vote_probs)


def _masks(*boxes, size=(4, 6)):
    """Boolean masks from (y1, y2, x1, x2) boxes."""
    out = np.zeros((len(boxes), *size), dtype=bool)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        out[i, y1:y2, x1:x2] = True
    return out


# A 4 x 6 image: mask 0 = the left half (12 px), mask 1 = a 2 x 2 square inside it (4 px), mask 2 = the top right
# 2 x 3 corner (6 px). The bottom right 2 x 3 is uncovered.
BOXES = [(0, 4, 0, 3), (1, 3, 1, 3), (0, 2, 3, 6)]


def test_small_on_top_keeps_the_small_mask_inside_the_large_one():
    regions = partition(_masks(*BOXES), "small_on_top")
    expected = np.array([
        [1, 1, 1, 3, 3, 3],
        [1, 2, 2, 3, 3, 3],
        [1, 2, 2, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
    ])
    assert np.array_equal(regions, expected)


def test_large_on_top_lets_the_large_mask_swallow_the_small_one():
    regions = partition(_masks(*BOXES), "large_on_top")
    expected = np.array([
        [1, 1, 1, 3, 3, 3],
        [1, 1, 1, 3, 3, 3],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
    ])
    assert np.array_equal(regions, expected)


def test_score_order_puts_the_best_scored_mask_on_top():
    masks = MaskSet(_masks(*BOXES), scores=np.array([0.9, 0.2, 0.5], dtype=np.float32))
    regions = partition(masks, "score")
    assert (regions[1:3, 1:3] == 1).all()  # mask 0 (0.9) painted last over mask 1 (0.2)
    low_first = partition(masks, "score", scores=np.array([0.1, 0.2, 0.5]))
    assert (low_first[1:3, 1:3] == 2).all()
    with pytest.raises(MaskError, match="score"):
        partition(_masks(*BOXES), "score")


def test_min_area_and_empty_masks_are_left_out():
    masks = np.concatenate([_masks(*BOXES), np.zeros((1, 4, 6), dtype=bool)])
    regions = partition(masks, "small_on_top", min_area=5)
    assert set(np.unique(regions)) == {0, 1, 3}  # the 4-px mask and the empty one are not painted
    assert (regions[1:3, 1:3] == 1).all()
    assert np.array_equal(partition(np.zeros((0, 4, 6), dtype=bool)), np.zeros((4, 6), dtype=np.int64))


def test_equal_areas_keep_the_masks_order():
    masks = _masks((0, 2, 0, 2), (1, 3, 1, 3))  # same area, overlapping at (1, 1)
    assert partition(masks, "small_on_top")[1, 1] == 2
    assert partition(masks, "large_on_top")[1, 1] == 2


def test_mode_vote_with_ties_to_the_lower_class_and_uncovered_pixels_kept():
    labels = np.array([
        [2, 2, 0, 5, 5, 1],
        [3, 1, 1, 4, 4, 1],
        [3, 2, 2, 7, 8, 9],
        [3, 3, 0, 6, 6, 6],
    ])
    regions = partition(_masks(*BOXES), "small_on_top")
    voted = vote_mode(labels, regions)
    # Region 1 (left half outside the square): labels 2,2,0,3,3,3,3,0 -> 3 (four votes).
    # Region 2 (the square): labels 1,1,2,2 -> a tie between 1 and 2 -> 1.
    # Region 3 (top right): 5,5,1,4,4,1 -> a three-way tie between 1, 4, 5 -> 1.
    expected = np.array([
        [3, 3, 3, 1, 1, 1],
        [3, 1, 1, 1, 1, 1],
        [3, 1, 1, 7, 8, 9],
        [3, 3, 3, 6, 6, 6],
    ])
    assert np.array_equal(voted, expected)


def test_a_mask_covering_everything_gives_one_label():
    labels = np.array([[0, 1, 1], [2, 1, 0]])
    voted = vote_mode(labels, partition(np.ones((1, 2, 3), dtype=bool)))
    assert np.array_equal(voted, np.ones((2, 3), dtype=np.int64))


def test_no_masks_change_nothing():
    labels = np.array([[0, 1, 1], [2, 1, 0]])
    regions = partition(np.zeros((2, 2, 3), dtype=bool))
    assert np.array_equal(vote_mode(labels, regions), labels)
    probs = torch.rand(3, 2, 3)
    assert np.array_equal(vote_probs(labels, regions, probs), labels)


def test_probability_vote_takes_the_argmax_of_the_mean():
    # Two pixels in one region: class 0 has 0.6 and 0.0 (mean 0.3), class 1 has 0.4 and 0.5 (mean 0.45).
    # The mode of the pixel argmaxes would tie (0 and 1) and give 0; the mean gives 1.
    probs = torch.tensor([[[0.6, 0.0, 0.9]], [[0.4, 0.5, 0.05]], [[0.0, 0.5, 0.05]]])  # (3, 1, 3)
    labels = np.array([[0, 1, 0]])
    regions = np.array([[1, 1, 0]])
    assert np.array_equal(vote_mode(labels, regions), [[0, 0, 0]])
    assert np.array_equal(vote_probs(labels, regions, probs), [[1, 1, 0]])
    # Below the threshold (top mean 0.45 < 0.5) the region becomes class 0.
    assert np.array_equal(vote_probs(np.array([[2, 2, 2]]), regions, probs, prob_thd=0.5), [[0, 0, 2]])
    # An exact tie of means goes to the lower class.
    tie = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    assert np.array_equal(vote_probs(np.array([[1, 1]]), np.array([[1, 1]]), tie), [[0, 0]])


def test_feature_vote_is_the_mean_normalised_feature_against_the_text():
    # Pixel features (D=2): (10, 0) and (0, 1). Normalised: (1, 0) and (0, 1); mean (0.5, 0.5).
    # Text queries: q0 = (1, 0) (class 0), q1 = (0.6, 0.8) (class 1), q2 = (0, 1) (class 1 too).
    # Scores of the mean: q0 0.5, q1 0.7, q2 0.5 -> class 1 (best variant q1).
    # Without normalising, the mean (5, 0.5) would pick class 0 (5 > 3.4): the normalisation matters.
    features = torch.tensor([[[10.0, 0.0]], [[0.0, 1.0]]])  # (D=2, 1, 2)
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([[0, 0]])
    regions = np.array([[1, 1]])
    assert np.array_equal(vote_features(labels, regions, features, text, query_to_class=[0, 1, 1]), [[1, 1]])
    # Only class 0 allowed (the area threshold removed class 1).
    assert np.array_equal(vote_features(labels, regions, features, text, [0, 1, 1],
                                        allowed=torch.tensor([True, False])), [[0, 0]])
    # vote_logits takes the per-pixel similarities: the normalised features' products with the text.
    logits = torch.einsum("dhw,qd->qhw", torch.nn.functional.normalize(features, dim=0), text)
    assert np.array_equal(vote_logits(labels, regions, logits, [0, 1, 1]), [[1, 1]])


def test_mask_inputs_and_their_errors():
    masks = _masks(*BOXES)
    label_map = np.array([[0, 4, 4], [9, 9, 0]])
    converted = as_mask_set(label_map)
    assert len(converted) == 2 and converted.masks[0].sum() == 2 and converted.masks[1].sum() == 2
    records = [{"segmentation": m, "predicted_iou": 0.5, "stability_score": 0.8} for m in masks]
    from_records = as_mask_set(records)
    assert np.array_equal(from_records.masks, masks) and np.allclose(from_records.scores, 0.4)
    assert len(as_mask_set(masks.astype(np.uint8))) == 3
    with pytest.raises(MaskError, match="4x6.*image is 5x6"):
        as_mask_set(masks, (5, 6))
    with pytest.raises(MaskError, match="empty"):
        as_mask_set(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(MaskError, match="empty"):
        as_mask_set([])
    with pytest.raises(MaskError, match="boolean"):
        as_mask_set(np.full((1, 2, 2), 3))
    with pytest.raises(MaskError, match="segmentation"):
        as_mask_set([{"area": 3}])


def test_outlines_mark_the_pixels_before_each_region_change():
    from itaclip_core.vis import draw_outlines, outline_mask, overlay

    regions = np.array([[1, 1, 2], [1, 1, 2], [0, 0, 0]])
    expected = np.array([[False, True, False], [True, True, True], [False, False, False]])
    assert np.array_equal(outline_mask(regions), expected)
    image = np.zeros((3, 3, 3), dtype=np.uint8)
    drawn = draw_outlines(image, regions, colour=(255, 0, 0))
    assert (drawn[expected] == (255, 0, 0)).all() and (drawn[~expected] == 0).all()
    plain = overlay(image, np.zeros((3, 3), dtype=np.int64), ["a"], legend=False)
    outlined = overlay(image, np.zeros((3, 3), dtype=np.int64), ["a"], legend=False, outlines=regions)
    assert (outlined[expected] == 255).all() and np.array_equal(outlined[~expected], plain[~expected])
