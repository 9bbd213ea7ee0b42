"""Mask attention and proxy attention as dense readouts (`itaclip_core.methods.DENSE_READOUTS`).

- `mask_attention` (`mask_use=attention`): CorrCLIP-style mask-scoped last block (`attention.MaskAttentionReadout`);
  needs masks. Each window receives its crop of the image's region map (`side`, cropped by the engine like the
  image); the flipped views of image engineering get flipped region maps.
- `proxy` (`mask_use=proxy`): ProxyCLIP's last block from a proxy model's features (`attention.ProxyAttentionReadout`);
  needs no masks.

Both produce features on their own grid (the CLIP grid, or the proxy's / DINO's finer one), which the engine
stitches like any other patch grid. The DenseConfig's variants and fusion do not apply to these readouts' last
block (it is replaced as a whole), which `check` says when one is set to a non-default value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from itaclip_core.inference.views import make_views, mix_views
from itaclip_core.masks.attention import MaskAttentionReadout, ProxyAttentionReadout
from itaclip_core.masks.maskset import MaskError
from itaclip_core.methods.base import DenseReadout, register_readout

if TYPE_CHECKING:
    from itaclip_core.inference.engine import DenseInference
    from itaclip_core.presets import SegmentorConfig
    from itaclip_core.refinement.features import FeatureRefinement

MASK_READOUTS = {"attention": "mask_attention", "proxy": "proxy"}


def side_views(side: torch.Tensor, image_engineering: bool) -> torch.Tensor:
    """Per-pixel side data (m, h, w) for the views of `make_views`: (V * m, h, w), flipped with the flipped views."""
    if not image_engineering:
        return side
    return torch.cat([side, side, side, torch.flip(side, dims=[-2]), torch.flip(side, dims=[-1])])


class _GridReadout(DenseReadout):
    """A readout whose tower function returns features on its own grid; handles views, mixing and refinements."""

    accepts_refinements = True
    needs_side = False

    def tower(self, engine: "DenseInference") -> Any:
        raise NotImplementedError

    @torch.no_grad()
    def window_features(self, engine: "DenseInference", crops: torch.Tensor, text: torch.Tensor | None = None,
                        side: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_side and side is None:
            raise MaskError(f"the {self.name!r} readout needs masks: set masks=SOURCE or pass masks=... to predict")
        model = engine.model
        tower = self.tower(engine)
        num_views = engine.num_views
        per_chunk = max(1, engine.batch_size // num_views)
        chunks = []
        for start in range(0, crops.shape[0], per_chunk):
            chunk = crops[start: start + per_chunk].to(model.device)
            views = make_views(chunk, engine.image_engineering).to(model.dtype)
            regions = None
            if side is not None:
                regions = side_views(side[start: start + per_chunk].to(model.device), engine.image_engineering)
            tokens, (rows, cols) = tower(model.visual, views, regions)
            tokens = F.normalize(tokens.float(), dim=-1).view(num_views, chunk.shape[0], rows, cols, -1)
            chunks.append(mix_views(tokens, engine.img_eng_coef) if engine.image_engineering else tokens[0])
        return torch.cat(chunks)

    @torch.no_grad()
    def window_logits(self, engine: "DenseInference", crops: torch.Tensor, text: torch.Tensor,
                      refinements: Sequence["FeatureRefinement"] = (), side: torch.Tensor | None = None
                      ) -> torch.Tensor:
        from itaclip_core.refinement.features import RefineContext

        text = text.to(engine.model.device, torch.float32)
        features = self.window_features(engine, crops, text, side)  # (n, rows, cols, D)
        if refinements:
            context = RefineContext(crops.to(engine.model.device), text, self.config, engine.model.visual.patch_size)
            for refinement in refinements:
                features = refinement.refine(features, context)
        return (features @ text.T).permute(0, 3, 1, 2)


@register_readout("mask_attention")
class MaskAttention(_GridReadout):
    """CorrCLIP-style mask-scoped attention in the last block (`mask_use=attention`)."""

    needs_side = True

    def __init__(self, config: "SegmentorConfig", dense: Any) -> None:
        super().__init__(config, dense)
        self._tower: MaskAttentionReadout | None = None

    def tower(self, engine: "DenseInference") -> MaskAttentionReadout:
        if self._tower is None:
            correlation = None
            if self.config.mask_correlation == "dino":
                from itaclip_core.masks.proxy import build_proxy

                correlation = build_proxy("dino_vitb8" if not self.config.proxy_model.startswith("dino")
                                          else self.config.proxy_model, self.config.proxy_checkpoint,
                                          engine.model.device)
            self._tower = MaskAttentionReadout(self.config.mask_tau, self.config.mask_spatial_weight,
                                               self.config.mask_semantic_weight, correlation)
        return self._tower


@register_readout("proxy")
class ProxyAttention(_GridReadout):
    """ProxyCLIP's proxy attention in the last block (`mask_use=proxy`)."""

    def __init__(self, config: "SegmentorConfig", dense: Any) -> None:
        super().__init__(config, dense)
        self._tower: ProxyAttentionReadout | None = None

    def tower(self, engine: "DenseInference") -> ProxyAttentionReadout:
        if self._tower is None:
            from itaclip_core.masks.proxy import build_proxy

            proxy = build_proxy(self.config.proxy_model, self.config.proxy_checkpoint, engine.model.device)
            self._tower = ProxyAttentionReadout(proxy, self.config.proxy_beta, self.config.proxy_gamma)
        return self._tower


def readout_config(config: "SegmentorConfig") -> "SegmentorConfig":
    """The config with the readout `mask_use` needs (`attention` -> mask_attention, `proxy` -> proxy)."""
    wanted = MASK_READOUTS.get(config.mask_use)
    if wanted is None or config.readout == wanted:
        return config
    if config.readout != "tokens":
        raise MaskError(f"mask_use={config.mask_use} replaces the last block with the {wanted!r} readout, which "
                        f"cannot be combined with readout={config.readout}; use readout=tokens (or mask_use=vote)")
    return config.replace(readout=wanted)
