"""Checks of settings, devices and class choices that run before any model is loaded or text encoded.

`validate_config(config)` checks every field of a `SegmentorConfig` against its allowed values (`CHECKS`, one
line per field: a new field joins by adding its line) and the relations between fields (`RELATIONS`), and raises
one `ConfigError` naming each bad setting, its value and what is allowed: `stride=0` in Python,
`--set stride=0` on the command line. `check_against_model` adds the checks that need the loaded model's sizes
(still before the texts are encoded).

`resolve_device` turns `device=` / `--device` into a usable torch device or a `DeviceError` with the fix;
`user_classes_config` is a benchmark preset's architecture with the caller's own classes, and says what changed.

Only `resolve_device` and `check_against_model` import torch (lazily): the command line imports this module
before torch is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from itaclip_core.errors import ConfigError, DeviceError, short

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from itaclip_core.model.clip import CLIP
    from itaclip_core.presets import SegmentorConfig

# A check takes a value and returns what is wrong with it in words ("must be at least 1"), or None when it is fine.
Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer_at_least(low: int) -> Check:
    """An integer >= `low`."""
    return lambda v: None if _is_int(v) and v >= low else f"must be an integer of at least {low}"


def number_between(low: float, high: float) -> Check:
    """A finite number in [low, high]."""
    return lambda v: None if _is_number(v) and low <= v <= high else f"must be a number in [{low:g}, {high:g}]"


def positive_number() -> Check:
    """A finite number > 0."""
    return lambda v: None if _is_number(v) and math.isfinite(v) and v > 0 else "must be a finite number above 0"


def boolean() -> Check:
    """True or False."""
    return lambda v: None if isinstance(v, bool) else "must be true or false"


def optional(check: Check) -> Check:
    """None, or a value passing `check`."""
    return lambda v: None if v is None else check(v)


def each(check: Check) -> Check:
    """A tuple (or list) whose items all pass `check`."""

    def run(value: Any) -> str | None:
        if not isinstance(value, (tuple, list)):
            return "must be a comma-separated list"
        for item in value:
            problem = check(item)
            if problem is not None:
                return f"has {item!r}: each item {problem}"
        return None

    return run


def one_of(names: Callable[[], Iterable[str]], what: str = "name") -> Check:
    """One of the names `names()` returns (called at check time, so a registry filled later is seen)."""

    def run(value: Any) -> str | None:
        known = sorted(names())
        return None if value in known else f"is not a known {what}; choose one of {', '.join(known)}"

    return run


def text_file() -> Check:
    """An existing file, given as a path or relative to the project's texts/ folder."""

    def run(value: Any) -> str | None:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            return "must be a file path"
        if find_text_file(value) is not None:
            return None
        if Path(value).expanduser().is_dir():
            return "is a folder; give a file"
        return "names no file (neither as a path nor under the project's texts/ folder)"

    return run


def find_text_file(value: str | Path) -> Path | None:
    """The file `value` names: as given when it exists, else under the project's texts/ folder; None if neither."""
    from itaclip_core.resources import texts_dir

    candidate = Path(value).expanduser()
    if candidate.is_file():
        return candidate
    shipped = texts_dir() / str(value)
    return shipped if shipped.is_file() else None


def _attention_names() -> list[str]:
    from itaclip_core.attention.variants import ATTENTION_VARIANTS

    return list(ATTENTION_VARIANTS)


def _dataset_names() -> list[str]:
    from itaclip_core.data.registry import DATASET_NAMES

    return list(DATASET_NAMES)


