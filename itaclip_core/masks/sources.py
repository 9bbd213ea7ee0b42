"""Mask proposal sources, in a registry like the attention variants.

A source turns an image (uint8 RGB, (H, W, 3), at its original size) into a `MaskSet` at that size. Registered:
- `superpixels`: SLIC or Felzenszwalb from scikit-image; no weights (the default source);
- `folder`: precomputed masks, `<image stem>.png` (label map, 0 = uncovered, 1..K one mask each) or
  `<image stem>.npz` (boolean (K, H, W) under the key `masks`, or the file's only array);
- `sam`, `sam2`: the automatic mask generators of the `segment-anything` and `sam2` packages
  (`itaclip_core.masks.sam`).

Adding a source is one class:

    @register_mask_source("my-source")
    class MySource(MaskSource):
        def generate(self, image_rgb, name=None):
            ...

`build_mask_source("sam2", generator="corrclip_8")` builds one by name; an existing directory gives a `folder`
source.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
from PIL import Image

from itaclip_core.masks.config import GeneratorConfig, SuperpixelConfig, generator_config
from itaclip_core.masks.maskset import MaskError, MaskSet, as_mask_set
from itaclip_core.registry import registrar

MASK_SOURCES: dict[str, type["MaskSource"]] = {}



# Class decorator adding a mask source to `MASK_SOURCES` under its name: `@register_mask_source("name")`.
register_mask_source = registrar(MASK_SOURCES, "mask source")


class MaskSource:
    """Base class: masks of one image. Subclasses set `default_generator` and implement `generate`."""

    name: ClassVar[str] = ""
    default_generator: ClassVar[str | None] = None  # a GENERATOR_PRESETS name
    config_type: ClassVar[type | None] = None
    cacheable: ClassVar[bool] = True  # generated masks are worth caching on disk
    needs_pixels: ClassVar[bool] = True  # False: masks are read by name (`load`), the pixels are not needed

    def __init__(self, generator: str | GeneratorConfig | None = None, generator_args: Iterable[str] = (),
                 **_: Any) -> None:
        self.config: GeneratorConfig | None = None
        if self.default_generator is not None:
            self.config = generator_config(generator or self.default_generator, generator_args)
            if self.config_type is not None and not isinstance(self.config, self.config_type):
                raise MaskError(f"mask generator {generator!r} is a {type(self.config).__name__}, but the "
                                f"{self.name} source needs a {self.config_type.__name__} (presets: "
                                f"{', '.join(self.presets())})")

    @classmethod
    def presets(cls) -> list[str]:
        from itaclip_core.masks.config import GENERATOR_PRESETS

        return [name for name, config in GENERATOR_PRESETS.items()
                if cls.config_type is not None and isinstance(config, cls.config_type)]

    def settings(self) -> dict[str, Any]:
        """Everything the masks depend on besides the image (the cache key)."""
        from dataclasses import asdict

        return {"source": self.name, "generator": asdict(self.config) if self.config is not None else None}

    def generate(self, image_rgb: np.ndarray, name: str | None = None) -> MaskSet:
        """Masks of an (H, W, 3) uint8 RGB image; `name` is the image's file name when known."""
        raise NotImplementedError

    def load(self, name: str | None, size: tuple[int, int]) -> MaskSet:
        """Masks by image name and size, for sources that do not need the pixels (`needs_pixels = False`)."""
        raise NotImplementedError(f"the {self.name} source needs the image's pixels")


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise MaskError(f"mask sources take (H, W, 3) uint8 RGB images, got {image.shape} {image.dtype}")
    return image


@register_mask_source("superpixels")
class SuperpixelSource(MaskSource):
    """SLIC or Felzenszwalb superpixels (scikit-image): a partition of the whole image, no weights."""

    default_generator = "slic"
    config_type = SuperpixelConfig

    def generate(self, image_rgb: np.ndarray, name: str | None = None) -> MaskSet:
        from skimage.segmentation import felzenszwalb, slic

        image = _check_image(image_rgb)
        config = self.config
        assert isinstance(config, SuperpixelConfig)
        start = time.perf_counter()
        if config.algorithm == "slic":
            labels = slic(image, n_segments=config.n_segments, compactness=config.compactness, sigma=config.sigma,
                          start_label=1, channel_axis=-1)
        else:
            labels = felzenszwalb(image, scale=config.scale, sigma=config.sigma, min_size=config.min_size) + 1
        result = as_mask_set(labels.astype(np.int64), image.shape[:2], what="superpixels")
        result.source = self.name
        result.info["seconds"] = time.perf_counter() - start
        return result


