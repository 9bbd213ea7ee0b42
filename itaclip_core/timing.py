"""Wall time (and optionally floating-point work) per pipeline step, for `itaclip segment --timings` and the latency
benchmark (`python -m itaclip_core.latency`).

The pipeline marks its steps with `step(name)`; nothing is recorded unless a `StepTimes` is active
(`with StepTimes() as times: ...`), and then each step's *own* time is recorded: a step inside another (the image
tower inside the dense features) is subtracted from the enclosing one, so the steps add up to the whole. A step
entered again while it is running (the tower's stages calling each other) counts once.

With `count_flops=True` the floating-point operations of each step are counted too (PyTorch's FLOP counter:
matrix products, convolutions and attention, two per multiply-add); counting slows nothing measurable but is meant
for a separate, untimed run.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

if TYPE_CHECKING:  # torch is imported only when needed, so that a command's --help stays fast
    import torch

_ACTIVE: "StepTimes | None" = None
_F = TypeVar("_F", bound=Callable[..., Any])

# Steps in pipeline order (others are listed after them, in the order they first ran).
STEP_ORDER = ("model load", "text classifier", "decode and resize", "image tower", "dense features", "stitch",
              "logit refinement", "labels", "write outputs")


def _attention_formula(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    """FLOPs of fused attention, counted as PyTorch counts its CUDA kernels: 2 N M (d + d_v) per head."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[-2] * (dim + value_shape[-1])


def _flop_counter() -> Any:
    """PyTorch's FLOP counter, also counting the CPU fused-attention kernel (which it does not count itself)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    extra = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None and cpu_attention not in flop_registry:
        extra[cpu_attention] = _attention_formula
    return FlopCounterMode(display=False, custom_mapping=extra)


class StepTimes:
    """Seconds (and FLOPs, when counted) per step while active."""

    def __init__(self, count_flops: bool = False, device: "torch.device | str | None" = None) -> None:
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.count_flops = count_flops
        self.device = str(device) if device is not None else None
        self._stack: list[list[Any]] = []  # [name, start, flops at start, time of children, flops of children]
        self._counter: Any = None
        self._previous: StepTimes | None = None

    # --- activation
    def __enter__(self) -> "StepTimes":
        global _ACTIVE
        self._previous, _ACTIVE = _ACTIVE, self
        if self.count_flops:
            self._counter = _flop_counter()
            self._counter.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        self._sync()
        self.total_seconds = time.perf_counter() - self._started
        if self._counter is not None:
            self.total_flops = self._counter.get_total_flops()
            self._counter.__exit__(*exc)
            self._counter = None
        _ACTIVE = self._previous

    # --- recording
    def _sync(self) -> None:
        if self.device is not None and self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def _flops_now(self) -> int:
        return self._counter.get_total_flops() if self._counter is not None else 0

    def _enter(self, name: str) -> bool:
        if any(frame[0] == name for frame in self._stack):
            return False
        self._sync()
        self._stack.append([name, time.perf_counter(), self._flops_now(), 0.0, 0])
        return True

    def _exit(self) -> None:
        self._sync()
        name, start, flops_start, child_seconds, child_flops = self._stack.pop()
        elapsed, work = time.perf_counter() - start, self._flops_now() - flops_start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - child_seconds
        if self._counter is not None:
            self.flops[name] = self.flops.get(name, 0) + work - child_flops
        if self._stack:
            self._stack[-1][3] += elapsed
            self._stack[-1][4] += work

    def add(self, name: str, seconds: float) -> None:
        """Record time measured elsewhere (for instance before this object existed)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def ordered(self) -> list[str]:
        known = [name for name in STEP_ORDER if name in self.seconds]
        return known + [name for name in self.seconds if name not in STEP_ORDER]

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"seconds": {name: self.seconds[name] for name in self.ordered()}}
        if self.flops:
            record["flops"] = {name: self.flops.get(name, 0) for name in self.ordered()}
        if hasattr(self, "total_seconds"):
            record["total_seconds"] = self.total_seconds
        return record

    def summary(self) -> str:
        """One line per step: seconds and share of the total."""
        seconds = {name: self.seconds[name] for name in self.ordered()}
        if hasattr(self, "total_seconds"):  # what no step covers: set-up, the rest of the caller's code
            seconds["other"] = max(0.0, self.total_seconds - sum(self.seconds.values()))
        total = sum(seconds.values()) or 1.0
        width = max((len(name) for name in seconds), default=5)
        lines = [f"  {name:<{width}}  {value:8.2f} s  {100 * value / total:5.1f} %" for name, value in seconds.items()]
        lines.append(f"  {'total':<{width}}  {sum(seconds.values()):8.2f} s")
        return "\n".join(lines)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Mark a pipeline step (a no-op unless a `StepTimes` is active)."""
    times = _ACTIVE
    if times is None or not times._enter(name):
        yield
        return
    try:
        yield
    finally:
        times._exit()


def active() -> StepTimes | None:
    """The recording `StepTimes`, if any."""
    return _ACTIVE


def timed(name: str) -> Callable[[_F], _F]:
    """Decorator: the function is the step `name`."""

    def decorate(function: _F) -> _F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _ACTIVE is None:
                return function(*args, **kwargs)
            with step(name):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
