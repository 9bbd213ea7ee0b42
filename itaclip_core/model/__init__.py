"""CLIP in OpenAI's layout, checkpoint reading, the verified weight cache and seeded random models."""

from itaclip_core.model.checkpoint import CheckpointError, read_state_dict
from itaclip_core.model.clip import CLIP, CLIPConfig, ResidualAttentionBlock, VisionTransformer
from itaclip_core.model.random import create_random_clip, random_clip_state_dict, save_random_clip
from itaclip_core.model.weights import (
    REGISTRY,
    ChecksumError,
    WeightsUnavailableError,
    build_clip,
    config_from_state_dict,
    download_checkpoint,
    load_clip,
)

__all__ = [
    "CLIP", "CLIPConfig", "CheckpointError", "ChecksumError", "REGISTRY", "ResidualAttentionBlock",
    "VisionTransformer", "WeightsUnavailableError", "build_clip", "config_from_state_dict", "create_random_clip",
    "download_checkpoint", "load_clip", "random_clip_state_dict", "read_state_dict", "save_random_clip",
]
