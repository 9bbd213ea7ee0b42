"""Boundary accuracy (trimap) on hand-computed maps, and its place in the evaluation reports."""

from __future__ import annotations

import numpy as np
import pytest

from itaclip_core.evaluation.reports import format_markdown
from itaclip_core.metrics import TrimapAccumulator, boundary_band, trimap_counts


def test_band_of_a_vertical_edge():
    label = np.zeros((4, 8), np.int64)
    label[:, 4:] = 1  # boundary pixels: columns 3 and 4
    assert boundary_band(label, 0).sum() == 8 and boundary_band(label, 0)[:, [3, 4]].all()
    band1 = boundary_band(label, 1)
    assert band1[:, 2:6].all() and not band1[:, [0, 1, 6, 7]].any()  # columns 2..5
    assert boundary_band(label, 10).all()
    assert not boundary_band(np.zeros((5, 5), np.int64), 3).any()  # no boundary, no band


def test_ignored_pixels_bound_regions_but_are_not_scored():
    label = np.zeros((5, 5), np.int64)
    label[2, 2] = 255
    band = boundary_band(label, 0, ignore_index=255)
    expected = np.zeros((5, 5), bool)
    expected[1:4, 1:4] = True
    expected[2, 2] = False  # the ignored pixel itself
    assert np.array_equal(band, expected)
    assert boundary_band(label, 0, ignore_index=None)[2, 2]


def test_counts_by_hand():
    label = np.zeros((4, 8), np.int64)
    label[:, 4:] = 1
    pred = label.copy()
    pred[:, 4] = 0  # the prediction's edge is one column off
    pred[0, 0] = 1  # and one far-away error
    counts = trimap_counts(pred, label, widths=(0, 1, 3))
    # width 0: columns 3, 4 -> 8 pixels, column 4 wrong (4); width 1: columns 2..5 -> 16, 4 wrong;
    # width 3: every column -> 32 pixels, 5 wrong
    assert counts.tolist() == [[4, 8], [12, 16], [27, 32]]
    acc = TrimapAccumulator(widths=(0, 1, 3))
    acc.update(pred, label)
    acc.update(label, label)
    result = acc.results()
    assert result["counts"] == [[12, 16], [28, 32], [59, 64]]
    assert result["accuracy"] == pytest.approx([75.0, 87.5, 59 / 64 * 100])
    assert result["num_images"] == 2


def test_errors_are_explained():
    with pytest.raises(ValueError, match="trimap width"):
        boundary_band(np.zeros((3, 3), np.int64), -1)
    with pytest.raises(ValueError, match="differs"):
        trimap_counts(np.zeros((3, 3), np.int64), np.zeros((3, 4), np.int64))
    with pytest.raises(TypeError, match="integer"):
        trimap_counts(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int64))


def test_markdown_shows_the_boundary_accuracy():
    acc = TrimapAccumulator(widths=(1, 3))
    label = np.zeros((4, 8), np.int64)
    label[:, 4:] = 1
    pred = label.copy()
    pred[:, 4] = 0
    acc.update(pred, label)
    results = {
        "preset": "p", "dataset": {"title": "T", "name": "t", "num_classes": 2, "root": "/r"},
        "rounded": {"mIoU": 50.0, "mAcc": 60.0, "aAcc": 70.0}, "num_images": 1, "weights_id": "w",
        "overrides": [], "date": "d", "per_class": [], "boundary": acc.results(),
    }
    text = format_markdown(results)
    assert "boundary acc @1 px | boundary acc @3 px" in text and "| 75.00 | 87.50 |" in text
    del results["boundary"]
    assert "boundary acc" not in format_markdown(results)


def test_runner_reports_boundary_accuracy_and_keeps_it_when_resuming(tmp_path):
    from _fake_segmentor import make as make_fake

    from itaclip_core.data import get_dataset
    from itaclip_core.data.synthetic import make_synthetic_dataset
    from itaclip_core.evaluation import EvalOptions, evaluate
    from itaclip_core.inference.preprocess import prepare_image

    root = make_synthetic_dataset("cityscapes", tmp_path / "city", num_images=3, seed=3,
                                  sizes=[(64, 96), (48, 80)], easy=True)
    dataset = get_dataset("cityscapes", root)
    segmentor = make_fake("fake_cityscapes")
    direct = TrimapAccumulator(ignore_index=dataset.ignore_index)
    for index, sample in enumerate(dataset.samples):
        labels = segmentor.predict_prepared(prepare_image(sample.image_path, 336, name=sample.name)).labels
        direct.update(labels, dataset.load_label(index))
    options = EvalOptions(out_dir=tmp_path / "run", preset="fake_cityscapes", weights_id="fake:fake", workers=0,
                          progress=False)
    results = evaluate(segmentor, dataset, options)
    assert results["boundary"]["counts"] == direct.results()["counts"]
    assert results["boundary"]["widths"] == [3, 5, 10] and results["boundary"]["num_images"] == 3
    assert 0 < results["boundary"]["accuracy"][0] <= 100
    assert "boundary acc @3 px" in (tmp_path / "run" / "results.md").read_text()
    again = evaluate(segmentor, dataset, options)  # everything loaded from the records
    assert again["run"]["computed"] == 0 and again["boundary"] == results["boundary"]
