"""What makes an evaluation resumable: the run manifest and the per-image record files.

An output directory holds:

- `run.json`: the settings the counts depend on (preset, overrides, weights identity, dataset, number of
  samples). A later run into the same directory must have the same settings, or it is refused.
- `records/rank<R>.jsonl`: one JSON line per evaluated image, written by process R as soon as the image is
  scored (append, flush, fsync): the image's index, name and size, its four IoU histograms and its confusion
  matrix as sparse `[label, prediction, pixels]` cells (records written before the confusion matrix was recorded
  lack it; they are read as records without one).

A run killed at any point loses at most the line being written. When started again, the torn tail of a record
file is dropped, every complete record is loaded from all record files (whatever the number of processes of
the earlier run), and only the images without a record are computed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from itaclip_core.errors import UserError

MANIFEST_NAME = "run.json"
RECORDS_DIR = "records"
# Settings that must match for a run to continue an earlier one. The number of images may change: a run on
# `--num-samples N` continues into a larger N or the full set (its per-image records are the same).
MANIFEST_KEYS = ("preset", "overrides", "weights_id", "dataset", "num_classes")
EXTENT_KEYS = ("num_samples", "num_images")


class ResumeError(UserError, RuntimeError):
    """An output directory holds results of a run with different settings, or of a different image list."""


@dataclass(frozen=True)
class ImageRecord:
    """The scored counts of one image."""

    index: int  # position of the image in the dataset's evaluation order
    name: str  # the sample's name (image path relative to the image folder, without suffix)
    height: int  # original image height
    width: int  # original image width
    intersect: tuple[int, ...]  # per-class histogram of pixels where prediction == label
    union: tuple[int, ...]  # per-class pred + label - intersect
    pred: tuple[int, ...]  # per-class histogram of the prediction (ignored pixels dropped)
    label: tuple[int, ...]  # per-class histogram of the label (ignored pixels dropped)
    seconds: float = 0.0  # time spent predicting the image
    # non-zero cells (label, prediction, pixels) of the image's confusion matrix; None: not recorded
    confusion: tuple[tuple[int, int, int], ...] | None = None
    trimap: tuple[int, ...] = ()  # boundary counts (correct, total) per trimap width, flattened; () if not taken

    def confusion_matrix(self, num_classes: int) -> np.ndarray | None:
        """The (N, N) int64 confusion matrix (rows = label, columns = prediction), or None when not recorded."""
        if self.confusion is None:
            return None
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        for label, pred, count in self.confusion:
            matrix[label, pred] += count
        return matrix

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        data: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "height": self.height,
            "width": self.width,
            "intersect": list(self.intersect),
            "union": list(self.union),
            "pred": list(self.pred),
            "label": list(self.label),
            "seconds": round(self.seconds, 4),
            "trimap": list(self.trimap),
        }
        if self.confusion is not None:
            data["confusion"] = [list(cell) for cell in self.confusion]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str, num_classes: int) -> "ImageRecord | None":
        """Parse one line; None when it is torn or not a record of `num_classes` classes."""
        try:
            data = json.loads(line)
            counts = [tuple(int(v) for v in data[key]) for key in ("intersect", "union", "pred", "label")]
            record = cls(
                index=int(data["index"]),
                name=str(data["name"]),
                height=int(data["height"]),
                width=int(data["width"]),
                intersect=counts[0],
                union=counts[1],
                pred=counts[2],
                label=counts[3],
                seconds=float(data.get("seconds", 0.0)),
                confusion=_confusion_cells(data.get("confusion"), num_classes),
                trimap=tuple(int(v) for v in data.get("trimap", ())),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if any(len(c) != num_classes for c in counts):
            return None
        return record


def sparse_confusion(matrix: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """The non-zero cells `(label, prediction, pixels)` of a confusion matrix, row-major."""
    rows, cols = np.nonzero(matrix)
    return tuple((int(r), int(c), int(matrix[r, c])) for r, c in zip(rows, cols))


def _confusion_cells(raw: Any, num_classes: int) -> tuple[tuple[int, int, int], ...] | None:
    """Parse a record's `confusion` list (None when absent); raises ValueError on a malformed one."""
    if raw is None:
        return None
    cells = []
    for cell in raw:
        label, pred, count = (int(v) for v in cell)
        if not (0 <= label < num_classes and 0 <= pred < num_classes and count >= 0):
            raise ValueError(f"confusion cell {cell} out of range")
        cells.append((label, pred, count))
    return tuple(cells)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file under a temporary name, fsync it and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_or_write_manifest(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """Write `run.json` in a new output directory, or check that an existing one has the same settings.

    Returns:
        True when an earlier run's manifest was found (the run continues it).

    Raises:
        ResumeError: the directory was written with different settings.
    """
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ResumeError(f"{path} is not valid JSON ({error}); use a new --out directory") from error
        differences = [
            f"{key}: {previous.get(key)!r} there, {manifest.get(key)!r} now"
            for key in MANIFEST_KEYS
            if previous.get(key) != manifest.get(key)
        ]
        if differences:
            raise ResumeError(
                f"{out_dir} holds results of an evaluation with different settings ("
                + "; ".join(differences)
                + "). Continue it with the same arguments, or give another --out directory (or delete this one)."
            )
        if any(previous.get(key) != manifest.get(key) for key in EXTENT_KEYS):
            atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return True
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return False


def record_path(out_dir: Path, rank: int) -> Path:
    """The record file of process `rank`."""
    return out_dir / RECORDS_DIR / f"rank{rank}.jsonl"


def repair_tail(path: Path, num_classes: int) -> int:
    """Make a record file end with a complete line: drop a torn last line, or end a complete one.

    Returns:
        The number of bytes dropped.
    """
    if not path.is_file():
        return 0
    with open(path, "r+b") as stream:
        data = stream.read()
        if not data or data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n") + 1
        tail = data[cut:].decode("utf-8", errors="replace")
        if ImageRecord.from_json(tail, num_classes) is not None:
            stream.write(b"\n")
            dropped = 0
        else:
            stream.truncate(cut)
            dropped = len(data) - cut
        stream.flush()
        os.fsync(stream.fileno())
    return dropped


class RecordWriter:
    """Appends image records to one process's record file, each durable once `write` returns."""

    def __init__(self, path: Path, num_classes: int) -> None:
        """Open (creating if needed) the record file at `path`, first repairing a torn tail."""
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path, num_classes)
        self.path = path
        self._stream = open(path, "ab")

    def write(self, record: ImageRecord) -> None:
        """Append one record and make it durable (flush + fsync)."""
        self._stream.write(record.to_json().encode("utf-8") + b"\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        """Close the file."""
        self._stream.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(out_dir: Path, num_classes: int, names: Sequence[str]) -> dict[int, ImageRecord]:
    """All complete records under `out_dir/records/`, by image index (the first one of each index wins).

    Args:
        out_dir: the run's output directory.
        num_classes: number of classes of the counts; lines of another length are skipped.
        names: the evaluation's sample names in order, to check that records belong to this image list.

    Raises:
        ResumeError: a record names another image than the one at its index.
    """
    records: dict[int, ImageRecord] = {}
    folder = out_dir / RECORDS_DIR
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in _lines(path):
            record = ImageRecord.from_json(line, num_classes)
            if record is None or record.index in records or record.index >= len(names):
                continue  # torn, repeated, or beyond this run's --num-samples (kept for a larger run)
            if record.index < 0 or names[record.index] != record.name:
                expected = names[record.index] if 0 <= record.index < len(names) else "nothing"
                raise ResumeError(
                    f"{path} has a record of image {record.name!r} at index {record.index}, where this evaluation "
                    f"has {expected!r}: the dataset's image list changed since. Use a new --out directory."
                )
            records[record.index] = record
    return records


def _lines(path: Path) -> Iterable[str]:
    with open(path, "rb") as stream:
        for raw in stream:
            if raw.endswith(b"\n"):
                yield raw.decode("utf-8", errors="replace")
            # a last line without a newline is torn (or is repaired by its writer before use)
