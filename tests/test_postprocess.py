"""Post-processing against a dense one-hot formulation, hand-built thresholds and closings, and the golden run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from itaclip_core.postprocess import (
    area_threshold,
    class_probabilities,
    close_labels,
    kept_classes,
    labels_from_probs,
    postprocess,
)

GOLDEN = Path(__file__).parent / "golden" / "itaclip_voc21_synthetic.npz"
QUERY_TO_CLASS = [0, 3, 1, 4, 2, 3, 0, 1, 4, 3, 2]  # 11 queries, 5 classes, variants interleaved


def dense_reference(logits, query_to_class, scale, prob_thd, area_thd, num_classes):
    """Every step on full tensors: a (K, Q, H, W) one-hot product for the variant maximum."""
    q = torch.softmax(logits * scale, dim=0)  # (Q, H, W)
    member = torch.zeros(num_classes, len(query_to_class))
    member[torch.tensor(query_to_class), torch.arange(len(query_to_class))] = 1.0
    probs = (member[:, :, None, None] * q[None]).amax(dim=1)  # (K, Q, H, W) -> (K, H, W)
    if area_thd is not None:
        winners = torch.nn.functional.one_hot(probs.argmax(dim=0), num_classes)  # (H, W, K)
        area = winners.sum(dim=(0, 1)).float()  # (K,)
        survive = (area[1:] > area_thd * area[1:].sum()).float()
        probs = torch.cat([probs[:1], probs[1:] * survive[:, None, None]])
    labels = probs.argmax(dim=0)
    labels = torch.where(probs.amax(dim=0) < prob_thd, torch.zeros_like(labels), labels)
    return probs, labels


def _similarities(seed: int, queries: int = 11, height: int = 23, width: int = 31) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = 0.2 + 0.05 * torch.randn(queries, height, width, generator=generator)
    if queries == len(QUERY_TO_CLASS):
        logits[[3, 8]] -= 0.04  # class 4 rarely wins, so the area threshold has something to drop
    return logits


@pytest.mark.parametrize("chunk_elements", [1 << 24, 11 * 31 * 2, 1])
def test_class_probabilities_match_dense(chunk_elements) -> None:
    logits = _similarities(0)
    probs = class_probabilities(logits, QUERY_TO_CLASS, 40.0, chunk_elements=chunk_elements)
    expected, _ = dense_reference(logits, QUERY_TO_CLASS, 40.0, 0.0, None, 5)
    assert probs.shape == (5, 23, 31) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-7)


def test_identity_mapping_is_the_softmax() -> None:
    logits = _similarities(1, queries=4)
    probs = class_probabilities(logits, [0, 1, 2, 3], 60.0, chunk_elements=50)
    torch.testing.assert_close(probs, torch.softmax(logits * 60.0, dim=0), rtol=0, atol=1e-7)


def test_half_precision_logits() -> None:
    logits = _similarities(2).half()
    probs = class_probabilities(logits, QUERY_TO_CLASS, 40.0)
    expected, _ = dense_reference(logits.float(), QUERY_TO_CLASS, 40.0, 0.0, None, 5)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("closing", [False, True])
def test_postprocess_matches_dense_chain(closing) -> None:
    logits = _similarities(3)
    result = postprocess(logits, QUERY_TO_CLASS, 50.0, prob_thd=0.4, area_thd=0.1, closing=closing, chunk_elements=99)
    probs, labels = dense_reference(logits, QUERY_TO_CLASS, 50.0, 0.4, 0.1, 5)
    assert not kept_classes(class_probabilities(logits, QUERY_TO_CLASS, 50.0), 0.1).all(), "nothing was dropped"
    assert (labels == 0).any() and (labels != 0).any(), "the probability threshold did not act"
    if closing:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
        labels = torch.from_numpy(cv2.morphologyEx(labels.numpy().astype(np.uint8), cv2.MORPH_CLOSE, kernel))
    torch.testing.assert_close(result.probs, probs, rtol=0, atol=1e-7)
    assert result.labels.dtype == torch.int64 and result.labels.shape == (23, 31)
    torch.testing.assert_close(result.labels, labels.long(), rtol=0, atol=0)


def _probs_from_winners(winners: np.ndarray, num_classes: int) -> torch.Tensor:
    """Probabilities where each pixel's listed class gets 0.6 and the rest share 0.4 (a tie where marked -1)."""
    probs = np.full((num_classes, *winners.shape), 0.4 / (num_classes - 1), dtype=np.float32)
    for (r, c), w in np.ndenumerate(winners):
        if w >= 0:
            probs[:, r, c] = 0.4 / (num_classes - 1)
            probs[w, r, c] = 0.6
        else:  # tie between classes 1 and 2
            probs[:, r, c] = 0.0
            probs[1, r, c] = probs[2, r, c] = 0.5
    return torch.from_numpy(probs)


def test_area_threshold_hand_built() -> None:
    # 20 pixels; argmax areas: class 0: 6, class 1: 8 (7 plus the tie pixel), class 2: 4, class 3: 1, class 4: 1.
    winners = np.array(
        [
            [0, 0, 0, 1, 1],
            [0, 0, 0, 1, 1],
            [2, 2, 1, 1, 1],
            [2, 2, 3, 4, -1],
        ]
    )
    probs = _probs_from_winners(winners, 5)
    # Non-background area 14. thd 0.1 -> 1.4: classes 3 and 4 (1 px) dropped; 1 and 2 kept.
    assert kept_classes(probs, 0.1).tolist() == [True, True, True, False, False]
    # thd 0.3 -> 4.2: class 2 (4 px) dropped as well.
    assert kept_classes(probs, 0.3).tolist() == [True, True, False, False, False]
    assert kept_classes(probs, 4 / 14 - 1e-3).tolist() == [True, True, True, False, False]
    out = area_threshold(probs, 0.3)
    torch.testing.assert_close(out[:2], probs[:2])
    assert (out[2:] == 0).all()
    assert (probs[2:] > 0).any(), "the input was modified"
    assert area_threshold(probs, None) is probs


