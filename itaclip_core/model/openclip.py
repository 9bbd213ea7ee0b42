"""OpenCLIP (and MetaCLIP, DFN, DataComp) ViTs in our CLIP classes.

    load_clip("open_clip:ViT-B-16/laion2b_s34b_b88k")            # a pretrained tag, downloaded from the HF hub
    load_clip("open_clip:ViT-B-16-quickgelu/metaclip_fullcc")
    load_clip("open_clip:ViT-L-14//data/ckpt/model.pt")            # after the first `/`: a local checkpoint path
    load_clip("random-open_clip:ViT-L-14")                         # seeded random, the config at tiny widths

The `open_clip_torch` package (extra `openclip`) supplies what it is good at: the model configs, the pretrained tags
with their hub locations and preprocessing constants. The weights run in `itaclip_core.model.clip.CLIP`, whose
parameter names are those of OpenCLIP's own ViT (`visual.transformer.resblocks.N.attn.in_proj_weight`, ...), so the
state dict loads strictly; architecture differences (GELU or QuickGELU, layer scale, widths, heads, MLP ratio,
layer-norm epsilon, image size, normalisation constants) are read from the config into a `CLIPConfig`.

Only what the dense readout can run is accepted: OpenCLIP's own ViT image tower with a class token and token
pooling (no timm towers such as SigLIP's or EVA's, no attention pooling, no average pooling without `ln_pre`, no
ResNets), and the causal BPE text tower pooled at the end-of-text token (no Hugging Face text towers). Anything else
is refused with the reason.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from itaclip_core.errors import UserError
from itaclip_core.model.checkpoint import CheckpointError, read_state_dict
from itaclip_core.model.clip import CLIP, OPENAI_MEAN, OPENAI_STD, CLIPConfig

PREFIX = "open_clip:"
RANDOM_PREFIX = "random-open_clip:"
EXTRA_HINT = "pip install 'itaclip-core[openclip]' (or `make install`)"
# Files tried, in order, in a pretrained tag's Hugging Face repository when the tag names none.
HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Widths of the random tiny versions of a config (depths, patch size and image size are kept).
TINY_VISION_WIDTH, TINY_VISION_HEAD_WIDTH = 64, 32
TINY_TEXT_WIDTH, TINY_TEXT_HEADS, TINY_EMBED_DIM = 64, 2, 64

_VISION_KEYS_OK = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                   "patch_dropout", "output_tokens", "norm_kwargs"}
_TEXT_KEYS_OK = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
                 "output_tokens", "norm_kwargs"}
_TOP_KEYS_OK = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale"}


class OpenClipUnsupportedError(UserError, ValueError):
    """An open_clip model whose architecture our CLIP classes (and so the dense readout) cannot run."""


class MissingExtraError(UserError, ImportError, ValueError):
    """An optional package is not installed (an ImportError; also a ValueError, so that command-line tools report
    it as a user error with its message)."""


def require_open_clip() -> Any:
    """The `open_clip` module, or a MissingExtraError naming the extra."""
    try:
        import open_clip
    except ImportError as error:
        raise MissingExtraError(
            f"open_clip models need the optional package open_clip_torch: {EXTRA_HINT}"
        ) from error
    return open_clip


def is_open_clip_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def is_random_open_clip_spec(spec: str) -> bool:
    return spec.startswith(RANDOM_PREFIX)


def unsupported_reason(cfg: dict[str, Any]) -> str | None:
    """Why an open_clip model config cannot run in our CLIP classes, or None when it can."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        return (f"its image tower is the timm model {vision['timm_model_name']!r} (SigLIP, EVA, ConvNeXt and other "
                "timm towers have no OpenCLIP ViT layout; SigLIP's also pools with attention, without a class token)")
    if not isinstance(vision.get("layers", 12), int):
        return "its image tower is a ResNet (modified ResNet layers), not a ViT"
    if cfg.get("custom_text") or text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        return "its text tower or tokenizer comes from Hugging Face (not the causal BPE text tower of CLIP)"
    if "multimodal_cfg" in cfg:
        return "it is a CoCa model (captioning decoder, attention-pooled image tokens)"
    if vision.get("attentional_pool"):
        return "its image tower pools with attention (attentional_pool), without a class token to read out"
    if vision.get("pool_type", "tok") != "tok":
        return (f"its image embedding is pooled by {vision['pool_type']!r}, not from the class token, so the class "
                "token the dense readout relies on is not trained")
    if vision.get("no_ln_pre"):
        return "its image tower has no ln_pre (CLIPA-style), which the dense readout does not model"
    if vision.get("pos_embed_type", "learnable") != "learnable":
        return f"its positional embedding is {vision['pos_embed_type']!r}, not learnt"
    for key in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
        if vision.get(key) or text.get(key):
            return f"its blocks use {key} (a custom attention block)"
    if vision.get("block_type") not in (None, "default") or text.get("block_type") not in (None, "default"):
        return "its blocks are custom attention blocks"
    if text.get("pool_type", "argmax") != "argmax" or text.get("embed_cls") or text.get("no_causal_mask"):
        return "its text tower is not pooled at the end-of-text token of a causal transformer"
    if text.get("proj_bias") or text.get("proj_type", "linear") != "linear":
        return "its text projection is not a plain matrix"
    for side, part, allowed in (("vision_cfg", vision, _VISION_KEYS_OK), ("text_cfg", text, _TEXT_KEYS_OK)):
        unknown = sorted(set(part) - allowed - {"pool_type", "attentional_pool", "no_ln_pre", "pos_embed_type",
                                                "final_ln_after_pool", "block_type", "embed_cls", "no_causal_mask",
                                                "proj_bias", "proj_type", "act_kwargs"})
        if unknown:
            return f"its {side} sets {', '.join(unknown)}, which our CLIP classes do not model"
        if part.get("act_kwargs"):
            return f"its {side} sets act_kwargs"
        extra_norm = set(part.get("norm_kwargs") or {}) - {"eps"}
        if extra_norm:
            return f"its {side} norm_kwargs set {', '.join(sorted(extra_norm))}"
    unknown_top = sorted(set(cfg) - _TOP_KEYS_OK)
    if unknown_top:
        return f"its config sets {', '.join(unknown_top)}, which our CLIP classes do not model"
    eps = {(vision.get("norm_kwargs") or {}).get("eps", 1e-5), (text.get("norm_kwargs") or {}).get("eps", 1e-5)}
    if len(eps) > 1:
        return "its two towers use different layer-norm epsilons"
    return None


