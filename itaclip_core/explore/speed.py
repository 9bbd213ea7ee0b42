"""Throughput and peak memory of an inference function (the straightforward algorithm is itaclip_core.reference)."""

from __future__ import annotations

import ctypes
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch

from itaclip_core.benchmark import RssSampler
from itaclip_core.inference.engine import DenseInference
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import SegmentorConfig



__all__ = [
    'batched_engine', 'Throughput', 'measure_throughput',
]

def batched_engine(model: CLIP, config: SegmentorConfig, batch_size: int) -> DenseInference:
    """The batched image side for `config` with another batch size."""
    return DenseInference(model, config.dense_config(), crop=config.crop, stride=config.stride,
                          image_engineering=config.image_engineering, img_eng_coef=config.img_eng_coef,
                          batch_size=batch_size)  # fmt: skip


def _release_free_memory() -> None:
    """Return freed heap memory to the system (glibc), so that resident memory tracks live allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Throughput(NamedTuple):
    """Timing of one inference method."""

    images_per_second: float
    seconds_per_image: float
    peak_memory_mb: float  # CUDA: peak allocated above the start; CPU: peak resident memory above the start
    memory_kind: str  # "cuda allocated" or "cpu resident (sampled)"


def measure_throughput(fn: Callable[[Any], Any], items: Sequence[Any], device: str | torch.device,
                       warmup: int = 1) -> Throughput:  # fmt: skip
    """Time `fn` over `items` (after `warmup` untimed calls on the first item) and record its peak memory.

    On CUDA the peak comes from PyTorch's allocator; on the CPU resident memory is sampled every millisecond
    after freed memory has been returned to the system, which is approximate.
    """
    if not items:
        raise ValueError("measure_throughput needs at least one item")
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn(items[0])
    sampler = RssSampler(interval=0.001)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_memory = torch.cuda.memory_allocated(device)
    else:
        _release_free_memory()
        sampler.__enter__()
    started = time.perf_counter()
    for item in items:
        fn(item)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if cuda:
        used_mb, kind = (torch.cuda.max_memory_allocated(device) - start_memory) / 2**20, "cuda allocated"
    else:
        sampler.__exit__()
        used_mb, kind = sampler.added_mib, "cpu resident (sampled)"
    per_image = seconds / len(items)
    return Throughput(len(items) / seconds, per_image, max(used_mb, 0.0), kind)


