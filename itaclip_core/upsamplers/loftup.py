"""LoftUp (Huang et al., arXiv 2504.14032), the learned feature upsampler, rebuilt for CLIP features.

LoftUp is TRAINED, not training-free: the published CLIP checkpoint (`haiwen/loftup-clip`, `pytorch_model.bin`) was
trained on MaskCLIP-style value features of OpenAI ViT-B/16 at 224 x 224 (a 14 x 14 grid of 512-d features). No
result of it on ITACLIP or SCLIP features has been published; using it there is an experiment.

Architecture (module and parameter names follow the checkpoint, so it loads strictly):

- `channelnorm`: LayerNorm of the low-resolution features over channels;
- `upsampler.lr_pe`: sine code of the low-resolution grid (row, column in linspace(-1, 1); 5 frequencies
  exp(linspace(-2, 10, 5)); learned phases), appended to the features: keys and values of dim + 20 channels;
- `upsampler.fourier_feat`: the guide image min-max scaled per colour channel to [-0.5, 0.5] (over the batch and
  all pixels), then sine/cosine codes of (row, column, r, g, b) with 20 frequencies and learned phases, plus the
  scaled colours (203 channels);
- `upsampler.first_conv`: channel LayerNorm, 3x3 conv, BatchNorm, ReLU, 3x3 conv, BatchNorm, ReLU: one query per
  output pixel;
- `upsampler.ca_transformer`: 2 layers of pre-norm cross-attention (4 heads; every output pixel attends to all
  low-resolution tokens) and feed-forward (GELU), each with a residual, then a LayerNorm;
- `upsampler.final_conv`: 1x1 conv to dim and a channel LayerNorm (eps 1e-6).

The output has the guide's size (any size) and `dim` channels. Output pixels are processed in chunks, which does
not change the result (each pixel's attention is independent of the others').
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import urllib.error
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from itaclip_core.errors import UserError
import itaclip_core.model.weights as weights_module
from itaclip_core.model.weights import RegistryEntry, WeightsUnavailableError, default_cache_dir, file_sha256

LOFTUP_CLIP = RegistryEntry(
    url="https://huggingface.co/haiwen/loftup-clip/resolve/main/pytorch_model.bin",
    sha256="",  # not published; the file is checked by its exact key layout and shapes instead (see load_loftup)
    filename="loftup-clip/pytorch_model.bin",
)
LOFTUP_CLIP_DIM = 512
PE_CHANNELS = 20  # 2 coordinates x 5 frequencies x (sin, cos)

# Output pixels attend in chunks of about this many (pixels x low-resolution tokens x heads) scores.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class LoftUpCheckpointError(UserError, ValueError):
    """A LoftUp file does not have the published key layout."""


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (eps 1e-5)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelLayerNorm2d(nn.Module):
    """ConvNeXt-style channel LayerNorm of a (B, C, H, W) map: biased variance, eps 1e-6, weight and bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MinMaxScale(nn.Module):
    """Per-channel min-max scaling over the batch and all pixels to [-0.5, 0.5] (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        flat = x.transpose(0, 1).reshape(channels, -1)
        low = flat.min(dim=-1).values.view(1, channels, 1, 1)
        span = flat.max(dim=-1).values.view(1, channels, 1, 1) - low
        return (x - low) / span.clamp_min(1e-4) - 0.5


class SineFeatures(nn.Module):
    """Sine and cosine codes of the pixel grid (and optionally the pixels' values) with learned phases.

    Inputs per pixel: the row and column coordinates (linspace(-1, 1) along each axis), then the image's channels
    if `with_values`. With F frequencies exp(linspace(-2, 10, F)) and D inputs, the output is F*D sine channels,
    F*D cosine channels (channel f*D + d, phase `biases[s].flatten()[f*D + d]`), then the values if `with_values`.
    """

    def __init__(self, inputs: int, freqs: int, with_values: bool) -> None:
        super().__init__()
        self.inputs = inputs
        self.freqs = freqs
        self.with_values = with_values
        self.biases = nn.Parameter(torch.randn(2, inputs, freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        rows = torch.linspace(-1, 1, height, device=x.device)
        cols = torch.linspace(-1, 1, width, device=x.device)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))[None].expand(batch, 2, height, width)
        feats = torch.cat([grid, x], dim=1) if self.with_values else grid  # (B, D, H, W)
        freqs = torch.exp(torch.linspace(-2, 10, self.freqs, device=x.device)).view(1, self.freqs, 1, 1, 1)
        feats = feats[:, None] * freqs  # (B, F, D, H, W)
        sin = (feats + self.biases[0].reshape(1, self.freqs, self.inputs, 1, 1)).reshape(batch, -1, height, width)
        cos = (feats + self.biases[1].reshape(1, self.freqs, self.inputs, 1, 1)).reshape(batch, -1, height, width)
        parts = [torch.sin(sin), torch.cos(cos)] + ([x] if self.with_values else [])
        return torch.cat(parts, dim=1)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention with a residual: q + MHA(norm_q(q), norm_kv(kv), norm_kv(kv))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        return q + self.attention(self.norm_q(q), kv, kv, need_weights=False)[0]


class FeedForward(nn.Module):
    """LayerNorm, Linear, GELU, Linear (dropouts of p = 0 kept for the parameter indices), with a residual."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class CATransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim, heads), FeedForward(dim, hidden)]) for _ in range(depth)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            q = feed_forward(attention(q, kv))
        return self.norm(q)


class LoftUpCore(nn.Module):
    """LoftUp proper (the checkpoint's `upsampler.*`): (B, dim, h, w) features and a guide -> (B, dim, H, W)."""

    def __init__(self, dim: int, image_freqs: int = 20, pe_freqs: int = 5, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        width = dim + 4 * pe_freqs
        if width % heads:
            raise ValueError(f"LoftUp needs dim + {4 * pe_freqs} divisible by {heads} heads; dim is {dim}")
        self.lr_pe = SineFeatures(2, pe_freqs, with_values=False)
        self.fourier_feat = nn.Sequential(MinMaxScale(), SineFeatures(5, image_freqs, with_values=True))
        image_channels = 2 * 5 * image_freqs + 3
        self.first_conv = nn.Sequential(
            ChannelNorm(image_channels), nn.Conv2d(image_channels, width, 3, padding=1), nn.BatchNorm2d(width),
            nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.final_conv = nn.Sequential(nn.Conv2d(width, dim, 1), ChannelLayerNorm2d(dim))
        self.ca_transformer = CATransformer(width, depth, heads, dim)
        self.heads = heads

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
        batch, _, height, width = image.shape
        pe = self.lr_pe(lr_feats[:, :0])  # only the grid's shape is used
        kv = torch.cat([lr_feats, pe], dim=1).flatten(2).transpose(1, 2)  # (B, h*w, dim + 20)
        q = self.first_conv(self.fourier_feat(image)).flatten(2).transpose(1, 2)  # (B, H*W, dim + 20)
        step = max(1, chunk_elements // max(1, kv.shape[1] * self.heads * batch))
        out = torch.cat([self.ca_transformer(q[:, s : s + step], kv) for s in range(0, q.shape[1], step)], dim=1)
        out = out.transpose(1, 2).reshape(batch, -1, height, width)
        return self.final_conv(out)


class LoftUp(nn.Module):
    """The published wrapper: `upsampler(channelnorm(lr_feats), image)`; keys `upsampler.*` and `channelnorm.*`."""

    def __init__(self, dim: int = LOFTUP_CLIP_DIM) -> None:
        super().__init__()
        self.dim = dim
        self.upsampler = LoftUpCore(dim)
        self.channelnorm = ChannelNorm(dim)

    @torch.no_grad()
    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
        """(B, dim, h, w) low-resolution features and a (B, 3, H, W) guide image -> (B, dim, H, W).

        The guide is any positive per-channel affine transform of RGB (the min-max scaling removes it): the
        published code passes ImageNet-normalised RGB; CLIP-normalised RGB gives the same result up to rounding.
        The min-max range is shared across the batch, so images are best upsampled one at a time.
        """
        if lr_feats.ndim != 4 or lr_feats.shape[1] != self.dim:
            raise ValueError(f"lr_feats has shape {tuple(lr_feats.shape)}: expected (B, {self.dim}, h, w)")
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] != lr_feats.shape[0]:
            raise ValueError(f"image has shape {tuple(image.shape)}: expected ({lr_feats.shape[0]}, 3, H, W)")
        return self.upsampler(self.channelnorm(lr_feats), image, chunk_elements)


# ----------------------------------------------------------------------------------------------- loading
def expected_layout(dim: int = LOFTUP_CLIP_DIM) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the checkpoint of a LoftUp of `dim` channels, in state-dict order."""
    with torch.device("meta"):
        module = LoftUp(dim)
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def build_loftup(state: dict[str, torch.Tensor], source: str = "state dict") -> LoftUp:
    """A float32 LoftUp in eval mode, loaded strictly from a state dict in the published layout."""
    if not isinstance(state, dict) or "channelnorm.norm.weight" not in state:
        raise LoftUpCheckpointError(
            f"{source}: not a LoftUp checkpoint in the published layout (haiwen/loftup-clip pytorch_model.bin: keys "
            "upsampler.* and channelnorm.norm.*); a training checkpoint or model.safetensors has another layout"
        )
    dim = int(state["channelnorm.norm.weight"].shape[0])
    expected = expected_layout(dim)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [f"{key} {tuple(state[key].shape)} (expected {shape})" for key, shape in expected.items()
             if key in state and tuple(state[key].shape) != shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise LoftUpCheckpointError(f"{source}: does not have the published LoftUp layout; " + "; ".join(parts))
    model = LoftUp(dim)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def random_loftup(dim: int = LOFTUP_CLIP_DIM, seed: int = 0) -> LoftUp:
    """A seeded, randomly initialised LoftUp (for tests and demos; not trained)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LoftUp(dim)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval().requires_grad_(False)


def loftup_cache_path(cache_dir: str | Path | None = None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / LOFTUP_CLIP.filename


def load_loftup(weights: str | Path | None = None, cache_dir: str | Path | None = None, dim: int | None = None,
                progress: bool = True) -> LoftUp:
    """The LoftUp CLIP upsampler.

    Args:
        weights: a path to `pytorch_model.bin` of `haiwen/loftup-clip`; None: the cache (`<cache>/loftup-clip/
            pytorch_model.bin`), downloading it there when the hub is reachable; `random` or `random:SEED`: a seeded
            random LoftUp of `dim` channels (not trained).
        cache_dir: the cache (default `$ITACLIP_CACHE` or `~/.cache/itaclip`).
        dim: the feature width for random weights (default 512).
        progress: show a progress bar while downloading.
    """
    spec = "" if weights is None else str(weights)
    match = re.fullmatch(r"random(?::(\d+))?", spec)
    if match:
        return random_loftup(dim or LOFTUP_CLIP_DIM, int(match.group(1) or 0))
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"LoftUp weights not found: {path}. Download pytorch_model.bin from the Hugging Face repository "
                f"haiwen/loftup-clip ({LOFTUP_CLIP.url}) and pass its path, or put it at {loftup_cache_path(cache_dir)}"
            )
    else:
        path = _cached_or_download(cache_dir, progress)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip or weights_only errors: the file is not a plain state dict
        raise LoftUpCheckpointError(
            f"{path}: cannot be read as a plain state dict with torch.load(weights_only=True) ({error}); expected "
            "pytorch_model.bin of haiwen/loftup-clip"
        ) from error
    model = build_loftup(state, str(path))
    model.weights_id = f"{path.name} sha256:{file_sha256(path)}"
    return model


def _cached_or_download(cache_dir: str | Path | None, progress: bool) -> Path:
    """The cached checkpoint; without one, a download into the cache (its layout is checked when it is loaded)."""
    target = loftup_cache_path(cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=".pytorch_model.bin.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, weights_module.urlopen(LOFTUP_CLIP.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="loftup-clip", disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        state = torch.load(tmp, map_location="cpu", weights_only=True)
        build_loftup(state, LOFTUP_CLIP.url)  # the layout check is the verification (no published hash)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise WeightsUnavailableError(
            f"could not download the LoftUp CLIP weights from {LOFTUP_CLIP.url} ({error}).\n"
            f"Without network access, download pytorch_model.bin of the Hugging Face repository haiwen/loftup-clip "
            f"(about 27 MiB) elsewhere and put it at {target}, or pass its path (--set upsampler_weights=PATH)."
        ) from error
    finally:
        tmp.unlink(missing_ok=True)
    return target


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
