"""Palettes, colouring, overlays with legends, label PNGs and the IoU chart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from itaclip_core import vis

# Saturated colours that anti-aliased black text on white can never produce.
TEST_PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [255, 128, 0], [128, 0, 255]],
    dtype=np.uint8,
)
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _colour_rows(panel: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Rows of `panel` holding at least one pixel of exactly `colour`."""
    return np.nonzero((panel == colour).all(axis=-1).any(axis=1))[0]


def test_voc_palette_known_colours() -> None:
    colours = vis.palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    # Published Pascal VOC colours.
    assert tuple(colours[0]) == (0, 0, 0)
    assert tuple(colours[1]) == (128, 0, 0)
    assert tuple(colours[2]) == (0, 128, 0)
    assert tuple(colours[4]) == (0, 0, 128)
    assert tuple(colours[15]) == (192, 128, 128)
    assert tuple(colours[20]) == (0, 64, 128)
    assert tuple(colours[255]) == (224, 224, 192)
    assert len({tuple(c) for c in colours}) == 256
    for name in ("voc", "context", "ade20k", "coco", "VOC"):
        np.testing.assert_array_equal(vis.palette(256, name), colours)


def test_palette_any_size_is_deterministic_and_consistent() -> None:
    big = vis.palette(1000)
    assert big.shape == (1000, 3)
    np.testing.assert_array_equal(big, vis.palette(1000))
    np.testing.assert_array_equal(big[:21], vis.palette(21))
    assert len({tuple(c) for c in big}) == 1000
    with pytest.raises(ValueError, match="unknown palette name"):
        vis.palette(10, "pascal")
    with pytest.raises(ValueError, match="at least 1"):
        vis.palette(0)


def test_cityscapes_palette() -> None:
    colours = vis.palette(19, "cityscapes")
    assert colours.shape == (19, 3) and colours.dtype == np.uint8
    assert tuple(colours[0]) == (128, 64, 128)  # road
    assert tuple(colours[10]) == (70, 130, 180)  # sky
    assert tuple(colours[18]) == (119, 11, 32)  # bicycle
    longer = vis.palette(25, "cityscapes")
    np.testing.assert_array_equal(longer[:19], colours)
    np.testing.assert_array_equal(vis.palette(3, "cityscapes"), colours[:3])


def test_colorize_round_trips_and_blackens_ignored() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21, size=(17, 23))
    labels[3, 4] = 255
    colours = vis.palette(21)
    out = vis.colorize(labels, colours)
    assert out.shape == (17, 23, 3) and out.dtype == np.uint8
    lookup = {tuple(c): i for i, c in enumerate(colours.tolist())}
    recovered = np.array([[lookup[tuple(p)] for p in row] for row in out.tolist()])
    expected = labels.copy()
    expected[3, 4] = 0  # black is class 0's colour in the VOC palette
    np.testing.assert_array_equal(recovered, expected)
    assert tuple(out[3, 4]) == (0, 0, 0)
    with pytest.raises(ValueError, match="palette has 21 colours"):
        vis.colorize(np.full((2, 2), 30), colours)
    with pytest.raises(ValueError, match="integer"):
        vis.colorize(np.zeros((2, 2), dtype=np.float32), colours)


def test_overlay_blend_and_shapes() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, 8, size=(30, 40))
    labels[0, 0] = 255
    plain = vis.overlay(image, labels, NAMES, TEST_PALETTE, alpha=1.0, legend=False)
    assert plain.shape == (30, 40, 3) and plain.dtype == np.uint8
    keep = labels != 255
    np.testing.assert_array_equal(plain[keep], TEST_PALETTE[labels[keep]])
    np.testing.assert_array_equal(plain[0, 0], image[0, 0])  # ignored pixel keeps the image
    np.testing.assert_array_equal(vis.overlay(image, labels, NAMES, TEST_PALETTE, alpha=0.0, legend=False), image)
    half = vis.overlay(image, labels, NAMES, TEST_PALETTE, alpha=0.5, legend=False)
    expected = np.rint(0.5 * image[keep].astype(np.float64) + 0.5 * TEST_PALETTE[labels[keep]])
    assert np.abs(half[keep].astype(np.float64) - expected).max() <= 1
    with_legend = vis.overlay(image, labels, NAMES, TEST_PALETTE)
    assert with_legend.shape[0] == 30 and with_legend.shape[1] > 40
    with pytest.raises(ValueError, match="label map is"):
        vis.overlay(image, labels[:10], NAMES)