def test_area_threshold_equal_area_is_dropped() -> None:
    winners = np.array([[1, 1, 1, 1], [2, 2, 3, 3], [0, 0, 0, 0]])  # foreground 8 px: 4, 2 and 2
    probs = _probs_from_winners(winners, 4)
    # thd 0.25 -> exactly 2 px: classes 2 and 3 are not above it.
    assert kept_classes(probs, 0.25).tolist() == [True, True, False, False]
    assert kept_classes(probs, 0.24).tolist() == [True, True, True, True]


def test_area_threshold_keeps_class_zero_and_handles_no_foreground() -> None:
    winners = np.array([[1, 1, 1], [1, 1, 2]])  # class 0 never wins but is never dropped
    probs = _probs_from_winners(winners, 3)
    assert kept_classes(probs, 0.5).tolist() == [True, True, False]
    background = _probs_from_winners(np.zeros((2, 3), dtype=int), 3)
    # No foreground area at all: 0 > 0 fails, so every class but 0 is dropped.
    assert kept_classes(background, 0.1).tolist() == [True, False, False]


def test_probability_threshold() -> None:
    probs = torch.tensor(
        [
            [[0.2, 0.1, 0.05, 0.0]],
            [[0.5, 0.3, 0.05, 0.7]],
            [[0.3, 0.6, 0.09, 0.3]],
        ]
    )  # (3, 1, 4); the third pixel's top probability 0.09 is below 0.1
    assert labels_from_probs(probs, 0.1).tolist() == [[1, 2, 0, 1]]
    assert labels_from_probs(probs, 0.55).tolist() == [[0, 2, 0, 1]]
    assert labels_from_probs(probs, 0.0).tolist() == [[1, 2, 2, 1]]


def _closing_case() -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[1:8, 1:8] = 3  # one pixel from the top and left image borders
    labels[4, 4] = 0  # dark hole inside class 3: the dilation brings 3 in, the erosion keeps it
    labels[11:18, 2:9] = 4  # two pixels from the left border
    labels[14, 4] = 1  # lower id inside class 4: also a hole in gray levels, becomes 4
    labels[5, 15] = 5  # isolated bright speck: dilated to a 3x3 block of 5, eroded back to the single pixel
    labels[11:, 12:] = 2
    labels[19, 19] = 0  # hole in the image corner: pixels outside the image do not take part, so it is filled
    expected = labels.copy()
    expected[4, 4] = 3
    # Pixels outside the image take no part, so the 1-pixel strip between class 3 and the border is a gap that
    # closes; (0, 8) and (8, 0) keep 0 because their windows reach 0s even after the dilation.
    expected[0, 0:8] = 3
    expected[0:8, 0] = 3
    expected[14, 4] = 4
    expected[19, 19] = 2
    return labels, expected


def test_closing_hand_built() -> None:
    labels, expected = _closing_case()
    np.testing.assert_array_equal(close_labels(labels), expected)
    closed = close_labels(torch.from_numpy(labels))
    assert torch.is_tensor(closed) and closed.dtype == torch.int64
    np.testing.assert_array_equal(closed.numpy(), expected)


def test_closing_above_255_does_not_wrap() -> None:
    labels, expected = _closing_case()
    labels, expected = labels + 297, expected + 297  # ids 297..302: need 16-bit gray levels
    np.testing.assert_array_equal(close_labels(labels), expected)
    with pytest.raises(ValueError, match="0..65535"):
        close_labels(np.array([[70000]]))


def test_postprocess_with_300_classes() -> None:
    logits = torch.zeros(300, 9, 9)
    logits[299] = 1.0
    logits[299, 4, 4] = 0.0
    logits[5, 4, 4] = 1.0  # one pixel of class 5 inside class 299
    result = postprocess(logits, list(range(300)), 40.0, closing=False)
    assert result.labels[4, 4].item() == 5 and result.labels[0, 0].item() == 299
    closed = postprocess(logits, list(range(300)), 40.0, closing=True)
    assert (closed.labels == 299).all()


def test_golden_labels_from_golden_probabilities() -> None:
    data = np.load(GOLDEN)
    probs = torch.from_numpy(data["logits"])  # (21, 300, 420) after softmax, variant max and area threshold
    labels = close_labels(labels_from_probs(probs, 0.1))
    np.testing.assert_array_equal(labels.numpy(), data["pred"].astype(np.int64))


def test_bad_inputs() -> None:
    logits = _similarities(4, queries=3)
    with pytest.raises(ValueError, match="one class index per query"):
        postprocess(logits, [0, 1], 10.0)
    with pytest.raises(ValueError, match=r"classes \[1\] have no query"):
        postprocess(logits, [0, 2, 2], 10.0)
    with pytest.raises(ValueError, match="num_classes is 2"):
        postprocess(logits, [0, 1, 2], 10.0, num_classes=2)
    with pytest.raises(ValueError, match=">= 0"):
        postprocess(logits, [0, -1, 1], 10.0)
    with pytest.raises(ValueError, match=r"\(Q, H, W\)"):
        postprocess(logits[0], [0], 10.0)
