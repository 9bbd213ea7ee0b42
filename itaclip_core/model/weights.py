"""Building CLIP from weights: architecture from tensor shapes, strict loading, and the verified download cache.

`load_clip(name_or_path)` accepts
- an OpenAI model name (`ViT-B/16`, `ViT-B/32`, `ViT-L/14`, `ViT-L/14@336px`; `ViT-B-16` spellings too): the file is
  taken from the cache (`~/.cache/itaclip`, or `$ITACLIP_CACHE`, or `cache_dir`) after its sha256 is verified, or
  downloaded into it;
- a path to a checkpoint (TorchScript archive or state dict in OpenAI's layout, fp16 or fp32);
- `random-tiny` / `random-vit-b-16` (optionally `:SEED`): a seeded random CLIP, for tests and demos;
- `open_clip:<model>/<pretrained tag or checkpoint path>` and `random-open_clip:<model>[:SEED]`: OpenCLIP ViTs
  (see `itaclip_core.model.openclip`; needs the extra `openclip`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from itaclip_core.model.checkpoint import META_KEYS, CheckpointError, read_state_dict
from itaclip_core.model.clip import CLIP, CLIPConfig, cast_like_openai
from itaclip_core.errors import UserError
from itaclip_core.timing import timed


class WeightsUnavailableError(UserError, RuntimeError):
    """The weights cannot be obtained (no network, server error) and are not in the cache."""


class ChecksumError(UserError, RuntimeError):
    """A downloaded file does not have the expected sha256, twice in a row."""


@dataclass(frozen=True)
class RegistryEntry:
    """Where an official checkpoint lives and how to verify it."""

    url: str  # download address
    sha256: str  # expected sha256 of the file
    filename: str  # name of the file in the cache


_BASE = "https://openaipublic.azureedge.net/clip/models"
_OPENAI = {
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
REGISTRY: dict[str, RegistryEntry] = {
    name: RegistryEntry(f"{_BASE}/{sha}/{filename}", sha, filename) for name, (sha, filename) in _OPENAI.items()
}

# The function that opens URLs; tests replace it to run without network.
urlopen: Callable = urllib.request.urlopen


def default_cache_dir() -> Path:
    """`$ITACLIP_CACHE` if set, else `~/.cache/itaclip`."""
    env = os.environ.get("ITACLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "itaclip"


def canonical_name(name: str) -> str | None:
    """The registry name for `ViT-B/16`-like or `ViT-B-16`-like spellings, else None."""
    for key, entry in REGISTRY.items():
        if name in (key, entry.filename, entry.filename[:-3]):
            return key
    return None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _is_verified(path: Path, sha256: str) -> bool:
    """True when `path` has `sha256`; a marker (size, mtime, hash) saves rehashing an unchanged file."""
    if not path.is_file():
        return False
    stat = path.stat()
    marker = _verified_marker(path)
    try:
        record = json.loads(marker.read_text())
        if record == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(path) != sha256:
        return False
    marker.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}))
    return True


def _download_once(entry: RegistryEntry, target: Path, progress: bool) -> bool:
    """Download to a temporary file next to `target`; rename it into place if its sha256 is right."""
    handle, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urlopen(entry.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry.filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != entry.sha256:
            return False
        os.replace(tmp, target)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def download_checkpoint(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The verified local file of an official checkpoint, downloading it into the cache when needed."""
    key = canonical_name(name)
    if key is None:
        raise CheckpointError(f"unknown model name {name!r}; known: {', '.join(REGISTRY)}")
    entry = REGISTRY[key]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / entry.filename
    if _is_verified(target, entry.sha256):
        return target
    if target.exists():
        target.unlink()  # a corrupt or partial file: replaced by a fresh download
        _verified_marker(target).unlink(missing_ok=True)
    for _attempt in range(2):
        try:
            if _download_once(entry, target, progress):
                _is_verified(target, entry.sha256)
                return target
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", None) or error
            first = (f"could not download {key} from {entry.url} ({reason}).\n"
                     f"Without network access, download {entry.filename} (sha256 {entry.sha256}) elsewhere "
                     f"and put it at {target}, or pass its path instead of the name")  # fmt: skip
            raise WeightsUnavailableError(
                first + f" (weights='/path/to/{entry.filename}'), or weights='random-tiny' to try the pipeline.",
                cli=first + f" (--weights /path/to/{entry.filename}), or --weights random-tiny to try the pipeline.",
            ) from None
    raise ChecksumError(
        f"the download of {key} from {entry.url} did not have sha256 {entry.sha256}, twice; nothing was kept in "
        f"{cache}. Check the network (a proxy may alter files) or place a verified {entry.filename} there."
    )


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for key in state for m in [pattern.match(key)] if m})


