"""Official mask-generator checkpoints in the same verified cache as CLIP (`~/.cache/itaclip` or `$ITACLIP_CACHE`).

SAM and SAM 2 publish no sha256 for their files. The first download (or the first use of a file placed in the
cache by hand) records the file's size and sha256 next to it (`<file>.recorded.json`); every later use checks the
file against that record, so a file that changes afterwards (a truncated copy, a different model under the same
name) is refused. The download goes to a temporary file that is renamed into place only when complete, with a
progress bar; without network the error names the file, its URL and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from itaclip_core.model import weights
from itaclip_core.model.weights import ChecksumError, WeightsUnavailableError, default_cache_dir, file_sha256


@dataclass(frozen=True)
class CheckpointEntry:
    """Where an official checkpoint lives (no published sha256)."""

    url: str
    filename: str


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".recorded.json")


def _record(path: Path, url: str) -> dict:
    record = {"url": url, "size": path.stat().st_size, "sha256": file_sha256(path)}
    _record_path(path).write_text(json.dumps(record, indent=1))
    return record


def _stream(url: str, target: Path, progress: bool) -> None:
    """Download `url` to `target` through a temporary file renamed into place when complete."""
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, weights.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and out.tell() != total:
                raise OSError(f"incomplete download: {out.tell()} of {total} bytes")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_checkpoint(entry: CheckpointEntry, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The local file of an official checkpoint, downloaded into the cache when missing and checked against the
    size and sha256 recorded at its first download."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / entry.filename
    if not target.is_file():
        _record_path(target).unlink(missing_ok=True)
        try:
            _stream(entry.url, target, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise WeightsUnavailableError(
                f"could not download {entry.filename} from {entry.url} ({error}).\n"
                f"Without network access, download it elsewhere and put it at {target} (its size and sha256 are "
                f"recorded at first use), or pass its path as the checkpoint (--set mask_checkpoint=/path/to/"
                f"{entry.filename})."
            ) from error
        _record(target, entry.url)
        return target
    record_file = _record_path(target)
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        _record(target, entry.url)  # placed by hand: its first use records it
        return target
    size = target.stat().st_size
    if size != record.get("size") or not weights._is_verified(target, str(record.get("sha256"))):
        raise ChecksumError(
            f"{target} is not the file recorded at its first download (size {size} against {record.get('size')}, "
            f"or a different sha256 than {record.get('sha256')}). Delete it (and {record_file.name}) to download "
            f"it again from {entry.url}."
        )
    return target


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
