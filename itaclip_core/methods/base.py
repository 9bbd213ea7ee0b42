"""Dense readouts ("dense methods"): how a batch of windows becomes per-window patch logits, in a registry.

Most methods are an attention variant plus a `DenseConfig` (NACLIP, ClearCLIP, SCLIP, ITACLIP) and use the default
readout, `tokens`. A method whose readout is more than one pass of the tower (ResCLIP's semantic feedback needs a
first pass with the text features and PAMR; SC-CLIP repairs tokens and fuses levels; CLIPtrase clusters patches
after text matching) is one `DenseReadout` class, registered under a name and chosen by `SegmentorConfig.readout`.
The engine (`itaclip_core.inference.engine.DenseInference`) only ever calls `window_logits`; it has no per-method
branches.

The interface, for a batch of n windows (crops) of one size, h x w pixels, rows x cols patches:

    @register_readout("my-method")
    class MyReadout(DenseReadout):
        needs_text = True                      # window_features gets the text features
        accepts_refinements = True             # patch features exist, so feature refinements may follow

        def patch_tokens(self, visual, images, text):  # images (B, 3, h, w) in the model dtype
            ...                                # -> (B, rows * cols, D) patch tokens, not normalised

- `patch_tokens(visual, images, text)`: the tower's dense output for a batch of images (windows or their views).
  The default runs `dense_tokens` with the config's `DenseConfig` and drops the class token. The stages of
  `itaclip_core.attention.dense` (`run_trunk`, `advance`, `last_block`, `AttentionContext.extras`) are there to
  build other readouts from.
- `window_features(engine, crops, text)`: (n, rows, cols, D) L2-normalised patch features per window, the views of
  image engineering mixed (`engine.image_engineering`); the default calls `patch_tokens` on the views in batches.
- `window_logits(engine, crops, text, refinements)`: (n, Q, rows, cols) float32 similarities of every patch with
  every text query. The default is `window_features`, then the configured feature refinements in order, then the
  product with the text features. A readout that makes logits some other way (clusters, votes) overrides this
  and sets `accepts_refinements = False`; a configured refinement is then refused with a clear error.
- `shares_batches`: whether the windows of several images may share one `window_logits` call
  (`Segmentor.predict_many`); a readout that keeps per-image state for `revise_labels` sets it to False.
  With `pad_to_patch` (ClearCLIP) windows that are not a patch multiple are zero-padded and the logits come back
  at pixel resolution, cut to the window (`patch_padding`, `crop_padded_logits`).
- `check(config)`: refuse settings the readout cannot honour, before any work (a ValueError naming the setting
  and the allowed values).

Readouts are built by `get_readout(config)` with the `SegmentorConfig` and its `DenseConfig`; they read their
settings from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
import torch.nn.functional as F

from itaclip_core.attention.dense import DenseConfig, dense_tokens, last_variant
from itaclip_core.inference.views import make_views, mix_views
from itaclip_core.model.clip import VisionTransformer
from itaclip_core.registry import registrar

if TYPE_CHECKING:
    from itaclip_core.inference.engine import DenseInference
    from itaclip_core.inference.sliding import Window
    from itaclip_core.model.clip import CLIP
    from itaclip_core.presets import SegmentorConfig
    from itaclip_core.refinement.features import FeatureRefinement

DENSE_READOUTS: dict[str, type["DenseReadout"]] = {}



# Class decorator adding a dense readout to `DENSE_READOUTS` under its name: `@register_readout("name")`.
register_readout = registrar(DENSE_READOUTS, "dense readout")


def readout_class(name: str) -> type["DenseReadout"]:
    """The readout registered as `name` (a ValueError listing the registered names if there is none)."""
    _load_builtin()
    try:
        return DENSE_READOUTS[name]
    except KeyError:
        raise ValueError(f"readout={name!r}: unknown dense readout; registered: {', '.join(sorted(DENSE_READOUTS))}"
                         ) from None


def get_readout(config: "SegmentorConfig", dense: DenseConfig | None = None) -> "DenseReadout":
    """The readout `config.readout` for these settings, checked."""
    readout = readout_class(config.readout)(config, dense if dense is not None else config.dense_config())
    readout.check(config)
    return readout


def _load_builtin() -> None:
    """Import the modules that register the built-in readouts."""
    import itaclip_core.methods.resclip  # noqa: F401
    import itaclip_core.methods.scclip  # noqa: F401
    import itaclip_core.methods.cliptrase  # noqa: F401


class DenseReadout:
    """Base class and the default readout's behaviour; see the module docstring."""

    name: ClassVar[str] = ""
    needs_text: ClassVar[bool] = False  # window_features / patch_tokens need the text features
    accepts_refinements: ClassVar[bool] = True  # window_logits goes through patch features
    # The windows of several images may go through one window_logits call (predict_many). False for a readout
    # that keeps per-image state between window_logits and revise_labels, or needs per-image side data.
    shares_batches: ClassVar[bool] = True

    def __init__(self, config: "SegmentorConfig", dense: DenseConfig) -> None:
        self.config = config
        self.dense = dense
        last_variant(dense)  # unknown names and bad variant parameters fail here, before any work

    def check(self, config: "SegmentorConfig") -> None:
        """Refuse settings this readout cannot honour (ValueError naming the setting and the allowed values)."""
        if config.refine and not self.accepts_refinements:
            raise ValueError(f"refine={','.join(config.refine)}: the {self.name!r} readout produces patch logits "
                             "without patch features, so no feature refinement fits it; allowed: refine=none")

    def check_model(self, model: "CLIP") -> None:
        """Refuse settings that do not fit this model (e.g. block numbers beyond its depth). Default: none."""

    def patch_tokens(
        self, visual: VisionTransformer, images: torch.Tensor, text: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, rows * cols, D) patch tokens of images (B, 3, h, w), not normalised."""
        return dense_tokens(visual, images, self.dense)[:, 1:]

    @torch.no_grad()
    def window_features(
        self, engine: "DenseInference", crops: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mixed, L2-normalised patch features of crops (n, 3, h, w): (n, rows, cols, D) float32."""
        if self.needs_text and text is None:
            raise ValueError(f"the {self.name!r} readout needs the text features to compute patch features")
        model = engine.model
        visual = model.visual
        rows, cols = visual.grid_size(crops.shape[-2], crops.shape[-1])
        num_views = engine.num_views
        per_chunk = max(1, engine.batch_size // num_views)
        chunks = []
        for start in range(0, crops.shape[0], per_chunk):
            chunk = crops[start : start + per_chunk].to(model.device)  # (m, 3, h, w)
            views = make_views(chunk, engine.image_engineering).to(model.dtype)  # (V * m, 3, h, w)
            tokens = self.patch_tokens(visual, views, text).float()  # (V * m, rows * cols, D)
            tokens = F.normalize(tokens, dim=-1).view(num_views, chunk.shape[0], rows, cols, -1)
            chunks.append(mix_views(tokens, engine.img_eng_coef) if engine.image_engineering else tokens[0])
        return torch.cat(chunks)

    @torch.no_grad()
    def window_logits(
        self,
        engine: "DenseInference",
        crops: torch.Tensor,
        text: torch.Tensor,
        refinements: Sequence["FeatureRefinement"] = (),
    ) -> torch.Tensor:
        """(n, Q, rows, cols) float32 similarities of every window's patches with every query."""
        from itaclip_core.refinement.features import RefineContext

        text = text.to(engine.model.device, torch.float32)
        pad = patch_padding(*crops.shape[-2:], engine.model.visual.patch_size) if self.config.pad_to_patch else None
        if pad:
            crops = F.pad(crops, pad)
        features = self.window_features(engine, crops, text)  # (n, rows, cols, D)
        if refinements:
            context = RefineContext(crops.to(engine.model.device), text, self.config, engine.model.visual.patch_size)
            for refinement in refinements:
                features = refinement.refine(features, context)
        upsampler = getattr(engine, "upsampler", None)
        if upsampler is not None:  # (n, Q, h, w) at the window's pixels; the stitch averages per-pixel logits
            logits = upsampler.window_logits(features, crops.to(engine.model.device), text)
        else:
            logits = (features @ text.T).permute(0, 3, 1, 2)
        return crop_padded_logits(logits, crops.shape[-2:], pad) if pad else logits

    def revise_labels(self, labels: torch.Tensor, windows: Sequence["Window"], image_size: tuple[int, int]
                      ) -> torch.Tensor:
        """The final label map (H0, W0) from the post-processed one, using what the last `window_logits` call
        saw of the image's `windows` (boxes in the resized image of `image_size`). Default: unchanged."""
        return labels


def patch_padding(height: int, width: int, patch_size: int) -> tuple[int, int, int, int] | None:
    """ClearCLIP's zero padding (left, right, top, bottom) of a window to a patch multiple (the odd pixel goes
    right / bottom), or None when the window is a multiple already."""
    left = right = top = bottom = 0
    if width % patch_size:
        extra = patch_size - width % patch_size
        left, right = extra // 2, extra - extra // 2
    if height % patch_size:
        extra = patch_size - height % patch_size
        top, bottom = extra // 2, extra - extra // 2
    return (left, right, top, bottom) if left or right or top or bottom else None


def crop_padded_logits(logits: torch.Tensor, padded_size: Sequence[int], pad: tuple[int, int, int, int]
                       ) -> torch.Tensor:
    """Patch logits of padded windows, upsampled bilinearly to the padded size and cut back to the window:
    (n, Q, h, w) at pixel resolution (the stitching's resize from the window to itself is then the identity)."""
    left, right, top, bottom = pad
    height, width = padded_size[0], padded_size[1]
    up = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return up[:, :, top : height - bottom, left : width - right]


@register_readout("tokens")
class TokensReadout(DenseReadout):
    """The tower's dense tokens under the `DenseConfig` (ITACLIP, SCLIP, NACLIP, ClearCLIP): the default."""