# Allowed values of each setting. A new SegmentorConfig field adds one line here.
CHECKS: dict[str, Check] = {
    "dataset": optional(one_of(_dataset_names, "dataset")),
    "classes": optional(text_file()),
    "background": boolean(),
    "aux_file": optional(text_file()),
    "aux_coef": number_between(0.0, 1.0),
    "templates": text_file(),
    "short_side": integer_at_least(1),
    "long_side": integer_at_least(1),
    "crop": integer_at_least(0),  # 0: the whole image is one window
    "stride": integer_at_least(1),
    "attention": one_of(_attention_names, "attention variant"),
    "fuse_blocks": each(integer_at_least(1)),
    "fuse_attention": optional(one_of(_attention_names, "attention variant")),
    "fuse_weight": number_between(0.0, 1.0),
    "last_residual": boolean(),
    "last_mlp": boolean(),
    "image_engineering": boolean(),
    "img_eng_coef": number_between(0.0, 1.0),
    "pamr_steps": integer_at_least(0),
    "pamr_dilations": each(integer_at_least(1)),
    "logit_scale": positive_number(),
    "prob_thd": number_between(0.0, 1.0),
    "area_thd": optional(number_between(0.0, 1.0)),
    "closing": boolean(),
    "batch_size": optional(integer_at_least(1)),
    "text_batch_size": optional(integer_at_least(1)),
    "truncate_texts": boolean(),
    # dense methods and feature refinements: the readouts and refinements check their own names and ranges
    # (`check_method_settings`); the rows below are the plain types and ranges
        "attention_scale": positive_number(),
    "sfr_temp_thd": number_between(0.0, 1.0),
    "sfr_pamr_steps": integer_at_least(0),
    "sfr_pamr_dilations": each(integer_at_least(1)),
    "sfr_delete_same_entity": boolean(),
    "sfr_sigma": positive_number(),
    "sfr_refine_weight": number_between(0.0, 1.0),
    "renormalize": boolean(),
    "selfcorr_temperature": positive_number(),
    "selfcorr_alpha": number_between(0.0, 1.0),
    "regional_grid": integer_at_least(1),
    "regional_overlap": number_between(0.0, 0.99),
    "regional_beta": number_between(0.0, 1.0),
    "scclip_blocks": each(integer_at_least(1)),
    "scclip_res_cls": number_between(0.0, 1e6),
    "cliptrase_eps": positive_number(),
    "cliptrase_min_samples": integer_at_least(1),
    "cliptrase_cls_weighting": boolean(),
    "pad_to_patch": boolean(),
    # logit refinements and the feature upsampler: names and ranges are checked by their registries
    "crf_iterations": integer_at_least(0),
    # backbones: tuned_on is a backbone name, checked by itaclip_core.backbones.parse_backbone
    "adapt_backbone": boolean(),
}


@dataclass(frozen=True)
class Relation:
    """A rule between settings: `holds(config)` must be true, else `message` (naming the settings) is reported."""

    keys: tuple[str, ...]  # the settings involved, named in the message
    holds: Callable[[Any], bool]
    message: str  # what must hold, in words


RELATIONS: list[Relation] = [
    Relation(("stride", "crop"), lambda c: c.crop == 0 or c.protocol != "standard" or c.stride <= c.crop,
             "stride must not exceed crop (windows would leave pixels uncovered)"),  # fmt: skip
    Relation(("pamr_steps", "pamr_dilations"), lambda c: c.pamr_steps == 0 or len(c.pamr_dilations) > 0,
             "PAMR (pamr_steps > 0) needs at least one dilation in pamr_dilations"),  # fmt: skip
]


