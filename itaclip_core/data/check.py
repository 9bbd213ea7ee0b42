"""`itaclip data check`: find what is missing or malformed in a benchmark folder before evaluating on it.

Checked: the image folder and split file exist; every listed image has its label map and every label map its
image; every image decodes (as the model reads it, with OpenCV) and every label map reads as a single-channel
map; each label map has its image's size; label values are within the benchmark's on-disk value set.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from itaclip_core.data.base import DatasetError, DatasetSpec, read_split_file, resolve_base, scan_images
from itaclip_core.data.registry import get_spec

# Problem kinds, with what to do about each.
ADVICE = {
    "missing_root": "give the dataset root folder",
    "missing_image_dir": "the root must hold the benchmark's image folder in MMSegmentation's layout",
    "missing_label_dir": "unpack the annotations next to the images in MMSegmentation's layout",
    "missing_split": "restore the split file; the evaluation list and its order are read from it",
    "empty": "nothing to evaluate: the split file lists no images, or the image folder holds none with the "
             "expected suffix",
    "missing_image": "the split file lists an image that is not in the image folder",
    "missing_label": "an image has no label map",
    "orphan_label": "a label map has no image",
    "unreadable_image": "the image does not decode; download it again",
    "unreadable_label": "the label map does not decode; download or convert it again",
    "not_single_channel": "the label map holds colours; labels must be class indices (grayscale or palette PNG)",
    "size_mismatch": "the label map's size differs from its image's",
    "unexpected_values": "the label map holds values outside the benchmark's label set",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset folder."""

    kind: str  # one of the keys of ADVICE
    path: Path  # the file or folder concerned
    message: str  # what is wrong, in words

    def __str__(self) -> str:
        return f"[{self.kind}] {self.path}: {self.message}"


def _conversion_hint(spec: DatasetSpec, label_path: Path) -> str:
    stem = label_path.name[: -len(spec.label_suffix)] if label_path.name.endswith(spec.label_suffix) else ""
    if spec.name == "coco_object" and (label_path.parent / f"{stem}.png").is_file():
        return " (the original stuff-thing map is there: run `itaclip data coco-object ROOT`)"
    if spec.name == "coco_stuff" and (label_path.parent / f"{stem}.png").is_file():
        return (
            " (the original stuff-thing map is there: convert it to train ids as MMSegmentation's coco_stuff164k "
            "converter does)"
        )
    if spec.name == "cityscapes" and (label_path.parent / f"{stem}_gtFine_labelIds.png").is_file():
        return " (labelIds exist: create the train-id maps with cityscapesscripts' createTrainIdLabelImgs)"
    return ""


def _image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image decoded as the model reads it (OpenCV), or None when it does not decode."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if image is None else (image.shape[0], image.shape[1])


