"""SAM and SAM 2 automatic mask generators as mask sources (optional extras `sam` and `sam2`).

- `sam`: `segment_anything.SamAutomaticMaskGenerator` with ViT-B, ViT-L or ViT-H (`mask_model=vit_b|vit_l|vit_h`);
- `sam2`: `sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator` with SAM 2.1 or SAM 2.0 Hiera
  tiny / small / base+ / large (`mask_model=sam2.1_hiera_t`, ..., `sam2_hiera_l` as CorrCLIP uses).

Checkpoints: an explicit path, or the official file downloaded into the verified cache (`checkpoints.py`), or
`random-tiny[:SEED]`, a tiny random-weight model built from the package's own classes (for tests and demos; it
proposes about one mask per image), or `random`, the full-size model with seeded random weights (for timing).
Checkpoints are read with `torch.load(weights_only=True)` and loaded strictly; one of another model type is refused
with a message naming what it is. The packages are imported when a source is built (a missing one is reported then,
naming the extra), the models when the first image is generated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itaclip_core.masks.checkpoints import CheckpointEntry, fetch_checkpoint
from itaclip_core.masks.config import SamGeneratorConfig
from itaclip_core.masks.extras import require
from itaclip_core.masks.maskset import MaskError, MaskSet, as_mask_set
from itaclip_core.masks.sources import MaskSource, _check_image, register_mask_source
from itaclip_core.model.checkpoint import CheckpointError
from itaclip_core.model.weights import resolve_device

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything"
SAM_MODELS: dict[str, CheckpointEntry] = {
    "vit_b": CheckpointEntry(f"{_SAM_URL}/sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth"),
    "vit_l": CheckpointEntry(f"{_SAM_URL}/sam_vit_l_0b3195.pth", "sam_vit_l_0b3195.pth"),
    "vit_h": CheckpointEntry(f"{_SAM_URL}/sam_vit_h_4b8939.pth", "sam_vit_h_4b8939.pth"),
}
SAM_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}  # image-encoder width -> model type

_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
_SAM2_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
SAM2_MODELS: dict[str, tuple[str, CheckpointEntry]] = {}
for _short, _long in _SAM2_SIZES.items():
    SAM2_MODELS[f"sam2.1_hiera_{_short}"] = (
        f"configs/sam2.1/sam2.1_hiera_{_short}.yaml",
        CheckpointEntry(f"{_SAM2_URL}/092824/sam2.1_hiera_{_long}.pt", f"sam2.1_hiera_{_long}.pt"),
    )
    SAM2_MODELS[f"sam2_hiera_{_short}"] = (
        f"configs/sam2/sam2_hiera_{_short}.yaml",
        CheckpointEntry(f"{_SAM2_URL}/072824/sam2_hiera_{_long}.pt", f"sam2_hiera_{_long}.pt"),
    )
# (trunk embed_dim, trunk blocks) -> size letter
SAM2_TRUNKS = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}

TINY = "random-tiny"
RANDOM = "random"  # the full-size model with seeded random weights (for timing)


def _seeded(build: Any, seed: int = 0) -> Any:
    """Run `build` under a fixed torch seed, restoring the global generator afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _tiny_seed(checkpoint: str | Path | None) -> int | None:
    """The seed of a `random-tiny[:SEED]` spec, else None."""
    text = str(checkpoint) if checkpoint is not None else ""
    if text == TINY:
        return 0
    if text.startswith(TINY + ":"):
        try:
            return int(text[len(TINY) + 1:])
        except ValueError:
            raise MaskError(f"mask_checkpoint {text!r}: expected {TINY} or {TINY}:SEED with an integer seed") from None
    return None


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"mask checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch checkpoint "
                              f"({type(error).__name__}: {error})") from None


def _sam_type(state: dict[str, torch.Tensor]) -> str | None:
    pos = state.get("image_encoder.pos_embed")
    return SAM_WIDTHS.get(int(pos.shape[-1])) if pos is not None else None


def _sam2_type(state: dict[str, torch.Tensor]) -> str | None:
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {key.split(".")[3] for key in state if key.startswith("image_encoder.trunk.blocks.")}
    size = SAM2_TRUNKS.get((int(patch.shape[0]), len(blocks)))
    if size is None:
        return None
    version = "sam2.1" if "no_obj_embed_spatial" in state else "sam2"
    return f"{version}_hiera_{size}"


def _describe(loaded: Any) -> str:
    """What a loaded checkpoint looks like, for error messages."""
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        kind = _sam2_type(loaded["model"])
        return f"a SAM 2 checkpoint ({kind})" if kind else "a checkpoint with a 'model' entry of unknown layout"
    if isinstance(loaded, dict):
        kind = _sam_type(loaded)
        if kind:
            return f"a SAM checkpoint ({kind})"
        if any(str(key).startswith("visual.") for key in loaded):
            return "a CLIP checkpoint"
    return "not a SAM or SAM 2 checkpoint"


