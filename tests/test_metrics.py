"""IoUAccumulator against hand-computed counts and against MMSegmentation's histc formulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itaclip_core.metrics import IoUAccumulator, confusion_counts, intersect_and_union

# 3 classes; two ignored pixels (255); a label value out of range (7); prediction values out of range (5, -1).
LABEL = np.array([[0, 0, 1, 1], [2, 2, 255, 255], [7, 0, 1, 2]], dtype=np.int64)
PRED = np.array([[0, 1, 1, 1], [2, 0, 2, 1], [0, 5, -1, 2]], dtype=np.int64)
# Pixels left after dropping the ignored ones, as (label, pred):
# (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (7,0) (0,5) (1,-1) (2,2)
HAND_INTERSECT = [1, 2, 2]
HAND_PRED = [3, 3, 2]  # pred 0: (0,0) (2,0) (7,0); pred 1: (0,1) (1,1) (1,1); pred 2: (2,2) (2,2)
HAND_LABEL = [3, 3, 3]  # label 0: (0,0) (0,1) (0,5); label 1: (1,1) (1,1) (1,-1); label 2: (2,2) (2,0) (2,2)
HAND_UNION = [5, 4, 3]
HAND_CONFUSION = [[1, 1, 0], [0, 2, 0], [1, 0, 2]]  # rows label, columns pred, both in range


def test_histograms_match_hand_counts() -> None:
    inter, union, pred, label = intersect_and_union(PRED, LABEL, num_classes=3)
    assert inter.tolist() == HAND_INTERSECT
    assert union.tolist() == HAND_UNION
    assert pred.tolist() == HAND_PRED
    assert label.tolist() == HAND_LABEL
    assert all(a.dtype == np.int64 for a in (inter, union, pred, label))


def test_results_match_hand_computation() -> None:
    accumulator = IoUAccumulator(3)
    accumulator.update(PRED, LABEL)
    results = accumulator.results(["a", "b", "c"])
    assert results["IoU"] == pytest.approx([100 / 5, 100 * 2 / 4, 100 * 2 / 3])
    assert results["Acc"] == pytest.approx([100 / 3, 100 * 2 / 3, 100 * 2 / 3])
    assert results["mIoU"] == pytest.approx((20 + 50 + 200 / 3) / 3)
    assert results["mAcc"] == pytest.approx((100 / 3 + 200 / 3 + 200 / 3) / 3)
    assert results["aAcc"] == pytest.approx(100 * 5 / 9)
    assert results["rounded"]["IoU"] == [20.0, 50.0, 66.67]
    assert results["rounded"]["mIoU"] == 45.56
    assert results["rounded"]["aAcc"] == 55.56
    assert results["class_names"] == ["a", "b", "c"]
    assert results["counts"]["union"] == HAND_UNION


def test_confusion_matrix_is_exact() -> None:
    assert confusion_counts(PRED, LABEL, 3).tolist() == HAND_CONFUSION
    accumulator = IoUAccumulator(3, track_confusion=True)
    accumulator.update(PRED, LABEL)
    accumulator.update(PRED, LABEL)
    matrix = accumulator.confusion_matrix
    assert matrix is not None and matrix.tolist() == (2 * np.array(HAND_CONFUSION)).tolist()
    assert np.diag(matrix).tolist() == (2 * np.array(HAND_INTERSECT)).tolist()
    assert IoUAccumulator(3).confusion_matrix is None


def test_absent_class_is_nan_and_predicted_but_absent_is_zero() -> None:
    label = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted but absent; class 3 neither
    accumulator = IoUAccumulator(4)
    accumulator.update(pred, label)
    results = accumulator.results()
    assert results["IoU"][0] == pytest.approx(50.0)  # I=1, U=2
    assert results["IoU"][1] == pytest.approx(100.0)
    assert results["IoU"][2] == 0.0  # predicted, never in the labels: counts as 0
    assert math.isnan(results["IoU"][3])  # neither predicted nor present: skipped
    assert math.isnan(results["Acc"][2]) and math.isnan(results["Acc"][3])
    assert results["mIoU"] == pytest.approx((50 + 100 + 0) / 3)
    assert results["mAcc"] == pytest.approx((50 + 100) / 2)
    assert math.isnan(results["rounded"]["IoU"][3])


def test_everything_ignored_gives_nan_everywhere() -> None:
    accumulator = IoUAccumulator(2)
    accumulator.update(np.zeros((2, 2), np.int64), np.full((2, 2), 255, np.uint8))
    results = accumulator.results()
    assert math.isnan(results["mIoU"]) and math.isnan(results["aAcc"])
    assert accumulator.state().sum() == 0


def test_ignore_index_none_and_other_value() -> None:
    label = np.array([0, 1, 255, 2])
    pred = np.array([0, 1, 1, 0])
    no_ignore = intersect_and_union(pred, label, 3, ignore_index=None)
    assert no_ignore[2].tolist() == [2, 2, 0]  # the 255 pixel's prediction is counted
    ignore_two = intersect_and_union(pred, label, 3, ignore_index=2)
    assert ignore_two[3].tolist() == [1, 1, 0]  # label 255 is out of range, label 2 dropped


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(-1, 6, size=(37, 41))
    label = rng.integers(0, 6, size=(37, 41)).astype(np.uint8)
    label[rng.random((37, 41)) < 0.2] = 255
    from_numpy = intersect_and_union(pred, label, 5)
    from_torch = intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), 5)
    for a, b in zip(from_numpy, from_torch):
        assert a.tolist() == b.tolist()


def _mmseg_histc(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> list[list[int]]:
    """MMSegmentation's formulation: boolean masking, then torch.histc over [0, N-1] with N bins."""
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    hist = [torch.histc(t.float(), bins=num_classes, min=0, max=num_classes - 1) for t in (intersect, pred, label)]
    union = hist[1] + hist[2] - hist[0]
    return [h.long().tolist() for h in (hist[0], union, hist[1], hist[2])]