def supported_models() -> list[str]:
    """open_clip model names whose architecture our CLIP classes run."""
    open_clip = require_open_clip()
    return [name for name in open_clip.list_models() if unsupported_reason(open_clip.get_model_config(name) or {})
            is None and open_clip.get_model_config(name)]


def model_config(name: str) -> dict[str, Any]:
    """open_clip's config of `name` (a copy), refusing unknown and unsupported models with the supported list."""
    open_clip = require_open_clip()
    cfg = open_clip.get_model_config(name)
    if not cfg:
        raise ValueError(
            f"unknown open_clip model {name!r}; supported (open_clip ViTs with a class token): "
            + ", ".join(supported_models())
        )
    cfg = copy.deepcopy(cfg)
    reason = unsupported_reason(cfg)
    if reason:
        raise OpenClipUnsupportedError(
            f"open_clip model {name!r} cannot run in itaclip-core: {reason}. Supported open_clip models (ViTs with "
            "a class token and the CLIP text tower): " + ", ".join(supported_models())
        )
    return cfg


def pretrained_config(name: str, tag: str) -> dict[str, Any]:
    """open_clip's entry for a pretrained tag of `name` (hub location, preprocessing, quick_gelu)."""
    open_clip = require_open_clip()
    entry = open_clip.get_pretrained_cfg(name, tag)
    if not entry:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(
            f"unknown pretrained tag {tag!r} for open_clip model {name!r}; its tags: "
            + (", ".join(tags) if tags else "none (pass a local checkpoint path: open_clip:" + name + "//path.pt)")
        )
    return dict(entry)


