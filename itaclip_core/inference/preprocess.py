"""Image path into the model, exactly as the MMSegmentation pipelines of ITACLIP and SCLIP do it.

1. decode with OpenCV (`IMREAD_COLOR`: uint8 BGR; grayscale, palette, RGBA and 16-bit are converted by OpenCV),
2. keep-ratio resize so the short side is `short_side` (long side at most `long_side`), OpenCV bilinear on uint8,
3. BGR -> RGB, float32, normalise with CLIP's mean and std (x 255).

A model trained with other constants (e.g. OpenCLIP ViT-L/14 laion2b: mean = std = 0.5) gets its windows
re-normalised by the inference engine (`renormalise_for`) before any view is made, which equals normalising with its
own constants here.

The logits are brought back to the ORIGINAL size by the segmentor, so the original size is kept with the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image

from itaclip_core.errors import UserError
from itaclip_core.model.clip import OPENAI_MEAN, OPENAI_STD  # the same constants on the [0, 1] scale

# CLIP's normalisation constants, times 255, in RGB order (as the published pipelines round them).
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]

# Leading bytes of image formats, to tell a damaged file from one that is not an image at all.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
               b"GIF8": "GIF", b"RIFF": "WebP"}  # fmt: skip


class ImageReadError(UserError, ValueError):
    """An image could not be read or has an unsupported layout."""


@dataclass
class PreparedImage:
    """A resized, normalised image ready for the model, with what is needed to undo the resize."""

    tensor: torch.Tensor  # (3, h, w) float32, RGB, normalised with CLIP's mean and std
    original_size: tuple[int, int]  # (H, W) of the decoded image; predictions are returned at this size
    name: str = ""  # file name or a caller-given label, used in messages and outputs


def read_image_bgr(path: str | Path) -> np.ndarray:
    """Decode a file as OpenCV's `IMREAD_COLOR` does: (H, W, 3) uint8 BGR."""
    if str(path).startswith(("http://", "https://")):
        raise ImageReadError(f"{path}: images are read from files, not URLs; download it first")
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(f"cannot read {path} ({error.strerror})") from None
    if not data.size:
        raise ImageReadError(f"{path} is empty (0 bytes)")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        head = data[:4].tobytes()
        kind = next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)
        if kind is not None:
            raise ImageReadError(f"{path} is a {kind} file that does not decode: it is truncated or damaged")
        raise ImageReadError(f"{path} is not an image OpenCV can read (PNG, JPEG, BMP, TIFF, WebP ...)")
    return image


