"""The published mIoU of each preset, shipped as data (`published_miou.json`) with where each number comes from.

Presets are named `<method>_<dataset>` (`itaclip_voc21`, `sclip_ade20k`, `naclip_context59`, ...); a preset of
the table exists or not in this installation independently of its row. The numbers are for OpenAI's ViT-B/16 and
the papers' full validation sets; a comparison on a subset or with changed settings is not directly comparable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("published_miou.json")


@dataclass(frozen=True)
class PublishedResult:
    """One published number."""

    preset: str  # the preset it belongs to
    miou: float  # mIoU in percent
    source: str  # key of the source in the table
    kind: str  # "primary" (the method's README or config) or "secondary" (a paper table transcribed elsewhere)
    where: str  # which table of which document
    url: str  # where to read it
    note: str = ""  # caveats (other variants, protocol differences)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "mIoU": self.miou, "source": self.source, "kind": self.kind,
                "where": self.where, "url": self.url, "note": self.note}  # fmt: skip


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def published_result(preset: str) -> PublishedResult | None:
    """The published mIoU of `preset`, or None when the table has none."""
    table = _table()
    row = table["results"].get(preset)
    if row is None:
        return None
    source = table["sources"][row["source"]]
    return PublishedResult(preset, float(row["mIoU"]), row["source"], source["kind"], source["where"], source["url"],
                           row.get("note", ""))  # fmt: skip


def published_presets() -> list[str]:
    """Every preset name the table has a number for."""
    return list(_table()["results"])


def published_sources() -> dict[str, dict[str, str]]:
    """The table's sources by key (method, kind, where, url)."""
    return {key: dict(value) for key, value in _table()["sources"].items()}