def test_legend_lists_exactly_present_classes_by_area() -> None:
    image = np.full((60, 50, 3), 200, dtype=np.uint8)
    labels = np.full((60, 50), 2)
    labels[:20] = 5  # 1000 px of class 5, 1900 px of class 2
    labels[20:22, :50] = 7  # 100 px of class 7
    out = vis.overlay(image, labels, NAMES, TEST_PALETTE, alpha=1.0)
    legend = out[:, 50:]
    first_rows = {}
    for class_id, colour in enumerate(TEST_PALETTE):
        rows = _colour_rows(legend, colour)
        if class_id in (2, 5, 7):
            assert rows.size > 0, f"class {class_id} missing from the legend"
            first_rows[class_id] = rows[0]
        else:
            assert rows.size == 0, f"absent class {class_id} drawn in the legend"
    assert first_rows[2] < first_rows[5] < first_rows[7]  # largest area first
    assert vis.present_classes(labels) == [2, 5, 7]


def test_legend_wraps_into_columns() -> None:
    image = np.zeros((40, 16, 3), dtype=np.uint8)
    two = np.zeros((40, 16), dtype=np.int64)
    two[20:] = 1
    eight = np.repeat(np.arange(8), 5)[:, None].repeat(16, axis=1)  # 8 classes in stripes
    narrow = vis.overlay(image, two, NAMES, TEST_PALETTE)
    wide = vis.overlay(image, eight, NAMES, TEST_PALETTE)
    assert narrow.shape[0] == wide.shape[0] == 40  # the legend stays within the image height
    assert wide.shape[1] > narrow.shape[1]
    legend = wide[:, 16:]
    for colour in TEST_PALETTE:
        assert _colour_rows(legend, colour).size > 0


def test_side_by_side_legend_is_union() -> None:
    image = np.full((20, 30, 3), 90, dtype=np.uint8)
    pred = np.zeros((20, 30), dtype=np.int64)
    pred[:, 15:] = 3
    gt = np.full((20, 30), 255, dtype=np.int64)
    gt[:10] = 6
    out = vis.side_by_side(image, pred, gt, NAMES, TEST_PALETTE)
    assert out.dtype == np.uint8 and out.ndim == 3
    assert out.shape[0] > 20 and out.shape[1] > 3 * 30
    panels_width = 3 * 30 + 2 * 4
    legend = out[:, panels_width:]
    for class_id, colour in enumerate(TEST_PALETTE):
        assert (_colour_rows(legend, colour).size > 0) == (class_id in (0, 3, 6))
    with pytest.raises(ValueError, match="pred is"):
        vis.side_by_side(image, pred, gt[:5], NAMES)


def test_save_label_png_paletted(tmp_path) -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 21, size=(13, 19))
    labels[0, 0] = 255
    colours = vis.palette(256)
    path = vis.save_label_png(tmp_path / "sub" / "labels.png", labels, colours)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
        stored = np.array(image.getpalette()[: 256 * 3]).reshape(256, 3)
    np.testing.assert_array_equal(stored, colours)


def test_save_label_png_16_bit_above_255(tmp_path) -> None:
    labels = np.array([[0, 300], [1000, 65535]], dtype=np.int64)
    path = vis.save_label_png(tmp_path / "big.png", labels, vis.palette(10))
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(image).astype(np.int64), labels)
    with pytest.raises(ValueError, match="0..65535"):
        vis.save_label_png(tmp_path / "neg.png", np.array([[-1, 0]]), vis.palette(2))


def test_save_rgb_png_round_trip(tmp_path) -> None:
    array = np.random.default_rng(3).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    path = vis.save_rgb_png(tmp_path / "rgb.png", array)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), array)
    with pytest.raises(ValueError, match="uint8 RGB"):
        vis.save_rgb_png(tmp_path / "bad.png", array[..., 0])


def test_plot_per_class_iou_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    names = [f"class {i}" for i in range(171)]
    ious = np.linspace(0.0, 90.0, 171)
    ious[[3, 50, 170]] = np.nan
    path = vis.plot_per_class_iou(names, ious, tmp_path / "figs" / "iou.png", title="COCO-Stuff")
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
    assert height > width  # one row per class: a tall chart
    with pytest.raises(ValueError, match="one per class"):
        vis.plot_per_class_iou(names[:3], [0.1, 0.2], tmp_path / "x.png")
