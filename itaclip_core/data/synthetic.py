"""Small synthetic datasets in the real on-disk layout of each benchmark, for tests and demos.

Every image gets a label map in the benchmark's own on-disk convention, so that the readers and converters are
exercised on the same kind of files as the real data:

- VOC: palette PNGs (VOC colour map) with values 0-20 and 255 boundaries around objects; a split file whose
  order is not alphabetical, and one training image that is not in the validation split.
- Context: grayscale PNGs with values 0-59 (0 = background); split file as for VOC.
- COCO-Stuff / COCO-Object: the original stuff-thing maps (`<id>.png`, ids 0-181 with the unused ids absent,
  255 unlabeled) plus the prepared `<id>_labelTrainIds.png` and `<id>_instanceTrainIds.png`.
- Cityscapes: `<city>_<seq>_<frame>_leftImg8bit.png` images and `_gtFine_labelTrainIds.png` maps (0-18, 255).
- ADE20K: grayscale PNGs with values 0-150 (0 = other).

Images have varied sizes (by default one with a short side below 224 and one with an extreme aspect ratio).
With `easy=True`, each region is painted in a flat colour that identifies its evaluated class
(`class_colour`), so that a colour-lookup segmentor can score well above chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from itaclip_core.data.base import IGNORE_INDEX, reduce_zero_label
from itaclip_core.data.coco_object import stuff_to_object, stuff_to_train_ids
from itaclip_core.data.registry import COCO_MAX_THING_ID, COCO_USED_IDS, DATASET_NAMES, get_spec

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((180, 240), (375, 500), (96, 640), (333, 250))  # (H, W) each
IGNORED_COLOUR = (128, 128, 128)  # RGB of regions whose label is ignored (VOC boundaries aside)
_GRID_LEVELS = (0, 51, 102, 153, 204, 255)
_CITIES = ("frankfurt", "lindau", "munster")


def class_colour(index: int) -> tuple[int, int, int]:
    """Flat RGB colour of evaluated class `index` in easy images (distinct for indices 0..215)."""
    if not 0 <= index < len(_GRID_LEVELS) ** 3:
        raise ValueError(f"class index {index} has no synthetic colour (0..{len(_GRID_LEVELS) ** 3 - 1})")
    # spread consecutive indices across the cube: stride 97 is coprime with 216
    cell = (index * 97) % 216
    return _GRID_LEVELS[cell // 36], _GRID_LEVELS[(cell // 6) % 6], _GRID_LEVELS[cell % 6]


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB table of `class_colour`."""
    return np.array([class_colour(i) for i in range(num_classes)], dtype=np.uint8)


