"""What the notebooks in `notebooks/` share, so that each notebook stays a thin sequence of calls and figures.

- A notebook run (`start_notebook`): the shared parameters, output folders, seeds, figures under stable names and
  the results JSON written by the last cell (`NotebookRun.write_results`).
- The model, dataset and settings the parameters name (`load_model`, `open_dataset`, `resolve_path`), settings for
  typed class names (`open_vocabulary_config`, `shipped_aux_texts`, `set_classes_with_texts`).
- Inspection of the image side: patch tokens and their PCA colours, the attention of one query patch, the logits
  of each image-engineering view, the post-processing step by step.
- Evaluation on a dataset subset, the I / T / A ablation of the ITACLIP paper and the auxiliary-text sweep.
- Throughput / peak-memory measurement (the straightforward algorithm is `itaclip_core.reference`).
- Notebooks without outputs: `python -m itaclip_core.explore strip|check notebooks/*.ipynb`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # text bars: they also render in HTML reports and headless runs

from itaclip_core import vis
from itaclip_core.attention.dense import DenseConfig, attention_maps, dense_tokens
from itaclip_core.benchmark import RssSampler
from itaclip_core.data.base import SegDataset
from itaclip_core.data.registry import get_dataset
from itaclip_core.inference.engine import DenseInference
from itaclip_core.inference.preprocess import ImageInput, PreparedImage, prepare_image, to_bgr_uint8
from itaclip_core.inference.sliding import Window, stitch
from itaclip_core.inference.views import VIEW_NAMES, make_views
from itaclip_core.metrics import IoUAccumulator
from itaclip_core.model.clip import CLIP
from itaclip_core.model.random import is_random_spec
from itaclip_core.model.weights import load_clip
from itaclip_core.postprocess import area_threshold, class_probabilities, close_labels, labels_from_probs, postprocess
from itaclip_core.presets import SegmentorConfig, apply_overrides, get_preset
from itaclip_core.refinement.pamr import pamr
from itaclip_core.resources import texts_dir
from itaclip_core.segmentor import Prediction, Segmentor
from itaclip_core.text.classes import aux_name_matches, parse_class_list, read_aux_file
from itaclip_core.text.classifier import TextClassifier, build_classifier, load_templates

# The parameters every notebook defines in its `parameters` cell (papermill injects values after that cell).
PARAMETER_NAMES = ("MODEL", "WEIGHTS", "PRESET", "OVERRIDES", "DATASET", "DATA_ROOT", "NUM_IMAGES", "DEVICE", "SEED",
                   "OUT_DIR", "FIGURES_DIR", "IMAGE", "CLASSES")  # fmt: skip
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ paths and runs
def project_root() -> Path:
    """The checkout holding the package (where `notebooks/`, `figures/` and `data/` live), else the working folder."""
    return _PACKAGE_ROOT if (_PACKAGE_ROOT / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | Path, must_exist: bool = True, what: str = "path") -> Path:
    """An absolute path for a notebook parameter.

    Args:
        path: absolute, or relative to the working folder or to `project_root()` (tried in that order).
        must_exist: an input: raise when neither location holds it. Otherwise an output: relative paths are
            placed under `project_root()`.
        what: the parameter's name, for the error message.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if must_exist and not candidate.exists():
            raise FileNotFoundError(f"{what} {candidate} does not exist: check the notebook parameter {what}")
        return candidate
    if not must_exist:
        return project_root() / candidate
    for base in (Path.cwd(), project_root()):
        if (base / candidate).exists():
            return (base / candidate).resolve()
    raise FileNotFoundError(
        f"{what} {str(path)!r} was found neither in {Path.cwd()} nor in {project_root()}: set the notebook "
        f"parameter {what} to an existing path"
    )


def is_random_model(model: str | None, weights: str | None = None) -> bool:
    """True when the parameters name a random CLIP (`random-tiny`, ...), whose outputs mean nothing."""
    return is_random_spec(str(weights if weights else model))


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become None, numpy and torch scalars and arrays become Python values,
    tuples lists, paths strings, dataclasses dicts."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