def config_from_open_clip(
    name: str, cfg: dict[str, Any], pretrained: dict[str, Any] | None = None
) -> CLIPConfig:
    """Our `CLIPConfig` for an open_clip model config (and, optionally, a pretrained tag's entry).

    QuickGELU is used when the model config or the pretrained tag says so (the tag describes how those weights
    were trained); the normalisation constants and the interpolation come from the tag, else open_clip's defaults.
    """
    reason = unsupported_reason(cfg)
    if reason:
        raise OpenClipUnsupportedError(f"open_clip model {name!r} cannot run in itaclip-core: {reason}")
    pretrained = pretrained or {}
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    v_width = int(vision.get("width", 768))
    v_head_width = int(vision.get("head_width", 64))
    t_width = int(text.get("width", 512))
    preprocess = cfg.get("preprocess_cfg", {})
    return CLIPConfig(
        embed_dim=int(cfg["embed_dim"]),
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 16)),
        vision_width=v_width,
        vision_layers=int(vision.get("layers", 12)),
        vision_heads=v_width // v_head_width,
        context_length=int(text.get("context_length", 77)),
        vocab_size=int(text.get("vocab_size", 49408)),
        text_width=t_width,
        text_layers=int(text.get("layers", 12)),
        text_heads=int(text.get("heads", 8)),
        activation="quick_gelu" if (cfg.get("quick_gelu") or pretrained.get("quick_gelu")) else "gelu",
        vision_mlp_width=int(v_width * float(vision.get("mlp_ratio", 4.0))),
        text_mlp_width=int(t_width * float(text.get("mlp_ratio", 4.0))),
        vision_layer_scale=vision.get("ls_init_value") is not None,
        text_layer_scale=text.get("ls_init_value") is not None,
        norm_eps=float((vision.get("norm_kwargs") or {}).get("eps", 1e-5)),
        image_mean=tuple(float(v) for v in pretrained.get("mean", preprocess.get("mean", OPENAI_MEAN))),
        image_std=tuple(float(v) for v in pretrained.get("std", preprocess.get("std", OPENAI_STD))),
        interpolation=str(pretrained.get("interpolation", preprocess.get("interpolation", "bicubic"))),
        name=name,
    )


def shrink_config(cfg: dict[str, Any], layers: int | None = None, text_layers: int | None = None) -> dict[str, Any]:
    """A copy of an open_clip config at tiny widths: same patch size, image size, MLP ratio, activation, layer
    scale and (unless given) depths; vision width 64 with 32-wide heads, text width 64 with 2 heads, embedding 64."""
    cfg = copy.deepcopy(cfg)
    cfg["embed_dim"] = TINY_EMBED_DIM
    cfg["vision_cfg"].update(width=TINY_VISION_WIDTH, head_width=TINY_VISION_HEAD_WIDTH)
    cfg["text_cfg"].update(width=TINY_TEXT_WIDTH, heads=TINY_TEXT_HEADS)
    if layers is not None:
        cfg["vision_cfg"]["layers"] = layers
    if text_layers is not None:
        cfg["text_cfg"]["layers"] = text_layers
    return cfg


def parse_spec(spec: str) -> tuple[str, str]:
    """`open_clip:<model>/<tag or path>` -> (model, tag or path)."""
    body = spec[len(PREFIX):]
    name, sep, rest = body.partition("/")
    if not name or not sep or not rest:
        raise ValueError(
            f"{spec!r}: expected open_clip:<model>/<pretrained tag> (e.g. open_clip:ViT-B-16/laion2b_s34b_b88k) or "
            "open_clip:<model>/<checkpoint path> (e.g. open_clip:ViT-B-16//data/ckpt/model.pt)"
        )
    return name, rest