def read_mask_file(path: str | Path, size: tuple[int, int] | None = None) -> MaskSet:
    """Masks from a `.png` label map (0 = uncovered) or a `.npz` of boolean (K, H, W) masks; checked against the
    image `size` (H, W) when given."""
    path = Path(path)
    what = f"mask file {path}"
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = list(data.keys())
                if "masks" in keys:
                    array = data["masks"]
                elif len(keys) == 1:
                    array = data[keys[0]]
                else:
                    raise MaskError(f"{what} holds arrays {', '.join(keys)}: expected one named 'masks' (K, H, W)")
            if array.ndim != 3:
                raise MaskError(f"{what}: expected boolean masks (K, H, W), got an array of shape {array.shape}")
        else:
            with Image.open(path) as image:
                if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise MaskError(f"{what} is a {image.mode} image: a mask label map must be single-channel "
                                    "(paletted, 8- or 16-bit gray) with 0 = uncovered and 1..K one mask each")
                array = np.asarray(image).astype(np.int64)
    except MaskError:
        raise
    except Exception as error:  # unreadable or torn file: a clear message instead of a traceback
        raise MaskError(f"{what} could not be read ({type(error).__name__}: {error})") from None
    return as_mask_set(array, size, what=what)


@register_mask_source("folder")
class FolderSource(MaskSource):
    """Precomputed masks in a folder: `<image stem>.png` or `<image stem>.npz` (module docstring)."""

    cacheable = False
    needs_pixels = False

    def __init__(self, directory: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if directory is None:
            raise MaskError("the folder mask source needs a directory (pass a folder path as the mask source)")
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise MaskError(f"mask folder {self.directory} does not exist")

    def settings(self) -> dict[str, Any]:
        return {"source": self.name, "directory": str(self.directory)}

    def find(self, name: str) -> Path:
        stem = Path(name).stem
        for suffix in (".png", ".npz"):
            candidate = self.directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
        raise MaskError(f"no masks for image {name!r} in {self.directory}: expected {stem}.png (label map) or "
                        f"{stem}.npz (boolean (K, H, W) masks)")

    def load(self, name: str | None, size: tuple[int, int]) -> MaskSet:
        """The masks of the image called `name`, checked against its size (H, W)."""
        if not name:
            raise MaskError("the folder mask source needs the image's file name to find <stem>.png / <stem>.npz; "
                            "pass name=... to predict")
        result = read_mask_file(self.find(name), size)
        result.source = f"folder:{self.directory}"
        return result

    def generate(self, image_rgb: np.ndarray, name: str | None = None) -> MaskSet:
        return self.load(name, _check_image(image_rgb).shape[:2])


def mask_source_names() -> list[str]:
    _register_model_sources()
    return sorted(MASK_SOURCES)


def _register_model_sources() -> None:
    import itaclip_core.masks.sam  # noqa: F401  (registers sam and sam2; imports no optional package)


def build_mask_source(
    spec: str | Path | MaskSource,
    generator: str | GeneratorConfig | None = None,
    generator_args: Iterable[str] = (),
    model: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    progress: bool = False,
) -> MaskSource:
    """A mask source by registry name, or a `folder` source for an existing directory.

    Args:
        spec: `superpixels`, `sam`, `sam2`, `folder:<dir>` or a directory.
        generator: a generator preset name or config (default: the source's own default).
        generator_args: `key=value` overrides of the generator settings.
        model: the SAM / SAM 2 model (`vit_b`, `sam2.1_hiera_t`, ...); default: the source's default.
        checkpoint: a checkpoint path, `random-tiny[:SEED]` (a tiny random model, for tests), or None (official
            download into the cache).
        device: where the generator runs (default: CUDA when available).
    """
    if isinstance(spec, MaskSource):
        return spec
    _register_model_sources()
    text = str(spec)
    if text.startswith("folder:"):
        return FolderSource(text[len("folder:"):])
    if text in MASK_SOURCES:
        cls = MASK_SOURCES[text]
        if cls is FolderSource:
            raise MaskError("give the folder itself as the mask source (a directory path or folder:<dir>)")
        return cls(generator=generator, generator_args=tuple(generator_args), model=model, checkpoint=checkpoint,
                   device=device, progress=progress)
    if Path(text).expanduser().is_dir():
        return FolderSource(text)
    names = ", ".join(name for name in sorted(MASK_SOURCES) if name != "folder")
    raise MaskError(f"unknown mask source {text!r}: use one of {names} or an existing folder of <stem>.png / "
                    "<stem>.npz masks")