def to_bgr_uint8(image: ImageInput) -> np.ndarray:
    """Any supported input as (H, W, 3) uint8 BGR, converted the way OpenCV's `IMREAD_COLOR` converts files.

    Arrays are taken as RGB (or gray, or RGBA whose alpha is dropped); uint16 arrays are scaled by 1/256 and
    float arrays must hold values in [0, 1].
    """
    if isinstance(image, (str, Path)):
        return read_image_bgr(image)
    if isinstance(image, torch.Tensor):
        return to_bgr_uint8(_tensor_to_hwc(image))
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image).astype(np.float64) / 256.0
            array = np.clip(array, 0, 255).astype(np.uint8)
        else:
            array = np.asarray(image.convert("RGB"))
        return to_bgr_uint8(array)
    if not isinstance(image, np.ndarray):
        raise ImageReadError(
            f"unsupported image input of type {type(image).__name__}: pass a file path, a PIL image, a numpy array "
            "or a torch tensor"
        )
    array = image
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageReadError(f"image array has shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0):
            raise ImageReadError("a float image array must hold values in [0, 1]; pass uint8 for 0..255 values")
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ImageReadError(f"image array of dtype {array.dtype} is not supported: use uint8, uint16 or float")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageReadError(f"image array has an empty side: shape {image.shape}")
    return np.ascontiguousarray(array[:, :, ::-1])


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """A torch image as a numpy array in (H, W[, C]) layout: (C, H, W) with C in 1, 3, 4 (torchvision's layout,
    a leading batch of one allowed), or (H, W)."""
    array = tensor.detach().cpu()
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        if array.shape[0] not in (1, 3, 4):
            raise ImageReadError(
                f"image tensor has shape {tuple(tensor.shape)}: expected (3, H, W), (1, H, W) or (H, W) "
                "(channels first, as torchvision uses)"
            )
        array = array.permute(1, 2, 0)
    elif array.ndim != 2:
        raise ImageReadError(f"image tensor has shape {tuple(tensor.shape)}: expected (3, H, W), (1, H, W) or (H, W)")
    if array.dtype in (torch.float16, torch.bfloat16):
        array = array.float()
    return array.numpy()


def rescale_size(height: int, width: int, short_side: int, long_side: int = 2048) -> tuple[int, int]:
    """MMCV's keep-ratio rescale: the (new_h, new_w) for a (height, width) image."""
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def protocol_resize(image_bgr: np.ndarray, short_side: int, long_side: int = 2048) -> np.ndarray:
    """Keep-ratio resize with OpenCV bilinear interpolation on the uint8 image (no antialiasing)."""
    height, width = image_bgr.shape[:2]
    new_h, new_w = rescale_size(height, width, short_side, long_side)
    if (new_h, new_w) == (height, width):
        return image_bgr
    return cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalise_bgr(image_bgr: np.ndarray) -> torch.Tensor:
    """uint8 BGR (H, W, 3) -> float32 RGB (3, H, W) normalised with CLIP's constants."""
    rgb = torch.from_numpy(np.ascontiguousarray(image_bgr[:, :, ::-1])).permute(2, 0, 1).float()
    mean = torch.tensor(CLIP_MEAN_255).view(3, 1, 1)
    std = torch.tensor(CLIP_STD_255).view(3, 1, 1)
    return (rgb - mean) / std


def renormalise_for(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An image normalised with CLIP's constants (as `prepare_image` gives it), re-normalised with another model's
    `mean` and `std` (RGB, [0, 1] scale), channels on dim -3. The same tensor when they are CLIP's (OpenAI's)."""
    if tuple(mean) == OPENAI_MEAN and tuple(std) == OPENAI_STD:
        return tensor
    shape = (3, 1, 1)
    clip_mean = torch.tensor(CLIP_MEAN_255, device=tensor.device, dtype=torch.float32).view(shape)
    clip_std = torch.tensor(CLIP_STD_255, device=tensor.device, dtype=torch.float32).view(shape)
    new_mean = torch.tensor([255.0 * m for m in mean], device=tensor.device, dtype=torch.float32).view(shape)
    new_std = torch.tensor([255.0 * s for s in std], device=tensor.device, dtype=torch.float32).view(shape)
    pixels = tensor.float() * clip_std + clip_mean  # back to 0..255 RGB
    return ((pixels - new_mean) / new_std).to(tensor.dtype)


def denormalise(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `normalise_bgr` for display: (3, H, W) normalised -> (H, W, 3) uint8 RGB."""
    mean = torch.tensor(CLIP_MEAN_255, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD_255, device=tensor.device).view(3, 1, 1)
    rgb = (tensor.float() * std + mean).clamp(0, 255).round().byte()
    return rgb.permute(1, 2, 0).cpu().numpy()


def prepare_image(image: ImageInput, short_side: int, long_side: int = 2048, name: str | None = None) -> PreparedImage:
    """Decode (if needed), resize and normalise one image as the evaluation protocol does."""
    bgr = to_bgr_uint8(image)
    if name is None:
        name = Path(image).name if isinstance(image, (str, Path)) else ""
    if short_side < 1 or long_side < 1:
        raise ValueError(f"short_side and long_side must be positive, got {short_side} and {long_side}")
    resized = protocol_resize(bgr, short_side, long_side)
    return PreparedImage(tensor=normalise_bgr(resized), original_size=(bgr.shape[0], bgr.shape[1]), name=name)
