"""itaclip-core: training-free open-vocabulary semantic segmentation with CLIP (ITACLIP, SCLIP).

Top level: `load_clip`, `tokenize`, `create_random_clip` and the `Segmentor`.
"""

from itaclip_core.model import CLIP, create_random_clip, load_clip, random_clip_state_dict, save_random_clip
from itaclip_core.presets import SegmentorConfig, get_preset, list_presets
from itaclip_core.segmentor import Prediction, Segmentor
from itaclip_core.text.tokenizer import tokenize

__version__ = "0.1.0"

__all__ = ["CLIP", "Prediction", "Segmentor", "SegmentorConfig", "create_random_clip", "get_preset", "list_presets",
           "load_clip", "random_clip_state_dict", "save_random_clip", "tokenize", "__version__"]