def _cli_value(value: Any) -> str:
    """A value as it is written after `--set key=`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def config_error(problems: list[tuple[str, Any, str]]) -> ConfigError:
    """One error for `(key, value, problem)` triples, worded for Python (`key=value`) and for the CLI (`--set`)."""
    python = "; ".join(f"{key}={short(repr(value))} {problem}" for key, value, problem in problems)
    cli = "; ".join(f"--set {key}={short(_cli_value(value))} {problem}" for key, value, problem in problems)
    return ConfigError(f"bad setting: {python}", cli=f"bad setting: {cli}")


def validate_config(config: "SegmentorConfig") -> "SegmentorConfig":
    """Check every setting of `config` (`CHECKS`) and the rules between them (`RELATIONS`).

    Returns:
        `config` itself, so that `config = validate_config(apply_overrides(...))` reads well.

    Raises:
        ConfigError: naming every bad setting, its value and what is allowed.
    """
    problems: list[tuple[str, Any, str]] = []
    for field in fields(config):
        check = CHECKS.get(field.name)
        if check is None:
            continue
        value = getattr(config, field.name)
        problem = check(value)
        if problem is not None:
            problems.append((field.name, value, problem))
    if not problems:
        for relation in RELATIONS:
            if not relation.holds(config):
                values = ", ".join(f"{key}={_cli_value(getattr(config, key))}" for key in relation.keys)
                raise ConfigError(f"bad settings ({values}): {relation.message}",
                                  cli=f"bad settings (--set {values.replace(', ', ' --set ')}): {relation.message}")
    if problems:
        raise config_error(problems)
    methods = config.readout != "tokens" or config.refine or config.protocol != "standard"
    if methods or tuple(config.logit_refine) != ("pamr",) or config.upsampler is not None:  # imports torch
        check_method_settings(config)  # the readout's and the refinements' own rules
    return config


def check_against_model(config: "SegmentorConfig", model: "CLIP") -> None:
    """The checks that need the model's sizes: fused blocks exist, the window holds at least one patch.

    Raises:
        ConfigError: naming the setting and the model's limit.
    """
    problems: list[tuple[str, Any, str]] = []
    layers = getattr(getattr(model, "config", None), "vision_layers", None)
    if layers is not None:
        bad = [b for b in config.fuse_blocks if not 1 <= b <= layers - 1]
        if bad:
            problems.append(("fuse_blocks", config.fuse_blocks,
                             f"names block(s) {', '.join(map(str, bad))}; this model's image tower has {layers} "
                             f"blocks, so fused blocks must be in 1..{layers - 1}"))  # fmt: skip
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch is not None and 0 < config.crop < patch:
        problems.append(("crop", config.crop, f"is smaller than the model's {patch}-pixel patches"))
    if problems:
        raise config_error(problems)
    try:  # the dense readout's own checks of the tower (block numbers beyond its depth, ...)
        _readout(config).check_model(model)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error), cli=_cli_wording(str(error))) from None


def _readout(config: "SegmentorConfig") -> Any:
    from itaclip_core.methods import get_readout

    return get_readout(config)


def _cli_wording(message: str) -> str:
    """A message of the form `key=value: ...` as the command line says it (`--set key=value: ...`)."""
    head = message.split(" ", 1)[0]
    key = head.split("=", 1)[0] if "=" in head else head.rstrip(":")
    if ("=" in head or head.endswith(":")) and key.isidentifier():
        return "--set " + message
    return message


def check_method_settings(config: "SegmentorConfig") -> None:
    """The checks of the dense readout, the feature and logit refinements and the upsampler a config names
    (settings they cannot honour, unknown names), as `ConfigError`s. Imports torch."""
    from itaclip_core.refinement.features import build_refinements

    try:
        from itaclip_core.methods.cliptrase import check_protocol
        from itaclip_core.refinement.logits import build_logit_refinements
        from itaclip_core.upsamplers.window import UPSAMPLERS

        check_protocol(config)
        _readout(config)
        build_refinements(config)
        build_logit_refinements(config)
        if config.upsampler is not None and config.upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler={config.upsampler!r} is not a known upsampler; choose one of "
                             f"{', '.join(UPSAMPLERS)} (or none)")
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error), cli=_cli_wording(str(error))) from None


# ------------------------------------------------------------------------------------------------------ devices
def resolve_device(device: "str | torch.device | None") -> "torch.device":
    """The torch device `device` names (None: CUDA when available, else the CPU), checked to be usable here.

    Raises:
        DeviceError: an unknown device name, CUDA without a usable GPU, or a GPU index that does not exist.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(
            f"device={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N' (or None for the default)",
            cli=f"--device {device}: not a device name; use cpu, cuda or cuda:N",
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={str(device)!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                "use device='cpu'",
                cli=f"--device {device}: no CUDA GPU is usable here; use --device cpu",
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(
                f"device={str(device)!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})",
                cli=f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})",
            )
    elif resolved.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise DeviceError(f"device={str(device)!r}: the MPS backend is not available; use device='cpu'",
                              cli=f"--device {device}: the MPS backend is not available; use --device cpu")
    elif resolved.type != "cpu":
        raise DeviceError(f"device={str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'",
                          cli=f"--device {device}: not supported; use cpu, cuda or cuda:N")
    return resolved


DTYPE_NAMES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
                  "bfloat16": "bfloat16", "bf16": "bfloat16"}  # fmt: skip


def resolve_dtype(dtype: "torch.dtype | str | None") -> "torch.dtype | None":
    """A torch dtype from a name (`float32`, `float16`, `bfloat16`, or fp32/fp16/bf16), a dtype, or None.

    Raises:
        ConfigError: another name or type.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"dtype={dtype} is not supported; use one of {', '.join(DTYPE_NAMES)}")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise ConfigError(f"dtype={dtype!r} is not a model precision; use one of {', '.join(DTYPE_NAMES)}",
                          cli=f"--dtype {dtype}: not a model precision; use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------------------ classes
# What a benchmark preset sets for its own class list and that does not carry over to other classes.
_BENCHMARK_ONLY = {"dataset": None, "classes": None, "background": False, "aux_file": None, "aux_coef": 0.0,
                   "prob_thd": 0.0, "area_thd": None}  # fmt: skip


def user_classes_config(config: "SegmentorConfig") -> tuple["SegmentorConfig", str | None]:
    """`config` made for the caller's own classes: the architecture, image engineering, PAMR, closing and logit
    scale are kept; the benchmark's dataset, class file, background class, auxiliary file and thresholds are
    dropped. Returns the new config and a note of what changed (None when nothing did)."""
    changes = {key: value for key, value in _BENCHMARK_ONLY.items() if getattr(config, key) != value}
    if not changes or config.classes is None:
        return config, None
    described = []
    if config.background:
        described.append("no background class")
    if config.aux_file is not None:
        described.append(f"no auxiliary texts ({config.aux_file})")
    if config.prob_thd or config.area_thd is not None:
        described.append("no probability/area thresholds")
    note = (f"preset {config.name!r} is made for the {config.dataset or 'benchmark'} classes; with your own classes "
            f"it keeps its architecture with {', '.join(described) or 'its benchmark settings dropped'}")
    return config.replace(name=f"{config.name}+own_classes", **changes), note