@dataclass
class NotebookRun:
    """One execution of a notebook: its parameters, where its figures and results go."""

    notebook: str  # the notebook's stem, e.g. "03_image_engineering"
    parameters: dict[str, Any]  # the shared parameters as set for this run
    out_dir: Path  # results JSON folder
    figures_dir: Path  # figures folder
    figures: list[str] = field(default_factory=list)  # names of the figures saved so far

    @property
    def random_model(self) -> bool:
        return is_random_model(self.parameters["MODEL"], self.parameters["WEIGHTS"])

    def figure_path(self, name: str) -> Path:
        """Where figure `name` goes (`NN_<what>.png`, NN the notebook's number); the figure is recorded as written."""
        prefix = self.notebook.split("_")[0] + "_"
        if not name.startswith(prefix) or not name.endswith(".png"):
            raise ValueError(f"figure name {name!r} must look like {prefix}<what>.png (stable names per notebook)")
        if name not in self.figures:
            self.figures.append(name)
        return self.figures_dir / name

    def save_figure(self, figure: Any, name: str, dpi: int = 100) -> Path:
        """Save a matplotlib figure as `figures_dir/name` (see `figure_path`)."""
        path = self.figure_path(name)
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        return path

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Write `out_dir/<notebook>.json`: the results with the parameters, the figures and the environment."""
        payload = {
            "notebook": self.notebook,
            "results": to_jsonable(results),
            "parameters": to_jsonable(self.parameters),
            "figures": list(self.figures),
            "random_model": self.random_model,
            "python": sys.executable,
            "torch": torch.__version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = self.out_dir / f"{self.notebook}.json"
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def start_notebook(notebook: str, namespace: Mapping[str, Any]) -> NotebookRun:
    """Begin a notebook run from the parameters defined in `namespace` (pass `globals()`).

    Creates OUT_DIR and FIGURES_DIR (relative paths under the project root), seeds Python, NumPy and PyTorch with
    SEED, and says so when the model is a random network.
    """
    missing = [name for name in PARAMETER_NAMES if name not in namespace]
    if missing:
        raise NameError(f"the parameters cell of {notebook} must define {', '.join(missing)}")
    parameters = {name: namespace[name] for name in PARAMETER_NAMES}
    out_dir = resolve_path(parameters["OUT_DIR"], must_exist=False, what="OUT_DIR")
    figures_dir = resolve_path(parameters["FIGURES_DIR"], must_exist=False, what="FIGURES_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    seed = int(parameters["SEED"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    run = NotebookRun(notebook, parameters, out_dir, figures_dir)
    if run.random_model:
        print(f"NOTE: MODEL={parameters['WEIGHTS'] or parameters['MODEL']} is a random network: this run only shows "
              "that the notebook executes; its figures and numbers mean nothing.")  # fmt: skip
    return run


# ------------------------------------------------------------------------------------------------ model, data, texts
def load_model(model: str, weights: str | Path | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> CLIP:  # fmt: skip
    """The CLIP the parameters name: WEIGHTS (a checkpoint path) when given, else MODEL (`ViT-B/16`, a path,
    `random-tiny`).

    Args:
        model: an OpenAI model name, a checkpoint path or a random-model spec.
        weights: a checkpoint file that replaces `model` (None: use `model`).
        device: e.g. "cpu" or "cuda" (None: CUDA when available).
        dtype: compute dtype (None: float16 on CUDA, float32 on CPU).
    """
    spec: str | Path = model
    if weights not in (None, ""):
        spec = weights if is_random_spec(str(weights)) else resolve_path(weights, what="WEIGHTS")
    return load_clip(spec, device=device, dtype=dtype, progress=True)


def override_list(overrides: str | Sequence[str] | None) -> list[str]:
    """OVERRIDES as a list of `key=value` strings (one string is one override; None or "" is none)."""
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return []
    return [overrides] if isinstance(overrides, str) else [str(item) for item in overrides]


def notebook_config(preset: str, overrides: str | Sequence[str] | Mapping[str, Any] | None = None) -> SegmentorConfig:
    """The preset PRESET with the OVERRIDES applied (`key=value` strings, one string, or a dict).

    Text files given by a relative path that exists under the working folder or the project root (templates, class
    file, auxiliary file) are made absolute, so that the notebook finds them from any working folder.
    """
    if not isinstance(overrides, Mapping):
        overrides = override_list(overrides)
    config = apply_overrides(get_preset(preset), overrides)
    changes = {}
    for key in ("templates", "classes", "aux_file"):
        value = getattr(config, key)
        if value is not None and not Path(value).is_absolute() and not (texts_dir() / value).is_file():
            for base in (Path.cwd(), project_root()):
                if (base / value).is_file():
                    changes[key] = str((base / value).resolve())
                    break
    return config.replace(**changes) if changes else config


def open_dataset(name: str | None, root: str | Path, config: SegmentorConfig | None = None) -> SegDataset:
    """The benchmark DATASET under DATA_ROOT, checked against the preset it is evaluated with.

    Args:
        name: dataset registry name (None: the preset's dataset).
        root: the dataset root (relative to the working folder or the project root).
        config: the settings in use; a preset made for another dataset is refused.
    """
    name = name or (config.dataset if config is not None else None)
    if name is None:
        raise ValueError("DATASET is not set and the preset is not made for a dataset: set DATASET (e.g. 'voc21')")
    if config is not None and config.dataset not in (None, name):
        raise ValueError(f"PRESET {config.name} is made for {config.dataset} but DATASET is {name}: choose a "
                         f"preset made for {name} (e.g. itaclip_{name} or sclip_{name})")  # fmt: skip
    return get_dataset(name, resolve_path(root, what="DATA_ROOT"))


def open_vocabulary_config(config: SegmentorConfig) -> SegmentorConfig:
    """The settings of `config` for arbitrary class names: its architecture, image engineering, PAMR, closing and
    logit scale, without its class file, auxiliary file, background class and thresholds."""
    return config.replace(name=f"{config.name}+open_vocab", dataset=None, classes=None, background=False,
                          aux_file=None, aux_coef=0.0, prob_thd=0.0, area_thd=None)  # fmt: skip


def with_dense(config: SegmentorConfig, dense: DenseConfig) -> SegmentorConfig:
    """`config` with the image tower read out as `dense` says (e.g. a `DENSE_METHODS` entry)."""
    if dense.block_variants:
        raise ValueError("a SegmentorConfig cannot hold per-block attention variants (block_variants)")
    return config.replace(attention=dense.variant, fuse_blocks=tuple(dense.fuse_blocks),
                          fuse_attention=dense.fuse_variant, fuse_weight=dense.fuse_weight,
                          last_residual=dense.last_residual, last_mlp=dense.last_mlp)  # fmt: skip


def explorer_config(base: SegmentorConfig, image_engineering: bool, attention: str, fuse: bool, pamr: bool,
                    closing: bool, prob_thd: float, area_thd: float, stride: int) -> SegmentorConfig:  # fmt: skip
    """Settings from the explorer's switches, on top of `base` (usually `open_vocabulary_config` of a preset).

    Args:
        image_engineering: five views per window.
        attention: the last block's attention variant (a name in `ATTENTION_VARIANTS`).
        fuse: fuse the attention maps of blocks 7, 8 and 10 into the last block's (ITACLIP).
        pamr: refine with PAMR (the base's steps, 10 when the base has none).
        closing: 3 x 3 closing of the label map.
        prob_thd: probability threshold (pixels below it get class 0).
        area_thd: area threshold (0: none).
        stride: sliding-window step in pixels.
    """
    return base.replace(image_engineering=bool(image_engineering), attention=attention,
                        fuse_blocks=(7, 8, 10) if fuse else (), pamr_steps=(base.pamr_steps or 10) if pamr else 0,
                        closing=bool(closing), prob_thd=float(prob_thd), area_thd=float(area_thd) or None,
                        stride=int(stride), name=f"{base.name}+explorer")  # fmt: skip


def shipped_aux_texts(names: Sequence[str], kind: str = "definitions") -> list[str | None]:
    """For each class name, the first definition (or synonym list) of that name in the shipped files, or None.

    Args:
        names: class names (a `|`-separated string lists variants, any of which may match).
        kind: "definitions" or "synonyms".
    """
    if kind not in ("definitions", "synonyms"):
        raise ValueError(f"kind must be 'definitions' or 'synonyms', got {kind!r}")
    entries = [entry for path in sorted((texts_dir() / kind).glob("*.txt")) for entry in read_aux_file(path)]
    found: list[str | None] = []
    for name in names:
        variants = [v.strip() for v in name.split("|")]
        found.append(next((text for line_name, text in entries if aux_name_matches(line_name, variants)), None))
    return found


def set_classes_with_texts(segmentor: Segmentor, classes: str | Sequence[str], aux_texts: Sequence[str | None],
                           aux_coef: float) -> TextClassifier:  # fmt: skip
    """Give a segmentor typed classes with one auxiliary text per class (None: the class's own name, which
    leaves its embedding unchanged). Returns the new classifier, also set on the segmentor."""
    vocab = parse_class_list(classes)
    if len(aux_texts) != vocab.num_classes:
        raise ValueError(f"{len(aux_texts)} auxiliary texts for {vocab.num_classes} classes: give one per class")
    texts = [text if text else names[0] for text, names in zip(aux_texts, vocab.variants)]
    config = segmentor.config
    segmentor.classifier = build_classifier(
        segmentor.model, vocab, load_templates(config.templates), aux_texts=texts, aux_coef=aux_coef,
        background=False, batch_size=config.text_batch_size, truncate=config.truncate_texts,
        cache_dir=segmentor.cache_dir,
    ).to(segmentor.model.device)  # fmt: skip
    return segmentor.classifier


def class_palette(num_classes: int, background: bool) -> np.ndarray:
    """Display colours (num_classes, 3): the VOC colour map, whose first colour (black) only a background class
    gets; without one, every class gets a visible colour."""
    return vis.palette(num_classes) if background else vis.palette(num_classes + 1)[1:]


def load_rgb(image: ImageInput) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, decoded as the pipeline decodes it."""
    return np.ascontiguousarray(to_bgr_uint8(image)[:, :, ::-1])


# ------------------------------------------------------------------------------------------------ image side
def patch_tokens(model: CLIP, image: torch.Tensor, dense: DenseConfig) -> torch.Tensor:
    """L2-normalised dense patch features (rows, cols, D) float32 of a normalised image (3, h, w)."""
    rows, cols = model.visual.grid_size(image.shape[-2], image.shape[-1])
    with torch.no_grad():
        tokens = dense_tokens(model.visual, image[None].to(model.device, model.dtype), dense)[0, 1:].float()
    return F.normalize(tokens, dim=-1).view(rows, cols, -1).cpu()  # (rows * cols, D) -> (rows, cols, D)


def pca_rgb(tokens: torch.Tensor) -> np.ndarray:
    """The first three principal components of patch features (rows, cols, D) as colours (rows, cols, 3) in [0, 1]."""
    rows, cols, dim = tokens.shape
    flat = tokens.reshape(rows * cols, dim).double()
    flat = flat - flat.mean(dim=0)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[:3].T  # (rows * cols, k), k <= 3
    proj = proj * torch.sign(proj[proj.abs().argmax(dim=0), torch.arange(proj.shape[1])])  # fix each sign
    low, high = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - low) / (high - low).clamp_min(1e-12)
    out = torch.zeros(rows * cols, 3, dtype=torch.float64)
    out[:, : proj.shape[1]] = proj
    return out.view(rows, cols, 3).numpy()


def attention_parts(model: CLIP, image: torch.Tensor, query: tuple[int, int],
                    dense: DenseConfig) -> dict[str, np.ndarray]:  # fmt: skip
    """Every attention map `attention_maps` gives for one setting (`last`, `block<N>` of the fused blocks, `fused`),
    as the attention of one query patch: name -> (rows, cols) float32, mean over heads, class token left out.

    Args:
        model: the CLIP.
        image: (3, h, w) normalised image.
        query: (row, col) of the query patch on the patch grid.
        dense: the dense setting.
    """
    rows, cols = model.visual.grid_size(image.shape[-2], image.shape[-1])
    row, col = query
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"query patch {query} lies outside the {rows} x {cols} patch grid")
    token = 1 + row * cols + col
    with torch.no_grad():
        maps = attention_maps(model.visual, image[None].to(model.device, model.dtype), dense)  # each (1, H, T, T)
    return {name: m[0, :, token, 1:].mean(dim=0).view(rows, cols).cpu().numpy() for name, m in maps.items()}


