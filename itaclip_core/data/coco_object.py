"""COCO-Object label maps from the original COCO-Stuff 164k stuff-thing maps.

The published conversion (used by GroupViT, TCL, SCLIP and ITACLIP) reads each original stuff-thing map
`annotations/<split>/<id>.png` (ids 0..181, 0 = person, 255 = unlabeled) and writes
`annotations/<split>/<id>_instanceTrainIds.png` with:

- a thing id (<= 90) -> its COCO-Stuff train id + 1, i.e. 1..80 for the 80 used thing ids;
- every stuff id (91..181) and 255 -> 0 (background);
- any other value (the eleven unused ids, 182..254) left as it is, since the conversion only rewrites the ids
  it knows.

The evaluated COCO-Object labels are these values as they are: 81 classes, 0 = background, nothing ignored.
The COCO-Stuff `_labelTrainIds.png` maps follow the same pattern: used ids -> 0..170, 255 -> 255, other
values unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from itaclip_core.data.base import DatasetError
from itaclip_core.data.registry import COCO_MAX_THING_ID, COCO_USED_IDS

OBJECT_SUFFIX = "_instanceTrainIds.png"
STUFF_SUFFIX = "_labelTrainIds.png"


def _stuff_lut() -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)  # unknown values pass through unchanged
    for train_id, raw_id in enumerate(COCO_USED_IDS):
        lut[raw_id] = train_id
    lut[255] = 255
    return lut


def _object_lut() -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)  # unknown values pass through unchanged
    for train_id, raw_id in enumerate(COCO_USED_IDS):
        lut[raw_id] = train_id + 1 if raw_id <= COCO_MAX_THING_ID else 0
    lut[255] = 0
    return lut


STUFF_LUT = _stuff_lut()  # raw stuff-thing id -> COCO-Stuff train id (0..170, 255 kept)
OBJECT_LUT = _object_lut()  # raw stuff-thing id -> COCO-Object label (0 background, 1..80 things)


def _check_raw(raw: np.ndarray) -> np.ndarray:
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise DatasetError(f"a stuff-thing map must be a 2-D uint8 array, got shape {raw.shape} and {raw.dtype}")
    return raw


def stuff_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """Original stuff-thing map (H, W) uint8 -> COCO-Stuff 164k train ids (as `_labelTrainIds.png`)."""
    return STUFF_LUT[_check_raw(raw)]


def stuff_to_object(raw: np.ndarray) -> np.ndarray:
    """Original stuff-thing map (H, W) uint8 -> COCO-Object labels (as `_instanceTrainIds.png`)."""
    return OBJECT_LUT[_check_raw(raw)]


def is_original_map(path: Path) -> bool:
    """An original stuff-thing map, not a converted file (which carry 'TrainIds' in their names)."""
    return path.suffix == ".png" and "TrainIds" not in path.name


def object_path_for(raw_path: Path, out_dir: Path) -> Path:
    """Output path of a converted map: the name up to its first dot, plus `_instanceTrainIds.png`."""
    return out_dir / (raw_path.name.split(".")[0] + OBJECT_SUFFIX)


def _atomic_save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG under a temporary name and rename it, so an interrupted run leaves no torn file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(array).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _atomic_copy(source: Path, target: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@dataclass
class ConversionSummary:
    """What a conversion run did."""

    converted: int = 0  # maps written in this run
    skipped: int = 0  # maps already converted earlier
    images_copied: int = 0  # images copied to the output root (when it differs from the input)


def convert_coco_object(
    coco_root: str | Path,
    out_root: str | Path | None = None,
    splits: Sequence[str] = ("val2017",),
    progress: bool = True,
) -> ConversionSummary:
    """Write COCO-Object `_instanceTrainIds.png` maps for the original stuff-thing maps of a COCO-Stuff root.

    Already converted maps are skipped, so an interrupted run can simply be started again.

    Args:
        coco_root: the COCO-Stuff 164k root, holding `images/<split>/` and `annotations/<split>/<id>.png`.
        out_root: where to write `annotations/<split>/<id>_instanceTrainIds.png`; default `coco_root`.
            When it differs, the split's images are copied to `out_root/images/<split>/` as well.
        splits: the splits to convert ("val2017" is the evaluated one; add "train2017" for all).
        progress: show a progress bar.

    Raises:
        DatasetError: a split's annotation folder is missing or holds no original maps.
    """
    coco_root = Path(coco_root)
    out_root = Path(out_root) if out_root is not None else coco_root
    copy_images = out_root.resolve() != coco_root.resolve()
    summary = ConversionSummary()
    for split in splits:
        source_dir = coco_root / "annotations" / split
        if not source_dir.is_dir():
            raise DatasetError(
                f"{source_dir} not found: give the COCO-Stuff 164k root holding annotations/{split}/ with the "
                "original stuff-thing maps (stuffthingmaps_trainval2017.zip)"
            )
        raw_paths = sorted(p for p in source_dir.iterdir() if p.is_file() and is_original_map(p))
        if not raw_paths:
            raise DatasetError(
                f"{source_dir} holds no original stuff-thing maps (<id>.png); unpack stuffthingmaps_trainval2017.zip "
                "there"
            )
        out_dir = out_root / "annotations" / split
        out_dir.mkdir(parents=True, exist_ok=True)
        for raw_path in tqdm(raw_paths, desc=f"COCO-Object {split}", unit="map", disable=not progress):
            target = object_path_for(raw_path, out_dir)
            if target.is_file():
                summary.skipped += 1
                continue
            with Image.open(raw_path) as image:
                raw = np.array(image)
            if raw.ndim != 2:
                raise DatasetError(f"{raw_path}: expected a single-channel stuff-thing map, got shape {raw.shape}")
            _atomic_save_png(stuff_to_object(raw.astype(np.uint8)), target)
            summary.converted += 1
        if copy_images:
            summary.images_copied += _copy_images(coco_root / "images" / split, out_root / "images" / split, progress)
    return summary


def _copy_images(source_dir: Path, target_dir: Path, progress: bool) -> int:
    if not source_dir.is_dir():
        raise DatasetError(f"{source_dir} not found: the images of the split are copied next to the new labels")
    target_dir.mkdir(parents=True, exist_ok=True)
    copied = 0
    files = sorted(p for p in source_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    for source in tqdm(files, desc=f"copy {source_dir.name} images", unit="img", disable=not progress):
        target = target_dir / source.name
        if not target.is_file():
            _atomic_copy(source, target)
            copied += 1
    return copied