class _GeneratorSource(MaskSource):
    """Shared parts of the SAM and SAM 2 sources: device, lazy model, generation."""

    config_type = SamGeneratorConfig
    extra = ""
    models: dict[str, Any] = {}
    default_model = ""

    def __init__(self, generator: Any = None, generator_args: Any = (), model: str | None = None,
                 checkpoint: str | Path | None = None, device: str | None = None, progress: bool = False,
                 cache_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(generator=generator, generator_args=generator_args)
        self.model_name = model or self.default_model
        if self.model_name not in self.models:
            raise MaskError(f"mask_model {self.model_name!r} is not a {self.name} model; use one of "
                            f"{', '.join(self.models)}")
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.progress = progress
        self.cache_dir = cache_dir
        self._generator: Any = None
        self._weights_id = ""
        require(self.extra, what=f"the {self.name} mask source")  # fail early, before any image is processed

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        seed = _tiny_seed(self.checkpoint)
        settings["model"] = self.model_name if seed is None else f"{TINY}:{seed}"
        settings["checkpoint"] = None if self.checkpoint is None or seed is not None else str(self.checkpoint)
        if self.checkpoint is not None and seed is None and str(self.checkpoint) != RANDOM:
            path = Path(self.checkpoint).expanduser()
            if path.is_file():  # a changed file under the same name is a changed setting
                stat = path.stat()
                settings["checkpoint_file"] = [stat.st_size, stat.st_mtime_ns]
        return settings

    def _checkpoint_path(self) -> Path:
        if self.checkpoint is not None:
            return Path(self.checkpoint).expanduser()
        entry = self.models[self.model_name]
        entry = entry[1] if isinstance(entry, tuple) else entry
        return fetch_checkpoint(entry, self.cache_dir, self.progress)

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def mask_generator(self) -> Any:
        """The package's automatic mask generator (built on first use)."""
        raise NotImplementedError

    def generate(self, image_rgb: np.ndarray, name: str | None = None) -> MaskSet:
        image = _check_image(image_rgb)
        generator = self.mask_generator()
        start = time.perf_counter()
        with torch.inference_mode():
            records = generator.generate(image)
        result = as_mask_set(records, image.shape[:2], what=f"{self.name} masks", allow_empty=True) if records \
            else MaskSet(np.zeros((0, *image.shape[:2]), dtype=bool), np.zeros(0, dtype=np.float32))
        result.source = f"{self.name}:{self.settings()['model']}"
        result.info["seconds"] = time.perf_counter() - start
        return result


@register_mask_source("sam")
class SamSource(_GeneratorSource):
    """`SamAutomaticMaskGenerator` of the segment-anything package (ViT-B/L/H)."""

    default_generator = "sam_default"
    extra = "sam"
    models = SAM_MODELS
    default_model = "vit_b"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        assert isinstance(config, SamGeneratorConfig)
        if not config.multimask_output:
            raise MaskError("multimask_output=False (one mask per point) is a SAM 2 setting: SAM's "
                            "SamAutomaticMaskGenerator always predicts three masks per point; use masks=sam2 "
                            "or multimask_output=true")

    def build_model(self) -> torch.nn.Module:
        return load_sam(self.model_name, self.checkpoint, self.cache_dir, self.progress)

    def mask_generator(self) -> Any:
        if self._generator is None:
            amg = require("sam", "segment_anything.automatic_mask_generator", what="the sam mask source")
            model = self.build_model().to(self.device).eval()
            config = self.config
            assert isinstance(config, SamGeneratorConfig)
            self._generator = amg.SamAutomaticMaskGenerator(model, **config.generator_kwargs(self.device.type, False))
        return self._generator


@register_mask_source("sam2")
class Sam2Source(_GeneratorSource):
    """`SAM2AutomaticMaskGenerator` of the sam2 package (SAM 2 / 2.1, Hiera t/s/b+/l)."""

    default_generator = "sam2_default"
    extra = "sam2"
    models = SAM2_MODELS
    default_model = "sam2.1_hiera_t"

    def build_model(self) -> torch.nn.Module:
        build = require("sam2", "sam2.build_sam", what="the sam2 mask source")
        config = self.config
        assert isinstance(config, SamGeneratorConfig)
        seed = _tiny_seed(self.checkpoint)
        if seed is not None:
            return tiny_sam2(seed, apply_postprocessing=config.apply_postprocessing)
        if str(self.checkpoint) == RANDOM:
            return _seeded(lambda: build.build_sam2(self.models[self.model_name][0], ckpt_path=None, device="cpu",
                                                    apply_postprocessing=config.apply_postprocessing)).eval()
        path = self._checkpoint_path()
        loaded = _read_checkpoint(path)
        state = loaded.get("model") if isinstance(loaded, dict) else None
        found = _sam2_type(state) if isinstance(state, dict) else None
        if found != self.model_name:
            raise CheckpointError(f"{path} is {_describe(loaded)}, not a SAM 2 {self.model_name} checkpoint: "
                                  + (f"set mask_model={found}" if found else
                                     "use masks=sam for SAM checkpoints" if "SAM checkpoint" in _describe(loaded)
                                     else f"give a SAM 2 checkpoint ({', '.join(SAM2_MODELS)})"))
        model = build.build_sam2(self.models[self.model_name][0], ckpt_path=None, device="cpu",
                                 apply_postprocessing=config.apply_postprocessing)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{path} does not fit SAM 2 {self.model_name} ({error})") from None
        self._weights_id = str(path)
        return model

    def mask_generator(self) -> Any:
        if self._generator is None:
            amg = require("sam2", "sam2.automatic_mask_generator", what="the sam2 mask source")
            model = self.build_model().to(self.device).eval()
            config = self.config
            assert isinstance(config, SamGeneratorConfig)
            generator = amg.SAM2AutomaticMaskGenerator(model, **config.generator_kwargs(self.device.type, True))
            # The image predictor assumes 1024-px models (backbone feature sizes 256, 128, 64); set them from the
            # model's own image size so that smaller models (the tiny test model) work too.
            size = int(model.image_size)
            generator.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8),
                                                  (size // 16, size // 16)]
            self._generator = generator
        return self._generator


def tiny_sam(seed: int = 0) -> torch.nn.Module:
    """A random SAM of about 0.2 M parameters (128-px ViT encoder, 2 blocks) from segment-anything's classes."""
    modeling = require("sam", "segment_anything.modeling", what="the tiny SAM")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = modeling.ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                           out_chans=32, qkv_bias=True, use_rel_pos=True, window_size=4,
                                           global_attn_indexes=(1,))
        prompt = modeling.PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128),
                                        mask_in_chans=8)
        decoder = modeling.MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2,
                                       iou_head_hidden_dim=32,
                                       transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                                                                              num_heads=2))
        model = modeling.Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53],
                             pixel_std=[58.395, 57.12, 57.375])
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_sam2(seed: int = 0, apply_postprocessing: bool = True) -> torch.nn.Module:
    """A random SAM 2.1 of 128 px with a 5-block, 16-wide Hiera trunk, from the sam2 package's config and classes."""
    build = require("sam2", "sam2.build_sam", what="the tiny SAM 2")
    overrides = [
        "++model.image_size=128",
        "++model.image_encoder.trunk.embed_dim=16",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
        "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
        "++model.image_encoder.neck.d_model=32",
        "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    ]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build.build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
                                 hydra_overrides_extra=overrides, apply_postprocessing=apply_postprocessing)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def load_sam(model_name: str = "vit_b", checkpoint: str | Path | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, setting: str = "mask_model") -> torch.nn.Module:
    """A SAM model: `random-tiny[:SEED]`, a checkpoint path, or (None) the official checkpoint from the cache.
    A checkpoint of another model type is refused with a message naming what it is."""
    segment_anything = require("sam", what="SAM")
    if model_name not in SAM_MODELS:
        raise MaskError(f"{setting} {model_name!r} is not a SAM model; use one of {', '.join(SAM_MODELS)}")
    seed = _tiny_seed(checkpoint)
    if seed is not None:
        return tiny_sam(seed)
    if str(checkpoint) == RANDOM:
        return _seeded(lambda: segment_anything.sam_model_registry[model_name](checkpoint=None)).eval()
    path = Path(checkpoint).expanduser() if checkpoint is not None else \
        fetch_checkpoint(SAM_MODELS[model_name], cache_dir, progress)
    state = _read_checkpoint(path)
    found = _sam_type(state) if isinstance(state, dict) else None
    if found != model_name:
        raise CheckpointError(f"{path} is {_describe(state)}, not a SAM {model_name} checkpoint: "
                              + (f"set {setting}={found}" if found else
                                 "use masks=sam2 for SAM 2 checkpoints" if "SAM 2" in _describe(state) else
                                 f"give a SAM checkpoint ({', '.join(SAM_MODELS)})"))
    model = segment_anything.sam_model_registry[model_name](checkpoint=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit SAM {model_name} ({error})") from None
    return model.eval()
