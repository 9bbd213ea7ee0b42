"""Feature upsamplers of the dense stage: each window's patch features brought to the window's pixels before the
text matching (LoftUp)."""

from itaclip_core.upsamplers.loftup import LoftUp, build_loftup, load_loftup, random_loftup
from itaclip_core.upsamplers.window import UPSAMPLERS, WindowUpsampler, build_upsampler

__all__ = ["UPSAMPLERS", "LoftUp", "WindowUpsampler", "build_loftup", "build_upsampler", "load_loftup",
           "random_loftup"]
