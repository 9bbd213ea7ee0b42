"""Masks of each image cached on disk, keyed by the image's content and the generator's settings.

The key is the sha256 of the decoded RGB pixels (and their shape) together with the source's `settings()` (source,
generator config, model, checkpoint), so comparing methods or re-running an evaluation generates each image's
masks once; changing any setting generates them again. Files are `<cache>/masks/<source>/<key>.npz` holding the
masks bit-packed and their scores, written through a temporary file renamed into place; a torn or unreadable file
is generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from itaclip_core.masks.maskset import MaskSet
from itaclip_core.masks.sources import MaskSource
from itaclip_core.model.weights import default_cache_dir

CACHE_VERSION = 1


def image_digest(image_rgb: np.ndarray) -> str:
    """sha256 of an image's pixels and shape."""
    image = np.ascontiguousarray(image_rgb)
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def cache_key(source: MaskSource, image_rgb: np.ndarray) -> str:
    settings = json.dumps({"version": CACHE_VERSION, **source.settings()}, sort_keys=True, default=str)
    return hashlib.sha256(f"{image_digest(image_rgb)}|{settings}".encode()).hexdigest()[:40]


def save_mask_set(path: Path, masks: MaskSet) -> None:
    """Write `masks` to `path` (.npz) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        count, height, width = masks.masks.shape
        np.savez_compressed(
            tmp,
            packed=np.packbits(masks.masks.reshape(count, height * width), axis=1),
            shape=np.array([count, height, width], dtype=np.int64),
            scores=masks.scores if masks.scores is not None else np.zeros(0, dtype=np.float32),
            has_scores=np.array(masks.scores is not None),
            source=np.array(masks.source),
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_mask_set(path: Path) -> MaskSet | None:
    """The masks saved at `path`, or None when the file is missing, torn or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            count, height, width = (int(v) for v in data["shape"])
            bits = np.unpackbits(data["packed"], axis=1, count=height * width) if count else \
                np.zeros((0, height * width), dtype=np.uint8)
            masks = bits.astype(bool).reshape(count, height, width)
            scores = data["scores"].astype(np.float32) if bool(data["has_scores"]) else None
            return MaskSet(masks, scores, source=str(data["source"]), info={"cached": True})
    except Exception:  # missing, truncated or otherwise broken: generate again
        return None


class MaskCache:
    """Generate-or-load masks for a source; `generated` counts the images that were actually generated."""

    def __init__(self, source: MaskSource, directory: str | Path | None = None) -> None:
        self.source = source
        base = Path(directory).expanduser() if directory is not None else default_cache_dir() / "masks"
        self.directory = base / source.name
        self.generated = 0
        self.loaded = 0

    def path(self, image_rgb: np.ndarray) -> Path:
        return self.directory / f"{cache_key(self.source, image_rgb)}.npz"

    def get(self, image_rgb: np.ndarray, name: str | None = None) -> MaskSet:
        if not self.source.cacheable:
            return self.source.generate(image_rgb, name)
        path = self.path(image_rgb)
        cached = load_mask_set(path) if path.is_file() else None
        if cached is not None and cached.size == tuple(image_rgb.shape[:2]):
            self.loaded += 1
            return cached
        masks = self.source.generate(image_rgb, name)
        save_mask_set(path, masks)
        self.generated += 1
        return masks