def voc_palette() -> list[int]:
    """The Pascal VOC colour map as a flat 768-entry PIL palette (bit-interleaved index bits)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


def _raw_to_eval(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """How the benchmark turns an on-disk map into evaluated labels (for colouring easy images)."""
    if name in ("voc20", "context59", "ade20k"):
        return reduce_zero_label
    if name == "coco_stuff":
        return stuff_to_train_ids
    if name == "coco_object":
        return stuff_to_object
    return lambda raw: raw


def _raw_pools(name: str) -> tuple[list[int], list[int], int | None]:
    """(background values, object values, value of an optional ignored region) in on-disk ids."""
    if name in ("voc21", "voc20"):
        return [0], list(range(1, 21)), None
    if name in ("context60", "context59"):
        return [0, 30, 47], list(range(1, 60)), None
    if name in ("coco_stuff", "coco_object"):
        stuff = [i for i in COCO_USED_IDS if i > COCO_MAX_THING_ID]
        return stuff, list(COCO_USED_IDS), 255
    if name == "cityscapes":
        return [0, 10, 8], list(range(19)), 255
    return [0, 1, 3], list(range(1, 151)), 0  # ade20k: 0 is "other"


def _draw_raw_map(name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A raw label map: a background value, a few rectangles and ellipses, maybe an ignored region."""
    backgrounds, objects, ignored = _raw_pools(name)
    raw = np.full((height, width), rng.choice(backgrounds), dtype=np.uint8)
    if ignored is not None:
        y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        raw[y0 : y0 + max(2, height // 6), x0 : x0 + max(2, width // 6)] = ignored
    for _ in range(int(rng.integers(2, 5))):
        value = int(rng.choice(objects))
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        ry = int(rng.integers(max(2, height // 10), max(3, height // 3)))
        rx = int(rng.integers(max(2, width // 10), max(3, width // 3)))
        if rng.random() < 0.5:
            cv2.rectangle(raw, (cx - rx, cy - ry), (cx + rx, cy + ry), value, thickness=-1)
        else:
            cv2.ellipse(raw, (cx, cy), (rx, ry), 0.0, 0.0, 360.0, value, thickness=-1)
    return raw


def _voc_boundaries(raw: np.ndarray) -> np.ndarray:
    """Pixels within 2 px of a change of value: where VOC draws its 255 'void' outlines."""
    kernel = np.ones((5, 5), np.uint8)
    changed = cv2.dilate(raw, kernel) != cv2.erode(raw, kernel)
    return changed


def _render(name: str, raw: np.ndarray, easy: bool, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 RGB image of a raw map: flat class colours (easy) or noisy random region colours."""
    evaluated = _raw_to_eval(name)(raw).astype(np.int64)
    num_classes = get_spec(name).num_classes
    if easy:
        table = np.vstack([class_colours(num_classes), np.array([IGNORED_COLOUR] * (256 - num_classes))])
        table[IGNORE_INDEX] = IGNORED_COLOUR
        return table[evaluated].astype(np.uint8)
    region_colours = rng.integers(0, 256, size=(256, 3))
    image = region_colours[raw].astype(np.float64)
    image += rng.normal(0.0, 18.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=95)


def _save_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Save a uint8 map (grayscale, or palette PNG whose indices are the values) or an RGB image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())
        image.putpalette(palette)
    else:
        image = Image.fromarray(array)
    image.save(path, format="PNG")


def make_synthetic_dataset(
    name: str,
    root: str | Path,
    num_images: int = 4,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
    easy: bool = False,
) -> Path:
    """Write a small synthetic dataset for benchmark `name` under `root` and return the root to open it with.

    Args:
        name: a registry name (`DATASET_NAMES`); voc21/voc20 and context60/context59 share one layout,
            coco_stuff/coco_object too (both label files are written).
        root: folder to write into (created if needed).
        num_images: number of evaluation images.
        seed: seed of the random layout; the same arguments always give the same files.
        sizes: (height, width) of the images, used in turn; default `DEFAULT_SIZES`.
        easy: paint regions in flat colours that identify their evaluated class (`class_colour`).

    Returns:
        The dataset root to pass to `get_dataset(name, root)`.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    sizes = tuple(sizes) if sizes else DEFAULT_SIZES
    for size in sizes:
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"image size {size} must be (height, width) with both sides at least 8 pixels")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = _WRITERS[name]
    names: list[str] = []
    for index in range(num_images):
        height, width = sizes[index % len(sizes)]
        raw = _draw_raw_map(name, height, width, rng)
        image = _render(name, raw, easy, rng)
        names.append(writer(root, index, raw, image, False))
    if name in ("voc21", "voc20", "context60", "context59"):
        # one training image outside the validation split, and a split order that is not alphabetical
        height, width = sizes[0]
        raw = _draw_raw_map(name, height, width, rng)
        train_name = _WRITERS[name](root, num_images, raw, _render(name, raw, easy, rng), True)
        base = root / ("VOC2012" if name.startswith("voc") else "VOC2010")
        split_dir = base / "ImageSets" / ("Segmentation" if name.startswith("voc") else "SegmentationContext")
        split_dir.mkdir(parents=True, exist_ok=True)
        order = names[1::2] + names[0::2]
        (split_dir / "val.txt").write_text("".join(f"{n}\n" for n in order), encoding="utf-8")
        (split_dir / "train.txt").write_text(f"{train_name}\n", encoding="utf-8")
    return root


def _write_voc(root: Path, index: int, raw: np.ndarray, image: np.ndarray, train: bool) -> str:
    name = f"{2007 + index % 5}_{index * 37 + 33:06d}"
    label = raw.copy()
    label[_voc_boundaries(raw)] = IGNORE_INDEX
    base = root / "VOC2012"
    _save_jpeg(base / "JPEGImages" / f"{name}.jpg", image)
    _save_png(base / "SegmentationClass" / f"{name}.png", label, palette=voc_palette())
    return name


def _write_context(root: Path, index: int, raw: np.ndarray, image: np.ndarray, train: bool) -> str:
    name = f"{2008 + index % 3}_{index * 41 + 7:06d}"
    base = root / "VOC2010"
    _save_jpeg(base / "JPEGImages" / f"{name}.jpg", image)
    _save_png(base / "SegmentationClassContext" / f"{name}.png", raw)
    return name


def _write_coco(root: Path, index: int, raw: np.ndarray, image: np.ndarray, train: bool) -> str:
    name = f"{index * 9973 + 139:012d}"
    _save_jpeg(root / "images" / "val2017" / f"{name}.jpg", image)
    annotations = root / "annotations" / "val2017"
    _save_png(annotations / f"{name}.png", raw)
    _save_png(annotations / f"{name}_labelTrainIds.png", stuff_to_train_ids(raw))
    _save_png(annotations / f"{name}_instanceTrainIds.png", stuff_to_object(raw))
    return name


def _write_cityscapes(root: Path, index: int, raw: np.ndarray, image: np.ndarray, train: bool) -> str:
    city = _CITIES[index % len(_CITIES)]
    stem = f"{city}_{index:06d}_{19 + index:06d}"
    _save_png(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", image)
    _save_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", raw)
    return f"{city}/{stem}"


def _write_ade(root: Path, index: int, raw: np.ndarray, image: np.ndarray, train: bool) -> str:
    name = f"ADE_val_{index + 1:08d}"
    _save_jpeg(root / "images" / "validation" / f"{name}.jpg", image)
    _save_png(root / "annotations" / "validation" / f"{name}.png", raw)
    return name


_WRITERS: dict[str, Callable[[Path, int, np.ndarray, np.ndarray, bool], str]] = {
    "voc21": _write_voc,
    "voc20": _write_voc,
    "context60": _write_context,
    "context59": _write_context,
    "coco_stuff": _write_coco,
    "coco_object": _write_coco,
    "cityscapes": _write_cityscapes,
    "ade20k": _write_ade,
}
