"""Benchmark datasets in MMSegmentation's on-disk layouts: file lists and label loading.

A dataset is described by a `DatasetSpec` (folders, suffixes, split file, label convention) and opened as a
`SegDataset`, which lists `(name, image_path, label_path)` samples in MMSegmentation's order and loads labels
exactly as MMSegmentation's `LoadAnnotations` does:

- the PNG is read with PIL without conversion, so palette PNGs give their palette indices, not colours;
- the map is squeezed and cast to uint8;
- with `reduce_zero_label`, 0 becomes 255 (ignored), every other value k becomes k - 1, and 255 stays 255.

File order: the split file's line order when the benchmark has one, otherwise a recursive scan of the image
folder for the image suffix (hidden entries skipped), sorted by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from itaclip_core.errors import UserError

IGNORE_INDEX = 255


class DatasetError(UserError, ValueError):
    """A dataset folder is missing, incomplete or malformed."""


class Sample(NamedTuple):
    """One evaluation image and its label map."""

    name: str  # image path relative to the image folder, without the image suffix (e.g. "2007_000033")
    image_path: Path
    label_path: Path


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark keeps its files and how its labels are read."""

    name: str  # registry name, e.g. "voc21"
    title: str  # human-readable benchmark name for reports
    image_dir: str  # image folder relative to the dataset base folder
    label_dir: str  # label folder relative to the dataset base folder
    image_suffix: str  # file-name ending of images, e.g. ".jpg" or "_leftImg8bit.png"
    label_suffix: str  # file-name ending of label maps, replacing `image_suffix`
    num_classes: int  # number of evaluated classes (label values 0..num_classes-1 after loading)
    class_names: tuple[str, ...]  # display name of each evaluated class
    reduce_zero_label: bool = False  # 0 -> 255 (ignored), k -> k-1, as MMSegmentation's option of that name
    split_file: str | None = None  # split list relative to the base folder (one name per line); None: sorted scan
    base_dir: str = ""  # folder under the root holding the rest (e.g. "VOC2012"); the root may also be it
    raw_values: frozenset[int] = field(default_factory=frozenset)  # values a label file may hold on disk
    quoted_size: int | None = None  # commonly quoted number of validation images

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label map as MMSegmentation does: PIL without conversion, squeezed, cast to uint8.

    Palette PNGs yield their palette indices. A label file holding colours (RGB) is an error, since its
    values are not class indices.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label file not found: {path} (run `itaclip data check` on the dataset root)")
    try:
        with Image.open(path) as image:
            array = np.array(image)
    except (OSError, ValueError) as error:
        raise DatasetError(f"could not read the label file {path}: {error}") from error
    array = array.squeeze()
    if array.ndim != 2:
        raise DatasetError(
            f"label file {path} has shape {array.shape}: expected a single-channel map of class indices "
            "(a grayscale or palette PNG), not a colour image"
        )
    return array.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSegmentation's `reduce_zero_label` on a uint8 map: 0 -> 255, k -> k-1 (1 <= k <= 254), 255 -> 255."""
    out = label.astype(np.uint8, copy=True)
    out[label == 0] = 255
    out = out - np.uint8(1)  # uint8 arithmetic; 255 becomes 254 and is restored below
    out[out == 254] = 255
    return out


def scan_images(image_dir: Path, suffix: str) -> list[str]:
    """Paths (relative, '/'-separated) of the files under `image_dir` ending with `suffix`, sorted.

    Hidden files and folders are skipped and folders are searched recursively, as MMEngine's directory listing
    does.
    """
    found: list[str] = []
    for current, dirs, files in os.walk(image_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative_dir = Path(current).relative_to(image_dir)
        for file_name in files:
            if file_name.startswith(".") or not file_name.endswith(suffix):
                continue
            found.append((relative_dir / file_name).as_posix())
    return sorted(found)


def read_split_file(path: Path) -> list[str]:
    """Image names listed in a split file, one per line, in file order (surrounding spaces and blank lines
    dropped)."""
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [name for name in names if name]


def resolve_base(spec: DatasetSpec, root: Path) -> Path:
    """The folder holding `spec.image_dir`: `root/base_dir`, or `root` itself when it is that folder."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"dataset root {root} is a file; give the folder holding {spec.title}",
                           cli=f"--data-root {root} is a file; give the folder holding {spec.title}")
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}", cli=f"--data-root {root}: dataset root not found")
    candidates = [root / spec.base_dir, root] if spec.base_dir else [root]
    for base in candidates:
        if (base / spec.image_dir).is_dir():
            return base
    expected = f"{spec.base_dir}/{spec.image_dir}" if spec.base_dir else spec.image_dir
    raise DatasetError(
        f"{spec.title}: image folder {root / expected} not found; the dataset root must hold {expected}/ "
        "(MMSegmentation's layout)"
    )


class SegDataset:
    """A benchmark's evaluation samples with MMSegmentation-exact label loading."""

    def __init__(self, spec: DatasetSpec, root: str | Path) -> None:
        """Open `root` as the dataset described by `spec`.

        Args:
            spec: the benchmark's layout and label convention.
            root: the dataset root (the folder holding e.g. `VOC2012/` or `images/` and `annotations/`).

        Raises:
            DatasetError: the root, the image folder or the split file does not exist.
        """
        self.spec = spec
        self.root = Path(root)
        self.base = resolve_base(spec, self.root)
        self.image_dir = self.base / spec.image_dir
        self.label_dir = self.base / spec.label_dir
        self.split_path = self.base / spec.split_file if spec.split_file else None
        self.samples: list[Sample] = self._list_samples()

    def _list_samples(self) -> list[Sample]:
        spec = self.spec
        if self.split_path is not None:
            if not self.split_path.is_file():
                raise DatasetError(
                    f"{spec.title}: split file {self.split_path} not found; the evaluation list is read from it"
                )
            names = read_split_file(self.split_path)
        else:
            names = [rel[: -len(spec.image_suffix)] for rel in scan_images(self.image_dir, spec.image_suffix)]
        return [
            Sample(name, self.image_dir / (name + spec.image_suffix), self.label_dir / (name + spec.label_suffix))
            for name in names
        ]

    @property
    def name(self) -> str:
        """Registry name of the benchmark."""
        return self.spec.name

    @property
    def num_classes(self) -> int:
        """Number of evaluated classes."""
        return self.spec.num_classes

    @property
    def class_names(self) -> list[str]:
        """Display name of each evaluated class, in label order."""
        return list(self.spec.class_names)

    @property
    def ignore_index(self) -> int:
        """Label value excluded from scoring."""
        return IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def load_label(self, index: int) -> np.ndarray:
        """The label map of sample `index` as evaluated: (H, W) uint8, classes 0..N-1, 255 ignored."""
        label = read_label_png(self.samples[index].label_path)
        if self.spec.reduce_zero_label:
            label = reduce_zero_label(label)
        return label

    def __repr__(self) -> str:
        return f"SegDataset({self.spec.name!r}, root={str(self.root)!r}, {len(self)} images)"
