"""The one way components are registered by name: attention variants, dense readouts, feature refinements and mask
sources each keep a `dict[str, type]` and a class decorator made here.

    VARIANTS: dict[str, type[Base]] = {}
    register_variant = registrar(VARIANTS, "attention variant")

    @register_variant("qk")
    class QueryKey(Base): ...        # VARIANTS["qk"] is QueryKey, QueryKey.name == "qk"

Imports nothing heavy, so registries can be read before torch is loaded.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

_C = TypeVar("_C", bound=type)


def registrar(registry: dict[str, Any], kind: str) -> Callable[[str], Callable[[_C], _C]]:
    """A decorator factory: `@register(name)` adds the class to `registry` under `name` and sets its `name`; a
    name registered twice is a ValueError naming the `kind` of component."""

    def register(name: str) -> Callable[[_C], _C]:
        def decorator(cls: _C) -> _C:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered")
            cls.name = name  # type: ignore[attr-defined]
            registry[name] = cls
            return cls

        return decorator

    return register
