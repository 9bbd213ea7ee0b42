"""Reading CLIP checkpoints as plain state dicts, without executing code from the file.

Two formats are accepted:
- a `torch.save`d state dict (or a dict holding one under `state_dict` / `model`), read with `weights_only` loading;
- a TorchScript archive (the official OpenAI files). Its `data.pkl` is unpickled by a restricted unpickler that only
  rebuilds tensors and records module attributes; the archive's code is read as text to learn which attributes of
  each module class are parameters or buffers, and is never compiled or run.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from itaclip_core.errors import UserError


class CheckpointError(UserError, ValueError):
    """A file is missing, is not a checkpoint, is damaged, or holds another architecture."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Metadata entries some CLIP files carry next to the weights.
META_KEYS = ("input_resolution", "context_length", "vocab_size")


class _ScriptObject:
    """Stand-in for a TorchScript module object: records its class name and attributes."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *unused: Any) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *unused: Any) -> torch.Tensor:
    return data


def _identity(value: Any, *unused: Any) -> Any:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles TorchScript `data.pkl`: tensors, containers and module records, nothing else."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix
        self.source = source
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")):
            return _identity
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        raise CheckpointError(f"{self.source}: refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.source}: unexpected persistent record {pid!r}")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        storage = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if storage.numel() < numel:
            raise CheckpointError(f"{self.source}: tensor data {key} is truncated")
        return storage


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\s*\n((?:  .*\n|\s*\n)*)", re.MULTILINE)
_LIST_RE = re.compile(r"__(parameters|buffers)__ = \[([^\]]*)\]")


def _state_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """For each TorchScript module class, the names of its parameters and buffers (read from its code)."""
    names: dict[str, set[str]] = {}
    code_root = f"{prefix}/code/"
    for entry in archive.namelist():
        if not (entry.startswith(code_root) and entry.endswith(".py")):
            continue
        module = entry[len(code_root) : -3].replace("/", ".")
        text = archive.read(entry).decode("utf-8", errors="replace")
        for match in _CLASS_RE.finditer(text):
            members: set[str] = set()
            for _, listed in _LIST_RE.findall(match.group(2)):
                members.update(item.strip().strip("\"'") for item in listed.split(",") if item.strip())
            names[f"{module}.{match.group(1)}"] = members
    return names


def _flatten(obj: _ScriptObject, prefix: str, names: dict[str, set[str]], out: dict[str, torch.Tensor]) -> None:
    members = names.get(obj.qualname)
    for attr, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, _ScriptObject):
            _flatten(value, f"{prefix}{attr}.", names, out)
        elif isinstance(value, torch.Tensor) and (members is None or attr in members):
            out[f"{prefix}{attr}"] = value.clone()


def read_torchscript_state_dict(path: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, by their module paths."""
    data_entries = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if not data_entries:
        raise CheckpointError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
    prefix = data_entries[0].rsplit("/", 1)[0]
    unpickler = _ArchiveUnpickler(archive.read(data_entries[0]), archive, prefix, path)
    root = unpickler.load()
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path}: the TorchScript archive does not hold a module")
    state: dict[str, torch.Tensor] = {}
    _flatten(root, "", _state_names(archive, prefix), state)
    return state


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; expected an OpenAI CLIP checkpoint"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in `path` (TorchScript archive or `torch.save` file), on the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; download it again")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if any("/code/" in name for name in archive.namelist()):
                    return read_torchscript_state_dict(path, archive)
        except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError, RuntimeError) as error:
            raise CheckpointError(f"{path}: damaged or truncated archive ({error}); download it again") from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: not a loadable weights file ({str(error).splitlines()[0]}); "
            "expected an OpenAI CLIP checkpoint (TorchScript archive or state dict)"
        ) from error
    except Exception as error:  # the unpickler raises many kinds of errors on files that are not checkpoints
        raise CheckpointError(
            f"{path}: damaged, truncated or not a PyTorch file ({str(error).splitlines()[0]}); "
            "download it again or pass an OpenAI CLIP checkpoint"
        ) from error
    return _unwrap(obj, path)