@pytest.mark.parametrize("num_classes", [2, 21, 171])
def test_matches_histc_formulation_on_random_maps(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    total = IoUAccumulator(num_classes)
    expected = np.zeros((4, num_classes), dtype=np.int64)
    for _ in range(3):
        label = rng.integers(0, num_classes + 3, size=(50, 60))  # some labels out of range
        label[rng.random(label.shape) < 0.1] = 255
        pred = rng.integers(-2, num_classes + 2, size=(50, 60))
        pred = np.where(rng.random(pred.shape) < 0.5, label, pred)  # many hits
        total.update(pred, label)
        expected += np.array(_mmseg_histc(torch.from_numpy(pred), torch.from_numpy(label), num_classes, 255))
    assert total.state().tolist() == expected.tolist()


def test_merge_and_add_equal_one_pass() -> None:
    rng = np.random.default_rng(3)
    maps = [(rng.integers(0, 4, (9, 7)), rng.integers(0, 4, (9, 7))) for _ in range(4)]
    whole = IoUAccumulator(4, track_confusion=True)
    first, second = IoUAccumulator(4, track_confusion=True), IoUAccumulator(4, track_confusion=True)
    replayed = IoUAccumulator(4)
    for k, (pred, label) in enumerate(maps):
        whole.update(pred, label)
        counts = (first if k < 2 else second).update(pred, label)
        replayed.add(*counts)
    merged = first.merge(second)
    assert merged.state().tolist() == whole.state().tolist() == replayed.state().tolist()
    assert merged.num_images == whole.num_images == replayed.num_images == 4
    assert merged.confusion_matrix.tolist() == whole.confusion_matrix.tolist()
    restored = IoUAccumulator(4)
    restored.load_state(whole.state(), whole.num_images)
    assert restored.results()["mIoU"] == whole.results()["mIoU"]


def test_bad_inputs_are_reported() -> None:
    accumulator = IoUAccumulator(3)
    with pytest.raises(ValueError, match="shape"):
        accumulator.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))
    with pytest.raises(TypeError, match="integer"):
        accumulator.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="3 integer counts"):
        accumulator.add([1, 2], [1, 2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="merge"):
        accumulator.merge(IoUAccumulator(4))
    with pytest.raises(ValueError, match="class names"):
        accumulator.results(["only one"])