def _check_pair(spec: DatasetSpec, image_path: Path, label_path: Path) -> list[Problem]:
    problems: list[Problem] = []
    image_size = _image_size(image_path)
    if image_size is None:
        problems.append(Problem("unreadable_image", image_path, "OpenCV cannot decode this file"))
    try:
        with Image.open(label_path) as image:
            label = np.array(image)
    except (OSError, ValueError) as error:
        return problems + [Problem("unreadable_label", label_path, f"cannot be read as an image: {error}")]
    label = label.squeeze()
    if label.ndim != 2:
        return problems + [Problem("not_single_channel", label_path, f"decodes to shape {label.shape}, not (H, W)")]
    if image_size is not None and label.shape != image_size:
        problems.append(
            Problem("size_mismatch", label_path, f"label is {label.shape[1]}x{label.shape[0]} (WxH) but the image "
                    f"is {image_size[1]}x{image_size[0]}")  # fmt: skip
        )
    values = np.unique(label)
    unexpected = [int(v) for v in values if int(v) not in spec.raw_values]
    if unexpected:
        allowed = sorted(spec.raw_values)
        shown = ", ".join(str(v) for v in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        problems.append(
            Problem("unexpected_values", label_path, f"values {shown} are outside the {spec.title} label set "
                    f"({allowed[0]}..{max(v for v in allowed if v != 255)}{', 255' if 255 in allowed else ''})")
        )  # fmt: skip
    return problems


def check_dataset(
    name: str, root: str | Path, max_images: int | None = None, progress: bool = True
) -> list[Problem]:
    """Everything missing or malformed in the benchmark `name` under `root` (empty list: all good).

    Args:
        name: a registry name (see `itaclip_core.data.DATASET_NAMES`).
        root: the dataset root, as given to `get_dataset`.
        max_images: check only the first this many listed images (file presence is checked for all).
        progress: show a progress bar while reading files.
    """
    spec = get_spec(name)
    root = Path(root)
    if not root.is_dir():
        return [Problem("missing_root", root, "dataset root not found")]
    try:
        base = resolve_base(spec, root)
    except DatasetError as error:
        expected = f"{spec.base_dir}/{spec.image_dir}" if spec.base_dir else spec.image_dir
        return [Problem("missing_image_dir", root / expected, str(error))]
    image_dir, label_dir = base / spec.image_dir, base / spec.label_dir
    problems: list[Problem] = []
    if not label_dir.is_dir():
        problems.append(Problem("missing_label_dir", label_dir, "label folder not found"))
    scanned = [rel[: -len(spec.image_suffix)] for rel in scan_images(image_dir, spec.image_suffix)]
    if spec.split_file is not None:
        split_path = base / spec.split_file
        if not split_path.is_file():
            return problems + [Problem("missing_split", split_path, "split file not found")]
        names = read_split_file(split_path)
        if not names:
            return problems + [Problem("empty", split_path, "the split file lists no images (it is empty)")]
        present = set(scanned)
        for missing in (n for n in names if n not in present):
            problems.append(Problem("missing_image", image_dir / (missing + spec.image_suffix), "listed in the "
                                    f"split file {split_path.name} but not found"))  # fmt: skip
        names = [n for n in names if n in present]
    else:
        names = scanned
    if not names:
        return problems + [Problem("empty", image_dir, f"no '*{spec.image_suffix}' images to evaluate")]
    if label_dir.is_dir():
        image_names = set(scanned)
        for rel in scan_images(label_dir, spec.label_suffix):
            stem = rel[: -len(spec.label_suffix)]
            if stem not in image_names:
                problems.append(Problem("orphan_label", label_dir / rel, f"no image {stem}{spec.image_suffix}"))
    pairs = []
    for stem in names:
        label_path = label_dir / (stem + spec.label_suffix)
        if not label_path.is_file():
            if label_dir.is_dir():
                problems.append(
                    Problem("missing_label", label_path, "label map not found" + _conversion_hint(spec, label_path))
                )
            continue
        pairs.append((image_dir / (stem + spec.image_suffix), label_path))
    if max_images is not None:
        pairs = pairs[:max_images]
    for image_path, label_path in tqdm(pairs, desc=f"check {name}", unit="img", disable=not progress):
        problems.extend(_check_pair(spec, image_path, label_path))
    return problems


def format_report(name: str, root: str | Path, problems: Sequence[Problem], num_listed: int | None = None,
                  show: int = 5) -> str:  # fmt: skip
    """A readable report of `check_dataset`'s findings, grouped by kind (at most `show` files each)."""
    spec = get_spec(name)
    lines = [f"{spec.title} at {root}"]
    if num_listed is not None:
        quoted = f" (the full validation split has {spec.quoted_size})" if spec.quoted_size else ""
        lines.append(f"{num_listed} images listed{quoted}")
    if not problems:
        lines.append("OK: no problems found")
        return "\n".join(lines)
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for problem in problems:
        by_kind[problem.kind].append(problem)
    lines.append(f"{len(problems)} problem(s):")
    for kind, items in by_kind.items():
        lines.append(f"- {kind} ({len(items)}): {ADVICE.get(kind, '')}")
        for item in items[:show]:
            lines.append(f"    {item.path}: {item.message}")
        if len(items) > show:
            lines.append(f"    ... and {len(items) - show} more")
    return "\n".join(lines)
