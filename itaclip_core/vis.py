"""Palettes, coloured label maps, overlays with legends, label PNGs and the per-class IoU chart.

Images are (H, W, 3) uint8 RGB numpy arrays and label maps (H, W) integer arrays throughout. Drawing uses PIL
(with its default font); matplotlib is needed only by `plot_per_class_iou` and is imported there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Datasets whose published tools colour labels with the Pascal VOC bit-interleaving colour map.
VOC_STYLE_PALETTES = ("voc", "context", "ade20k", "coco")

# The Cityscapes train-id colours (road, sidewalk, building, wall, fence, pole, traffic light, traffic sign,
# vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle).
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

_FONT_SIZE = 12
_MARGIN = 6  # pixels around the legend and between legend columns
_SWATCH = 12  # side of a legend colour square
_GAP = 4  # pixels between panels and between a swatch and its text


def _bit_interleaved_colours(num_colours: int) -> np.ndarray:
    """The Pascal VOC colour map: the bits of the index spread over R, G, B from the most significant bit down."""
    index = np.arange(num_colours, dtype=np.int64)
    colours = np.zeros((num_colours, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


def palette(num_classes: int, name: str | None = None) -> np.ndarray:
    """Colours for class ids 0..num_classes-1 as an (N, 3) uint8 array.

    Args:
        num_classes: number of colours N (any positive number; the VOC colour map is distinct up to 2**24 ids).
        name: "voc", "context", "ade20k", "coco" or None for the Pascal VOC bit-interleaving colour map;
            "cityscapes" for the 19 Cityscapes colours (ids from 19 on continue with the VOC colour map).
    """
    if num_classes < 1:
        raise ValueError(f"palette: num_classes is {num_classes}; it must be at least 1")
    key = None if name is None else name.lower()
    if key is None or key in VOC_STYLE_PALETTES:
        return _bit_interleaved_colours(num_classes)
    if key == "cityscapes":
        colours = _bit_interleaved_colours(num_classes)
        count = min(num_classes, len(CITYSCAPES_COLOURS))
        colours[:count] = np.asarray(CITYSCAPES_COLOURS[:count], dtype=np.uint8)
        return colours
    known = ", ".join((*VOC_STYLE_PALETTES, "cityscapes"))
    raise ValueError(f"palette: unknown palette name {name!r}; use one of {known} or None")


_default_palette = palette  # `palette` is also an argument name below


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what} has shape {labels.shape}: expected an (H, W) label map")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} has dtype {labels.dtype}: expected integer class ids (cast with .astype(np.int64))")
    return labels


def _check_image(image_rgb: np.ndarray | Image.Image, size: tuple[int, int], what: str = "image_rgb") -> np.ndarray:
    if isinstance(image_rgb, Image.Image):
        image_rgb = np.asarray(image_rgb.convert("RGB"))
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{what} has shape {image.shape} and dtype {image.dtype}: expected (H, W, 3) uint8 RGB")
    if image.shape[:2] != size:
        raise ValueError(f"{what} is {image.shape[:2]} but the label map is {size}: resize one to the other")
    return image


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Colour a label map: (H, W) integer ids -> (H, W, 3) uint8, pixels equal to `ignore_index` black.

    Args:
        labels: (H, W) integer class ids.
        palette: (N, 3) uint8 colours; every id other than `ignore_index` must be below N.
        ignore_index: id drawn black (None: no id is ignored).
    """
    labels = _check_labels(labels, "labels")
    colours = np.asarray(palette, dtype=np.uint8)
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"palette has shape {colours.shape}: expected (N, 3) colours")
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, dtype=bool)
    valid = labels[~ignored]
    if valid.size and (valid.min() < 0 or valid.max() >= len(colours)):
        raise ValueError(
            f"labels hold ids in [{valid.min()}, {valid.max()}] but the palette has {len(colours)} colours: "
            "pass palette(num_classes) with enough colours"
        )
    out = colours[np.where(ignored, 0, labels)]  # (H, W, 3)
    out[ignored] = 0
    return out


def _font(size: int = _FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType or before 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom - min(top, 0)))


def present_classes(*label_maps: np.ndarray, ignore_index: int | None = 255) -> list[int]:
    """Class ids present in the label maps, largest total area first (ties: lower id first)."""
    counts: dict[int, int] = {}
    for labels in label_maps:
        ids, n = np.unique(np.asarray(labels), return_counts=True)
        for class_id, count in zip(ids.tolist(), n.tolist()):
            if ignore_index is None or class_id != ignore_index:
                counts[class_id] = counts.get(class_id, 0) + count
    return sorted(counts, key=lambda c: (-counts[c], c))