def query_attention(model: CLIP, image: torch.Tensor, query: tuple[int, int],
                    configs: Mapping[str, DenseConfig]) -> dict[str, np.ndarray]:  # fmt: skip
    """The attention of one query patch over the patches, as each dense setting applies it in the last block:
    name -> (rows, cols) map (the `fused` map of `attention_parts`: the last block's own map, fused with the
    intermediate blocks' maps when the setting fuses them)."""
    return {name: attention_parts(model, image, query, dense)["fused"] for name, dense in configs.items()}


def window_features(segmentor: Segmentor, prepared: PreparedImage) -> tuple[torch.Tensor, list[Window]]:
    """The mixed patch features (N, rows, cols, D) of every window of an image, and the windows: the part of the
    pipeline that does not depend on the texts (reuse it across classifiers)."""
    image = prepared.tensor.to(segmentor.model.device, torch.float32)
    windows = segmentor.engine.windows(image.shape[-2], image.shape[-1])
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
    return segmentor.engine.window_features(crops), windows


def logits_from_features(features: torch.Tensor, windows: list[Window], prepared: PreparedImage,
                         text_features: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-query similarities (Q, H0, W0) at the original size from `window_features`' output."""
    text = text_features.to(features.device, torch.float32)
    patch = (features @ text.T).permute(0, 3, 1, 2)  # (N, rows, cols, Q) -> (N, Q, rows, cols)
    return stitch(patch, windows, tuple(prepared.tensor.shape[-2:]), prepared.original_size)


def view_logits(segmentor: Segmentor, prepared: PreparedImage) -> dict[str, torch.Tensor]:
    """The similarities (Q, H0, W0) of each image-engineering view alone (flipped views flipped back), at the
    original size. `mix_view_logits` of them is what the pipeline computes with image engineering."""
    engine, visual = segmentor.engine, segmentor.model.visual
    image = prepared.tensor.to(segmentor.model.device, torch.float32)
    windows = engine.windows(image.shape[-2], image.shape[-1])
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (N, 3, h, w)
    rows, cols = visual.grid_size(crops.shape[-2], crops.shape[-1])
    per_chunk = max(1, engine.batch_size // len(VIEW_NAMES))
    chunks = []
    with torch.no_grad():
        for start in range(0, crops.shape[0], per_chunk):
            chunk = crops[start : start + per_chunk]
            views = make_views(chunk, True).to(segmentor.model.dtype)  # (5 * n, 3, h, w)
            tokens = F.normalize(dense_tokens(visual, views, engine.dense)[:, 1:].float(), dim=-1)
            chunks.append(tokens.view(len(VIEW_NAMES), chunk.shape[0], rows, cols, -1))  # (5, n, rows, cols, D)
    features = torch.cat(chunks, dim=1)  # (5, N, rows, cols, D)
    features[3] = torch.flip(features[3], dims=[1])  # vertical flip undone on the patch rows
    features[4] = torch.flip(features[4], dims=[2])  # horizontal flip undone on the patch columns
    text = segmentor.classifier.features
    return {name: logits_from_features(features[i], windows, prepared, text) for i, name in enumerate(VIEW_NAMES)}


def mix_view_logits(logits: Mapping[str, torch.Tensor], coef: float) -> torch.Tensor:
    """ITACLIP's mix of the five views' similarities: coef * mean(original, gray, blur) + (1 - coef) * mean(flips)."""
    first = sum(logits[name] for name in VIEW_NAMES[:3]) / 3
    flipped = sum(logits[name] for name in VIEW_NAMES[3:]) / 2
    return coef * first + (1.0 - coef) * flipped


def finish_prediction(segmentor: Segmentor, prepared: PreparedImage, logits: torch.Tensor,
                      classifier: TextClassifier | None = None) -> Prediction:  # fmt: skip
    """PAMR (when the config enables it) and post-processing of per-query similarities (Q, H0, W0), as
    `Segmentor.predict_prepared` does after the image side."""
    config = segmentor.config
    classifier = classifier or segmentor.classifier
    if config.pamr_steps > 0:
        guide = F.interpolate(prepared.tensor[None].to(logits.device), size=prepared.original_size, mode="bilinear")
        logits = pamr(guide, logits[None], config.pamr_steps, config.pamr_dilations)[0]
    result = postprocess(logits, classifier.query_to_class, config.logit_scale, prob_thd=config.prob_thd,
                         area_thd=config.area_thd, closing=config.closing, num_classes=classifier.num_classes)
    return Prediction(result.labels.cpu().numpy().astype(np.int64), result.probs.cpu().numpy(),
                      list(classifier.class_names), prepared.name)  # fmt: skip


class PipelineStep(NamedTuple):
    """The label map after one step of the post-processing."""

    name: str  # what the step does
    labels: np.ndarray  # (H0, W0) int64
    enabled: bool  # False: the settings skip this step (the labels are those of the step before)


def pipeline_steps(segmentor: Segmentor, prepared: PreparedImage) -> list[PipelineStep]:
    """The label map after each step: raw similarities, PAMR, area threshold, probability threshold, closing.
    The last step's labels equal `segmentor.predict_prepared(prepared).labels`."""
    config, classifier = segmentor.config, segmentor.classifier
    image = prepared.tensor.to(segmentor.model.device, torch.float32)
    with torch.no_grad():
        logits = segmentor.engine.logits(image, classifier.features, prepared.original_size)
        steps = []

        def probs_of(values: torch.Tensor) -> torch.Tensor:
            return class_probabilities(values, classifier.query_to_class, config.logit_scale, classifier.num_classes)

        steps.append(PipelineStep("argmax of the similarities", probs_of(logits).argmax(dim=0).cpu().numpy(), True))
        if config.pamr_steps > 0:
            guide = F.interpolate(image[None], size=prepared.original_size, mode="bilinear")
            logits = pamr(guide, logits[None], config.pamr_steps, config.pamr_dilations)[0]
        probs = probs_of(logits)
        steps.append(PipelineStep(f"PAMR ({config.pamr_steps} steps)", probs.argmax(dim=0).cpu().numpy(),
                                  config.pamr_steps > 0))  # fmt: skip
        probs = area_threshold(probs, config.area_thd)
        steps.append(PipelineStep(f"area threshold {config.area_thd}", probs.argmax(dim=0).cpu().numpy(),
                                  config.area_thd is not None))  # fmt: skip
        labels = labels_from_probs(probs, config.prob_thd)
        steps.append(PipelineStep(f"probability threshold {config.prob_thd}", labels.cpu().numpy(),
                                  config.prob_thd > 0))  # fmt: skip
        closed = close_labels(labels) if config.closing else labels
        steps.append(PipelineStep("3x3 closing", closed.cpu().numpy(), config.closing))
    return [PipelineStep(s.name, s.labels.astype(np.int64), s.enabled) for s in steps]


# ------------------------------------------------------------------------------------------------ evaluation
class LabelledImage(NamedTuple):
    """A prepared dataset image and its label map."""

    prepared: PreparedImage
    label: np.ndarray  # (H0, W0) uint8, 255 ignored


def load_subset(dataset: SegDataset, num_images: int | None, config: SegmentorConfig,
                progress: bool = True) -> list[LabelledImage]:  # fmt: skip
    """The first `num_images` images of a dataset (None: all), prepared as `config` expects (its short and long
    side), with their labels."""
    count = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    if count < 1:
        raise ValueError(f"no images to evaluate: NUM_IMAGES is {num_images} and {dataset.name} has {len(dataset)}")
    return [
        LabelledImage(prepare_image(dataset[i].image_path, config.short_side, config.long_side, name=dataset[i].name),
                      dataset.load_label(i))
        for i in tqdm(range(count), desc="load images", disable=not progress, leave=False)
    ]  # fmt: skip


def scores(accumulator: IoUAccumulator, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (percentages) and the per-class IoU of summed counts."""
    result = accumulator.results(class_names)
    return {key: result[key] for key in ("mIoU", "mAcc", "aAcc", "IoU", "class_names", "num_images")}


def evaluate_subset(segmentor: Segmentor, dataset: SegDataset, subset: Sequence[LabelledImage],
                    progress: bool = True, desc: str = "evaluate") -> dict[str, Any]:  # fmt: skip
    """Score a segmentor on preloaded images of `dataset` (see `load_subset`); adds `seconds_per_image`."""
    accumulator = IoUAccumulator(dataset.num_classes, dataset.ignore_index)
    started = time.perf_counter()
    for item in tqdm(subset, desc=desc, disable=not progress, leave=False):
        accumulator.update(segmentor.predict_prepared(item.prepared).labels, item.label)
    result = scores(accumulator, dataset.class_names)
    result["seconds_per_image"] = (time.perf_counter() - started) / max(len(subset), 1)
    return result


def evaluate_logits(segmentor: Segmentor, dataset: SegDataset, subset: Sequence[LabelledImage],
                    logits_fn: Callable[[PreparedImage], Mapping[str, torch.Tensor]],
                    progress: bool = True) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Score several ways of computing the similarities on the same images in one pass.

    Args:
        segmentor: supplies the classifier, PAMR and post-processing settings (`finish_prediction`).
        dataset, subset: the benchmark and its preloaded images (`load_subset`).
        logits_fn: per prepared image, name -> per-query similarities (Q, H0, W0); the same names every image.
    Returns:
        name -> mIoU, mAcc, aAcc, per-class IoU.
    """
    accumulators: dict[str, IoUAccumulator] = {}
    with torch.no_grad():
        for item in tqdm(subset, desc="evaluate", disable=not progress, leave=False):
            for name, logits in logits_fn(item.prepared).items():
                if name not in accumulators:
                    accumulators[name] = IoUAccumulator(dataset.num_classes, dataset.ignore_index)
                accumulators[name].update(finish_prediction(segmentor, item.prepared, logits).labels, item.label)
    return {name: scores(acc, dataset.class_names) for name, acc in accumulators.items()}


# What switches each ITACLIP component off: Image engineering, Text enhancement, Architectural changes.
ABLATION_OFF: dict[str, tuple[str, ...]] = {
    "I": ("image_engineering=false",),
    "T": ("aux_file=none", "aux_coef=0"),
    "A": ("fuse_blocks=none", "last_mlp=true"),  # SCLIP's last block: self-self attention, MLP kept, no fusion
}
# Rows of the paper's ablation table: the components each row switches on.
ABLATION_ROWS: tuple[str, ...] = ("", "A", "AT", "AI", "ATI")


def ablation_label(components: str) -> str:
    """The row label of a set of components: "baseline" or "+A+T+I"."""
    return "baseline" if not components else "".join(f"+{c}" for c in components)


def ablation_configs(base: SegmentorConfig,
                     rows: Sequence[str] = ABLATION_ROWS) -> dict[str, tuple[SegmentorConfig, list[str]]]:  # fmt: skip
    """The ablation rows as settings built from an ITACLIP preset: row label -> (config, the overrides applied).

    Args:
        base: an ITACLIP config (with all three components on).
        rows: per row, the components switched on (letters of "ITA"; "" is the SCLIP-like baseline).
    """
    if base.method != "itaclip":
        raise ValueError(f"the ablation starts from an ITACLIP preset, got {base.name} ({base.method})")
    out = {}
    for row in rows:
        unknown = set(row) - set(ABLATION_OFF)
        if unknown:
            raise ValueError(f"ablation row {row!r}: unknown components {sorted(unknown)}; use letters of 'ITA'")
        overrides = [item for component in "ATI" if component not in row for item in ABLATION_OFF[component]]
        config = apply_overrides(base, overrides).replace(name=f"{base.name}{ablation_label(row)}")
        out[ablation_label(row)] = (config, overrides)
    return out


def run_ablation(model: CLIP, base: SegmentorConfig, dataset: SegDataset, num_images: int | None,
                 rows: Sequence[str] = ABLATION_ROWS, cache_dir: str | Path | None | bool = True,
                 progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Evaluate every ablation row on the first `num_images` images; one dict per row (label, components,
    overrides, mIoU, mAcc, aAcc, per-class IoU, seconds per image)."""
    subset = load_subset(dataset, num_images, base, progress)
    results = []
    for label, (config, overrides) in ablation_configs(base, rows).items():
        segmentor = Segmentor(model, config, cache_dir=cache_dir)
        row = evaluate_subset(segmentor, dataset, subset, progress, desc=label)
        results.append({"row": label, "components": label.replace("+", "") if label != "baseline" else "",
                        "overrides": overrides, **row})  # fmt: skip
    return results


def sweep_aux_coef(segmentor: Segmentor, dataset: SegDataset, subset: Sequence[LabelledImage],
                   coefs: Sequence[float], aux_files: Mapping[str, str | None],
                   progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """mIoU for each auxiliary file and mixing coefficient, computing the image side once per image.

    Args:
        segmentor: its config's classes are used; its classifier is restored afterwards.
        dataset, subset: the benchmark and its preloaded images (`load_subset`).
        coefs: aux_coef values.
        aux_files: label -> auxiliary-text file (under texts/ or a path).
    Returns:
        One dict per (file, coef): aux, aux_file, aux_coef, mIoU, mAcc, aAcc.
    """
    original = segmentor.classifier
    grid = [(label, path, float(c)) for label, path in aux_files.items() for c in coefs]
    classifiers = []
    for label, path, coef in grid:  # text embeddings are cached per text: each file is encoded once
        segmentor.set_classes(segmentor.config.classes, aux_file=path, aux_coef=coef)
        classifiers.append(segmentor.classifier)
    segmentor.classifier = original
    accumulators = [IoUAccumulator(dataset.num_classes, dataset.ignore_index) for _ in grid]
    with torch.no_grad():
        for item in tqdm(subset, desc="aux sweep", disable=not progress, leave=False):
            features, windows = window_features(segmentor, item.prepared)
            for accumulator, classifier in zip(accumulators, classifiers):
                logits = logits_from_features(features, windows, item.prepared, classifier.features)
                labels = finish_prediction(segmentor, item.prepared, logits, classifier).labels
                accumulator.update(labels, item.label)
    return [{"aux": label, "aux_file": path, "aux_coef": coef,
             **{k: v for k, v in scores(acc, dataset.class_names).items() if k in ("mIoU", "mAcc", "aAcc")}}
            for (label, path, coef), acc in zip(grid, accumulators)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ speed
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


# ------------------------------------------------------------------------------------------------ notebook files
def notebook_problems(path: str | Path) -> list[str]:
    """What a committed notebook must not hold: outputs, execution counts, stored widget state."""
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    problems = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"{path}: cell {number} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"{path}: cell {number} has an execution count")
    if "widgets" in notebook.get("metadata", {}):
        problems.append(f"{path}: the notebook stores widget state")
    return problems


def strip_notebook(path: str | Path) -> bool:
    """Remove outputs, execution counts and run metadata from a notebook file; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        metadata = cell.get("metadata", {})
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            metadata.pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    for key in ("papermill", "widgets"):
        notebook.get("metadata", {}).pop(key, None)
    stripped = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if stripped != text:
        path.write_text(stripped, encoding="utf-8")
    return stripped != text


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m itaclip_core.explore strip|check NOTEBOOK...`: strip outputs, or fail when any are stored."""
    parser = argparse.ArgumentParser(prog="python -m itaclip_core.explore",
                                     description="Keep notebooks free of outputs before committing them.")
    parser.add_argument("action", choices=("strip", "check"), help="strip: remove outputs; check: list them")
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebook files")
    args = parser.parse_args(argv)
    if args.action == "strip":
        for path in args.notebooks:
            if strip_notebook(path):
                print(f"stripped {path}")
        return 0
    problems = [problem for path in args.notebooks for problem in notebook_problems(path)]
    for problem in problems:
        print(problem)
    if problems:
        print("run: python -m itaclip_core.explore strip " + " ".join(str(p) for p in args.notebooks))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