def _looks_like_path(rest: str) -> bool:
    return rest.startswith(("/", "./", "../", "~")) or Path(rest).suffix in (".pt", ".pth", ".bin", ".safetensors")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint's state dict in the model's own names: a DDP `module.` prefix removed, the causal
    mask buffer (derived, not learnt) dropped, a 1-element `logit_scale` made a scalar."""
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    state = {key: value for key, value in state.items() if key != "attn_mask"}
    if "logit_scale" in state and state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(())
    return state


def read_open_clip_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip checkpoint file (`.safetensors`, or a torch file read with weights_only)."""
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise MissingExtraError(f"reading {path} needs the safetensors package: {EXTRA_HINT}") from error
        try:
            return clean_state_dict(load_file(str(path), device="cpu"))
        except Exception as error:  # safetensors raises its own error types on damaged files
            raise CheckpointError(f"{path}: damaged or not a safetensors file ({error})") from error
    return clean_state_dict(read_state_dict(path))


def check_shapes(model: CLIP, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Strict check of names and shapes, with an error naming the model and what the checkpoint holds."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
             for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatches: " + "; ".join(wrong[:6]) + (f" ({len(wrong) - 6} more)" if len(wrong) > 6
                                                                        else ""))
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(
            f"{source}: not a checkpoint of open_clip model {name!r} ({'; '.join(parts)}). Name the architecture the "
            "file was trained with (open_clip:<model>//path), e.g. one of: " + ", ".join(supported_models()[:12])
            + ", ..."
        )


def build_from_state_dict(
    config: CLIPConfig, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype = torch.float32
) -> CLIP:
    """Our CLIP with `config`, loaded strictly from an open_clip-layout state dict."""
    from itaclip_core.model.weights import build_clip

    state = clean_state_dict(state)
    with torch.device("meta"):  # shapes only
        reference = CLIP(config)
    check_shapes(reference, state, source, config.name)
    return build_clip(state, source, dtype, config=config)


