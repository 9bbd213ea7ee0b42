"""Batch sizes from free memory: the estimate follows the backbone, the crop and the dtype, and bounds the batch."""

from __future__ import annotations

import pytest
import torch

from itaclip_core.inference import memory
from itaclip_core.inference.engine import DenseInference
from itaclip_core.attention.dense import DENSE_METHODS
from itaclip_core.model.random import RANDOM_SIZES

GIB = 1 << 30


def test_estimate_grows_with_the_backbone_crop_and_dtype():
    b16, l14, h14 = (RANDOM_SIZES[k] for k in ("vit-b-16", "vit-l-14", "vit-h-14"))
    half = torch.float16
    assert memory.activation_bytes(b16, 224, half) < memory.activation_bytes(l14, 224, half) \
        < memory.activation_bytes(h14, 224, half)
    assert memory.activation_bytes(h14, 196, half) < memory.activation_bytes(h14, 224, half)
    assert memory.activation_bytes(h14, 224, half) < memory.activation_bytes(h14, 224, torch.float32)
    assert memory.activation_bytes(b16, 224, half, fused_blocks=3) > memory.activation_bytes(b16, 224, half)


def test_batch_shrinks_for_h14_on_a_24_gb_card_and_stays_at_least_one():
    h14, b16 = RANDOM_SIZES["vit-h-14"], RANDOM_SIZES["vit-b-16"]
    free_24gb = 24 * GIB - 3 * GIB  # weights and the CUDA context taken
    h_batch = memory.auto_batch_size(h14, 196, torch.float16, free_24gb, fused_blocks=3)
    b_batch = memory.auto_batch_size(b16, 224, torch.float16, free_24gb, fused_blocks=3)
    assert 1 <= h_batch <= b_batch <= memory.MAX_BATCH
    assert h_batch * memory.activation_bytes(h14, 196, torch.float16, 3) <= memory.MEMORY_SHARE * free_24gb
    small = memory.auto_batch_size(h14, 196, torch.float16, 2 * GIB, fused_blocks=3)
    assert 1 <= small < h_batch
    assert memory.auto_batch_size(h14, 336, torch.float32, 1) == 1


def test_engine_default_on_cpu_and_explicit_batch(tiny_clip):
    assert DenseInference(tiny_clip, DENSE_METHODS["itaclip"]).batch_size == memory.CPU_BATCH
    assert DenseInference(tiny_clip, DENSE_METHODS["itaclip"], batch_size=3).batch_size == 3
    assert memory.free_memory(torch.device("cpu")) is None


def test_engine_default_on_cuda_uses_free_memory(tiny_clip, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 2 * GIB)
    monkeypatch.setattr(memory, "CPU_BATCH", -1)
    expected = memory.auto_batch_size(tiny_clip.config, 224, tiny_clip.dtype, 2 * GIB, fused_blocks=3)
    assert memory.default_batch_size(tiny_clip.config, torch.device("cuda"), tiny_clip.dtype, 224, 3) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to measure activation memory")
def test_estimate_bounds_the_measured_peak_on_the_gpu():
    from itaclip_core.attention.dense import dense_tokens
    from itaclip_core.model import load_clip

    model = load_clip("random-tiny-l-14", device="cuda", dtype=torch.float16)
    images = torch.randn(8, 3, 196, 196, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        dense_tokens(model.visual, images, DENSE_METHODS["itaclip"].__class__(fuse_blocks=(14, 16, 20)))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 8 * memory.activation_bytes(model.config, 196, torch.float16, fused_blocks=3)
