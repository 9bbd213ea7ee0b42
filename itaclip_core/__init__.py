"""itaclip-core: training-free open-vocabulary semantic segmentation with CLIP (ITACLIP, SCLIP).

Top level: `load_clip`, `tokenize`, `create_random_clip` and the `Segmentor`. They are imported on first use,
so that `import itaclip_core` (and `itaclip --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CLIP": "itaclip_core.model",
    "create_random_clip": "itaclip_core.model",
    "load_clip": "itaclip_core.model",
    "random_clip_state_dict": "itaclip_core.model",
    "save_random_clip": "itaclip_core.model",
    "SegmentorConfig": "itaclip_core.presets",
    "get_preset": "itaclip_core.presets",
    "list_presets": "itaclip_core.presets",
    "Prediction": "itaclip_core.segmentor",
    "Segmentor": "itaclip_core.segmentor",
    "tokenize": "itaclip_core.text.tokenizer",
    "UserError": "itaclip_core.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'itaclip_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
