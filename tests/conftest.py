"""Shared fixtures: the reference (golden) files and the tiny reference CLIP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"

# Keep tests on the CPU and deterministic, and never touch the user's cache.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITACLIP_CACHE", str(tmp_path_factory.getbasetemp() / "itaclip-cache"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_forward() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / "tiny_clip_forward_golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_clip():
    """The reference tiny CLIP (fp16 OpenAI-layout state dict), loaded in float32 on the CPU."""
    from itaclip_core import load_clip

    return load_clip(GOLDEN / "tiny_clip_openai_fp16.pt", device="cpu")