def config_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> CLIPConfig:
    """Read a ViT CLIP's sizes off an OpenAI-layout state dict."""
    if any(key.startswith("visual.layer1.") for key in state):
        raise CheckpointError(
            f"{source}: this is a ResNet CLIP (RN50/RN101/...), which is not supported; use a ViT checkpoint "
            "such as ViT-B/16"
        )
    required = ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"{source}: not an OpenAI CLIP ViT checkpoint (missing {', '.join(missing)}); "
            "expected keys such as visual.conv1.weight and visual.transformer.resblocks.0.attn.in_proj_weight"
        )
    vision_width, _, patch_size, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=state["text_projection"].shape[1],
        image_size=patch_size * grid,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=_count_blocks(state, "visual.transformer.resblocks."),
        vision_heads=max(vision_width // 64, 1),
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count_blocks(state, "transformer.resblocks."),
        text_heads=max(text_width // 64, 1),
    )


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def build_clip(
    state: dict[str, torch.Tensor],
    source: str = "state dict",
    dtype: torch.dtype = torch.float32,
    config: CLIPConfig | None = None,
) -> CLIP:
    """A CLIP loaded strictly from `state`, in `dtype` (fp16/bf16 cast as OpenAI).

    The architecture is `config`, or (OpenAI checkpoints) read off the tensor shapes."""
    state = {k: v for k, v in state.items() if k not in META_KEYS}
    config = config or config_from_state_dict(state, source)
    with torch.device("meta"):  # no storage and no initialisation: every tensor comes from `state`
        model = CLIP(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        raise CheckpointError(f"{source}: does not match the CLIP architecture read from it; " + "; ".join(parts))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: tensor shapes do not fit a CLIP ViT ({error})") from error
    if dtype != torch.float32:
        cast_like_openai(model, dtype)
    return model.eval().requires_grad_(False)


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (as the published code runs), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device `device` names, checked to be usable (see `itaclip_core.validation.resolve_device`)."""
    from itaclip_core.validation import resolve_device as checked_device

    return checked_device(device)


WEIGHTS_HELP = (f"a model name ({', '.join(REGISTRY)}; downloaded once into the verified cache), a checkpoint "
                "file (TorchScript or OpenAI-layout state dict), open_clip:<model>/<pretrained tag or checkpoint path> "
                "for an OpenCLIP / MetaCLIP model, or random-tiny / random-vit-b-16 / random-open_clip:<model> "
                "(optionally :SEED) for a random test model")  # fmt: skip


def check_weights_spec(spec: str | Path) -> None:
    """Refuse a weights argument that can be seen to be wrong without loading anything (a missing file, a folder,
    an unknown random model).

    Raises:
        CheckpointError: naming the argument, in Python's (`weights=`) and the CLI's (`--weights`) terms.
    """
    from itaclip_core.model.random import RANDOM_SIZES, is_random_spec

    text = str(spec)
    if text.startswith(("open_clip:", "random-open_clip:")):  # checked by itaclip_core.model.openclip when loaded
        return
    if is_random_spec(text):
        size = text.split(":")[0][len("random-"):]
        if size not in RANDOM_SIZES:
            known = ", ".join(f"random-{s}" for s in RANDOM_SIZES)
            raise CheckpointError(f"weights={text!r}: unknown random model; use one of {known} (optionally :SEED)",
                                  cli=f"--weights {text}: unknown random model; use one of {known} (optionally :SEED)")
        return
    if canonical_name(text) is not None:
        return
    path = Path(text).expanduser()
    if path.is_dir():
        problem = ": is a folder; give the checkpoint file inside it"
    elif not path.exists():
        problem = ": checkpoint not found (no such file, and not a known model name)"
    else:
        return
    raise CheckpointError(f"weights={text!r}{problem}.\nAccepted: {WEIGHTS_HELP}",
                          cli=f"--weights {text}{problem}.\nAccepted: {WEIGHTS_HELP}")


@timed("model load")
def load_clip(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
) -> CLIP:
    """Load a CLIP for inference.

    Args:
        name_or_path: an OpenAI model name, a checkpoint path, `random-tiny` / `random-vit-b-16` (`:SEED`),
            `open_clip:<model>/<tag or path>` or `random-open_clip:<model>[:SEED]`.
        device: where to put the model (default: CUDA when available, else CPU).
        cache_dir: the download cache (default `$ITACLIP_CACHE` or `~/.cache/itaclip`).
        dtype: `float32`, `float16` or `bfloat16` (default float16 on CUDA, float32 on CPU).
        progress: show a progress bar while downloading.
    """
    from itaclip_core.model.random import is_random_spec, random_clip_from_spec

    from itaclip_core.validation import resolve_dtype

    torch_device = resolve_device(device)
    dtype = resolve_dtype(dtype) or default_dtype(torch_device)
    spec = str(name_or_path)
    check_weights_spec(spec)
    from itaclip_core.model import openclip

    if openclip.is_random_open_clip_spec(spec):
        model = openclip.random_open_clip(spec, dtype=dtype)
    elif openclip.is_open_clip_spec(spec):
        model = openclip.load_open_clip(spec, cache_dir, dtype)
    elif is_random_spec(spec):
        model = random_clip_from_spec(spec, dtype=dtype)
    elif canonical_name(spec) is not None:
        path = download_checkpoint(spec, cache_dir, progress)
        model = build_clip(read_state_dict(path), str(path), dtype)
        model.weights_id = f"{canonical_name(spec)} sha256:{REGISTRY[canonical_name(spec)].sha256}"
    else:
        path = Path(spec).expanduser()
        model = build_clip(read_state_dict(path), str(path), dtype)
        model.weights_id = f"{path.name} sha256:{file_sha256(path)}"
    return model.to(torch_device)
