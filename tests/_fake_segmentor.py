"""A stand-in segmentor for runner tests: predicts each pixel's class from its colour.

On the synthetic datasets made with `easy=True`, every region is painted in its class's colour, so looking the
colour up recovers most labels; the lookup is done on a grid of 16-pixel patches (like a ViT's), so borders are
blocky and the scores are high but not perfect. Built by `make(preset, weights=, device=, overrides=)` as
`itaclip eval --segmentor-factory` expects; the preset is `fake_<dataset>`; overrides: `delay=SECONDS` (sleep
per image), `short_side=N`, `patch=N`, `shift=K` (add K to every prediction modulo the class count).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from itaclip_core.data.registry import get_spec
from itaclip_core.data.synthetic import class_colours
from itaclip_core.inference.preprocess import PreparedImage, denormalise


@dataclass
class FakeConfig:
    name: str
    dataset: str
    short_side: int = 336
    delay: float = 0.0
    shift: int = 0
    patch: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FakePrediction:
    labels: np.ndarray


class ColourLookupSegmentor:
    def __init__(self, config: FakeConfig, weights: str) -> None:
        self.config = config
        spec = get_spec(config.dataset)
        self.class_names = list(spec.class_names)
        self.weights_id = f"fake:{weights}"
        self.colours = class_colours(spec.num_classes).astype(np.int64)  # (N, 3)
        self.calls = 0

    def predict_prepared(self, prepared: PreparedImage) -> FakePrediction:
        self.calls += 1
        rgb = denormalise(prepared.tensor)  # (h, w, 3) uint8 at the resized size
        height, width = prepared.original_size
        patch = self.config.patch
        grid = (max(1, rgb.shape[1] // patch), max(1, rgb.shape[0] // patch))  # (w, h) of a patch grid
        coarse = cv2.resize(rgb, grid, interpolation=cv2.INTER_AREA).astype(np.int64)  # (h/p, w/p, 3)
        distances = ((coarse[:, :, None, :] - self.colours[None, None]) ** 2).sum(-1)  # (h/p, w/p, N)
        labels = cv2.resize(distances.argmin(-1).astype(np.uint8), (width, height),
                            interpolation=cv2.INTER_NEAREST)  # (H, W)
        if self.config.shift:
            labels = (labels + self.config.shift) % len(self.colours)
        if self.config.delay:
            time.sleep(self.config.delay)
        return FakePrediction(labels.astype(np.int64))


def make(preset: str, weights: str = "fake", device: str | None = None, overrides: Any = None) -> ColourLookupSegmentor:
    if not preset.startswith("fake_"):
        raise ValueError(f"fake presets are named fake_<dataset>, got {preset!r}")
    config = FakeConfig(name=preset, dataset=preset[len("fake_"):])
    for item in overrides or []:
        key, _, value = item.partition("=")
        setattr(config, key, type(getattr(config, key))(value))
    return ColourLookupSegmentor(config, weights)