def legend_panel(
    class_ids: Sequence[int], class_names: Sequence[str], palette: np.ndarray, height: int
) -> np.ndarray:
    """A white (height, width, 3) uint8 panel listing colour swatches and names, in columns of at most `height`.

    Args:
        class_ids: classes to list, in order.
        class_names: name of every class id.
        palette: (N, 3) uint8 colours indexed by class id.
        height: panel height in pixels; entries wrap into a new column when a column is full.
    """
    font = _font()
    for class_id in class_ids:
        if not 0 <= class_id < len(class_names):
            raise ValueError(f"class id {class_id} has no name: class_names lists {len(class_names)} classes")
        if class_id >= len(palette):
            raise ValueError(f"class id {class_id} has no colour: the palette has {len(palette)} colours")
    labels = [str(class_names[c]) for c in class_ids]
    sizes = [_text_size(font, text) for text in labels]
    row_height = max([_SWATCH, *(h for _, h in sizes)]) + _GAP
    rows_per_column = max(1, (height - 2 * _MARGIN) // row_height)
    columns = [list(range(i, min(i + rows_per_column, len(labels)))) for i in range(0, len(labels), rows_per_column)]
    widths = [_SWATCH + _GAP + max(sizes[i][0] for i in column) for column in columns]
    width = _MARGIN + sum(w + _MARGIN for w in widths) if columns else 2 * _MARGIN
    panel_height = max(height, 2 * _MARGIN + row_height * min(rows_per_column, len(labels)))
    canvas = Image.new("RGB", (width, panel_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = _MARGIN
    for column, column_width in zip(columns, widths):
        for row, index in enumerate(column):
            y = _MARGIN + row * row_height
            colour = tuple(int(v) for v in palette[class_ids[index]])
            draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=colour, outline=(0, 0, 0))
            text_y = y + (_SWATCH - sizes[index][1]) // 2
            draw.text((x + _SWATCH + _GAP, text_y), labels[index], fill=(0, 0, 0), font=font)
        x += column_width + _MARGIN
    return np.asarray(canvas)


def _append_right(image: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """Place `panel` to the right of `image`, padding the shorter one with white at the bottom."""
    height = max(image.shape[0], panel.shape[0])
    out = np.full((height, image.shape[1] + panel.shape[1], 3), 255, dtype=np.uint8)
    out[: image.shape[0], : image.shape[1]] = image
    out[: panel.shape[0], image.shape[1] :] = panel
    return out


def overlay(
    image_rgb: np.ndarray | Image.Image,
    labels: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    legend: bool = True,
    ignore_index: int | None = 255,
    outlines: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a label map over an image, with a legend of the classes present to the right.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image (or a PIL image).
        labels: (H, W) integer class ids; pixels equal to `ignore_index` keep the plain image.
        class_names: name of every class id (used by the legend).
        palette: (N, 3) uint8 colours; default `palette(len(class_names))`.
        alpha: weight of the class colour (0: image only, 1: colours only).
        legend: append the legend panel (classes present, largest area first).
        ignore_index: id left uncoloured and out of the legend (None: none).
        outlines: optional (H, W) region map (e.g. mask proposals' partition) whose boundaries are drawn in white.

    Returns:
        (H, W + legend width, 3) uint8 RGB.
    """
    labels = _check_labels(labels, "labels")
    image = _check_image(image_rgb, labels.shape)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is {alpha}: it must lie in [0, 1]")
    colours = _default_palette(len(class_names)) if palette is None else np.asarray(palette, dtype=np.uint8)
    coloured = colorize(labels, colours, ignore_index).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * coloured
    if ignore_index is not None:
        blended[labels == ignore_index] = image[labels == ignore_index]
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outlines is not None:
        out = draw_outlines(out, outlines)
    if not legend:
        return out
    ids = present_classes(labels, ignore_index=ignore_index)
    return _append_right(out, legend_panel(ids, class_names, colours, out.shape[0]))


def outline_mask(regions: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour lies in another region (one-pixel boundaries)."""
    regions = _check_labels(regions, "regions")
    edges = np.zeros(regions.shape, dtype=bool)
    edges[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    edges[:-1, :] |= regions[:-1, :] != regions[1:, :]
    return edges


def draw_outlines(image_rgb: np.ndarray, regions: np.ndarray, colour: Sequence[int] = (255, 255, 255)
                  ) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 image with the boundaries of a region map (H, W) drawn in `colour`."""
    regions = _check_labels(regions, "regions")
    out = _check_image(image_rgb, regions.shape).copy()
    out[outline_mask(regions)] = np.asarray(colour, dtype=np.uint8)
    return out


def _titled(panel: np.ndarray, title: str, title_height: int) -> np.ndarray:
    strip = Image.new("RGB", (panel.shape[1], title_height), (255, 255, 255))
    font = _font()
    width, height = _text_size(font, title)
    ImageDraw.Draw(strip).text(
        (max(0, (panel.shape[1] - width) // 2), (title_height - height) // 2), title, fill=(0, 0, 0), font=font
    )
    return np.concatenate([np.asarray(strip), panel], axis=0)


def side_by_side(
    image_rgb: np.ndarray | Image.Image,
    pred: np.ndarray,
    gt: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray | None = None,
    titles: Sequence[str] = ("image", "prediction", "ground truth"),
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Image, coloured prediction and coloured ground truth in a row, titled, with one legend at the right.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image (or a PIL image).
        pred: (H, W) integer predicted class ids.
        gt: (H, W) integer ground-truth class ids; `ignore_index` pixels are drawn black.
        class_names: name of every class id.
        palette: (N, 3) uint8 colours; default `palette(len(class_names))`.
        titles: the three panel titles.
        ignore_index: id drawn black and left out of the legend (None: none).

    Returns:
        uint8 RGB panel; the legend lists the classes present in `pred` or `gt`, largest total area first.
    """
    pred = _check_labels(pred, "pred")
    gt = _check_labels(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred is {pred.shape} but gt is {gt.shape}: both must have the image's size")
    image = _check_image(image_rgb, pred.shape)
    if len(titles) != 3:
        raise ValueError(f"titles has {len(titles)} entries: give three (image, prediction, ground truth)")
    colours = _default_palette(len(class_names)) if palette is None else np.asarray(palette, dtype=np.uint8)
    panels = [image, colorize(pred, colours, ignore_index), colorize(gt, colours, ignore_index)]
    title_height = max(_text_size(_font(), str(t))[1] for t in titles) + 2 * _GAP
    titled = [_titled(p, str(t), title_height) for p, t in zip(panels, titles)]
    gap = np.full((titled[0].shape[0], _GAP, 3), 255, dtype=np.uint8)
    row = np.concatenate([titled[0], gap, titled[1], gap, titled[2]], axis=1)
    ids = present_classes(pred, gt, ignore_index=ignore_index)
    return _append_right(row, legend_panel(ids, class_names, colours, row.shape[0]))


def save_label_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> Path:
    """Write a label map as a PNG whose pixel values are the class ids.

    Ids 0..255 give a paletted ("P" mode) PNG coloured by `palette` (its first 256 colours). A map holding ids
    above 255 cannot be paletted: it is written as a 16-bit grayscale PNG instead (ids up to 65535, no colours).

    Args:
        path: output file; parent folders are created.
        labels: (H, W) non-negative integer ids.
        palette: (N, 3) uint8 colours indexed by id.

    Returns:
        The path written.
    """
    labels = _check_labels(labels, "labels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"labels hold ids in [{low}, {high}]: a label PNG stores ids 0..65535 only")
    if high > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")
        return path
    colours = np.zeros((256, 3), dtype=np.uint8)
    given = np.asarray(palette, dtype=np.uint8)[:256]
    colours[: len(given)] = given
    image = Image.fromarray(labels.astype(np.uint8))  # "L": the ids as pixel values
    image.putpalette(colours.reshape(-1).tolist())  # "L" -> "P", pixel values kept
    image.save(path, format="PNG")
    return path


def save_rgb_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB array as a PNG (parent folders created); returns the path."""
    image = np.asarray(array)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"array has shape {image.shape} and dtype {image.dtype}: expected (H, W, 3) uint8 RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    return path


def plot_per_class_iou(
    class_names: Sequence[str], ious: Sequence[float] | np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """Save a horizontal bar chart of per-class IoU (one bar per class, NaN classes marked "absent").

    Args:
        class_names: name of every class, top to bottom.
        ious: one IoU per class, as fractions (0..1) or percentages (0..100; chosen when any value exceeds 1);
            NaN for a class absent from both predictions and labels.
        path: output PNG file; parent folders are created.
        title: figure title; the mean over the non-NaN classes is appended.

    Returns:
        The path written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is an optional dependency
        raise ImportError("plot_per_class_iou needs matplotlib: pip install matplotlib") from error
    values = np.asarray(ious, dtype=np.float64).reshape(-1)
    if len(values) != len(class_names):
        raise ValueError(f"ious has {len(values)} values but class_names has {len(class_names)}: give one per class")
    finite = np.isfinite(values)
    full = 100.0 if finite.any() and values[finite].max() > 1.0 else 1.0
    count = len(values)
    font_size = 9 if count <= 40 else 7 if count <= 100 else 6
    figure = Figure(figsize=(8.0, max(2.5, 0.16 * count + 1.2)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = np.arange(count)
    axes.barh(positions[finite], values[finite], color="tab:blue", height=0.8)
    for position, value, ok in zip(positions, values, finite):
        text, colour = (f"{value:.1f}" if full > 1 else f"{value:.3f}", "black") if ok else ("absent", "grey")
        x = (value if ok else 0.0) + full * 0.005
        axes.text(x, position, text, va="center", fontsize=font_size - 1, color=colour)
    if finite.any():
        mean = float(values[finite].mean())
        axes.axvline(mean, color="tab:red", linestyle="--", linewidth=1)
        title = f"{title}  (mean {mean:.2f} over {int(finite.sum())} classes)".strip()
    axes.set_yticks(positions)
    axes.set_yticklabels([str(n) for n in class_names], fontsize=font_size)
    axes.set_ylim(count - 0.5, -0.5)  # first class at the top
    axes.set_xlim(0.0, full * 1.08)
    axes.set_xlabel("IoU (%)" if full > 1 else "IoU")
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