# ------------------------------------------------------------------------------------------------ download
def _default_hf_download(repo_id: str, filename: str, cache_dir: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise MissingExtraError(f"downloading open_clip weights needs huggingface_hub: {EXTRA_HINT}") from error
    return hf_hub_download(repo_id, filename, cache_dir=cache_dir)


# The hub download function (repo_id, filename, cache_dir) -> local path; tests replace it to run offline.
hf_download: Callable[[str, str, str], str] = _default_hf_download

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def download_open_clip(name: str, tag: str, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """The verified local file of a pretrained tag and its sha256, downloaded from the HF hub into the cache.

    The hub's cache stores each large file under its sha256 (`blobs/<sha256>`); the file is hashed against that
    name (once: a marker records size, mtime and hash), re-downloaded once if it differs, then refused.
    """
    from itaclip_core.model.weights import (
        ChecksumError,
        WeightsUnavailableError,
        _is_verified,
        _verified_marker,
        default_cache_dir,
        file_sha256,
    )

    entry = pretrained_config(name, tag)
    hub = entry.get("hf_hub", "")
    if not hub:
        raise WeightsUnavailableError(
            f"open_clip:{name}/{tag} has no Hugging Face hub entry ({entry.get('url') or 'no URL'}); download the "
            f"file yourself and pass open_clip:{name}//path/to/file"
        )
    repo_id, filename = hub.rstrip("/"), None
    if not hub.endswith("/"):
        repo_id, filename = hub.rsplit("/", 1)
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "open_clip"
    cache.mkdir(parents=True, exist_ok=True)
    candidates = (filename,) if filename else HF_FILENAMES
    errors = []
    for candidate in candidates:
        for _attempt in range(2):
            try:
                local = Path(hf_download(repo_id, candidate, str(cache)))
            except Exception as error:  # network errors, missing file in the repo, no hub client
                first_line = str(error).splitlines()[0] if str(error) else ""
                errors.append(f"{candidate}: {type(error).__name__}: {first_line}")
                break
            real = local.resolve()
            expected = real.name if _SHA256.match(real.name) else None
            if expected is None:
                return local, file_sha256(local)
            if _is_verified(real, expected):
                return local, expected
            real.unlink(missing_ok=True)  # corrupt blob: fetched again once
            _verified_marker(real).unlink(missing_ok=True)
            local.unlink(missing_ok=True)
        else:
            raise ChecksumError(
                f"open_clip:{name}/{tag}: {repo_id}/{candidate} did not match its sha256 twice; nothing was kept"
            )
    first = candidates[-1]
    raise WeightsUnavailableError(
        f"could not get the weights of open_clip:{name}/{tag} from the Hugging Face hub repository {repo_id} "
        f"({'; '.join(errors)}).\nWithout network access, download https://huggingface.co/{repo_id}/resolve/main/"
        f"{first} elsewhere and pass its path: --weights open_clip:{name}//path/to/{first}"
    )


def _warn_other_constants(name: str, config: CLIPConfig) -> None:
    """A local file carries no preprocessing: warn when some pretrained tag of the model uses other constants."""
    open_clip = require_open_clip()
    others = []
    for tag in open_clip.list_pretrained_tags_by_model(name):
        entry = open_clip.get_pretrained_cfg(name, tag) or {}
        mean, std = tuple(entry.get("mean", OPENAI_MEAN)), tuple(entry.get("std", OPENAI_STD))
        if (mean, std) != (config.image_mean, config.image_std):
            others.append(f"{tag} (mean {mean}, std {std})")
    if others:
        warnings.warn(
            f"open_clip:{name} from a local file is normalised with mean {config.image_mean} and std "
            f"{config.image_std}; these tags of {name} were trained with other constants: {', '.join(others)}. "
            "If the file is one of them, load it by its tag (open_clip:<model>/<tag>) instead.", stacklevel=3)


# ------------------------------------------------------------------------------------------------ entry points
def load_open_clip(
    spec: str, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> CLIP:
    """The CLIP an `open_clip:<model>/<tag or path>` spec names, on the CPU."""
    from itaclip_core.model.weights import file_sha256

    name, rest = parse_spec(spec)
    cfg = model_config(name)
    if _looks_like_path(rest):
        path = Path(rest).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"checkpoint not found: {path} (from {spec!r}); pass an existing open_clip checkpoint, or a "
                f"pretrained tag of {name}: {', '.join(require_open_clip().list_pretrained_tags_by_model(name))}"
            )
        config = config_from_open_clip(name, cfg)
        _warn_other_constants(name, config)
        model = build_from_state_dict(config, read_open_clip_file(path), str(path), dtype)
        model.weights_id = f"open_clip:{name}/{path.name} sha256:{file_sha256(path)}"
        return model
    pretrained = pretrained_config(name, rest)
    config = config_from_open_clip(name, cfg, pretrained)
    path, sha = download_open_clip(name, rest, cache_dir)
    model = build_from_state_dict(config, read_open_clip_file(path), str(path), dtype)
    model.weights_id = f"open_clip:{name}/{rest} sha256:{sha}"
    return model


_RANDOM = re.compile(r"^random-open_clip:([A-Za-z0-9._-]+?)(?::(\d+))?$")


def random_open_clip_config(spec: str) -> tuple[CLIPConfig, int]:
    """(config, seed) of `random-open_clip:<model>[:SEED]`: the model's config at tiny widths, its depths kept."""
    match = _RANDOM.match(spec)
    if not match:
        raise ValueError(f"{spec!r}: expected random-open_clip:<open_clip model>[:SEED], e.g. "
                         "random-open_clip:ViT-L-14 or random-open_clip:ViT-B-16-quickgelu:3")
    name = match.group(1)
    return config_from_open_clip(name, shrink_config(model_config(name))), int(match.group(2) or 0)


def random_open_clip(spec: str, dtype: torch.dtype = torch.float32) -> CLIP:
    """A seeded random CLIP with an open_clip model's architecture at tiny widths (CLIP's initialisation)."""
    from itaclip_core.model.random import random_state_dict_for
    from itaclip_core.model.weights import build_clip

    config, seed = random_open_clip_config(spec)
    model = build_clip(random_state_dict_for(config, seed), spec, dtype, config=config)
    model.weights_id = f"random-open_clip:{config.name}:{seed}"
    return model
