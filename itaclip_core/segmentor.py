"""The stateful segmentor: classes are set once (their text classifier cached), then many images are predicted.

    from itaclip_core import Segmentor
    seg = Segmentor.from_preset("open_vocab", weights="ViT-B/16", classes="cat, dog, sky, grass")
    prediction = seg.predict("photo.jpg")       # labels (H, W), probs (K, H, W), class_names
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from itaclip_core.inference.engine import DenseInference
from itaclip_core.inference.preprocess import ImageInput, PreparedImage, prepare_image
from itaclip_core.model.clip import CLIP
from itaclip_core.model.weights import default_cache_dir, load_clip
from itaclip_core.postprocess import postprocess
from itaclip_core.backbones import fit_to_backbone, parse_backbone
from itaclip_core.presets import SegmentorConfig, apply_overrides, get_preset, override_keys
from itaclip_core.refinement.pamr import pamr
from itaclip_core.resources import texts_dir
from itaclip_core.text.classes import (
    ClassVocabulary,
    TextFileError,
    check_aux_matches,
    parse_class_list,
    read_aux_file,
    read_class_file,
)
from itaclip_core.text.classifier import TextClassifier, build_classifier, load_templates

ClassesInput = str | Path | Sequence[str] | Sequence[Sequence[str]] | ClassVocabulary


@dataclass
class Prediction:
    """The segmentation of one image, at its original size."""

    labels: np.ndarray  # (H, W) int64 class ids
    probs: np.ndarray  # (K, H, W) float32 class probabilities (softmax, variant max, area threshold)
    class_names: list[str]  # K display names
    name: str = ""  # the image's name, when known

    def areas(self) -> dict[str, float]:
        """Fraction of the image each class covers, for the classes present, largest first."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        total = max(int(self.labels.size), 1)
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[i]: float(counts[i]) / total for i in order if counts[i] > 0}


def resolve_text_path(path: str | Path, what: str) -> Path:
    """A path as given if it exists, else relative to the project's texts/ folder."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    shipped = texts_dir() / str(path)
    if shipped.is_file():
        return shipped
    raise TextFileError(f"{what} {path!r} not found (neither as a path nor under {texts_dir()})")


def _vocabulary(classes: ClassesInput) -> ClassVocabulary:
    if isinstance(classes, ClassVocabulary):
        return classes
    if isinstance(classes, Path) or (isinstance(classes, str) and Path(classes).suffix == ".txt"):
        return read_class_file(resolve_text_path(classes, "class-name file"))
    return parse_class_list(classes)


class Segmentor:
    """Training-free open-vocabulary segmentation with a CLIP model and a `SegmentorConfig`."""

    def __init__(
        self,
        model: CLIP,
        config: SegmentorConfig | str = "open_vocab",
        classes: ClassesInput | None = None,
        cache_dir: str | Path | None | bool = True,
        progress: bool = False,
        keep: Sequence[str] = (),
    ) -> None:
        """
        Args:
            model: a CLIP from `load_clip` (its device and dtype are used).
            config: a `SegmentorConfig` or a preset name. Tuned on another backbone (`tuned_on`), its block
                numbers, crop and stride are fitted to the model's (`itaclip_core.backbones`).
            classes: the classes (a class file, `"cat, dog"`, a list, or lists of variants); default: the config's
                class file. Settable later with `set_classes`.
            cache_dir: where text embeddings are cached (True: the default cache; False/None: no cache).
            progress: show progress bars while encoding texts.
            keep: fields set explicitly (overrides), kept as given when fitting to the backbone.
        """
        self.model = model.eval()
        config = get_preset(config) if isinstance(config, str) else config
        self.backbone_fit = fit_to_backbone(config, model.config, keep=keep)
        self.config = self.backbone_fit.config
        self.cache_dir = default_cache_dir() if cache_dir is True else (cache_dir or None)
        self.progress = progress
        self.classifier: TextClassifier | None = None
        self.engine = DenseInference(
            model,
            self.config.dense_config(),
            crop=self.config.crop,
            stride=self.config.stride,
            image_engineering=self.config.image_engineering,
            img_eng_coef=self.config.img_eng_coef,
            batch_size=self.config.batch_size,
        )
        if classes is not None or self.config.classes is not None:
            self.set_classes(classes if classes is not None else self.config.classes)

    @classmethod
    def from_preset(
        cls,
        preset: str = "open_vocab",
        weights: str | Path = "ViT-B/16",
        device: str | torch.device | None = None,
        overrides: Sequence[str] | dict[str, Any] | None = None,
        classes: ClassesInput | None = None,
        dtype: torch.dtype | str | None = None,
        cache_dir: str | Path | None | bool = True,
        progress: bool = False,
    ) -> "Segmentor":
        """Load the weights and build a segmentor from a preset, with `key=value` overrides."""
        config = apply_overrides(get_preset(preset), overrides)
        parse_backbone(config.tuned_on)  # a wrong tuned_on fails before the weights are loaded
        model = load_clip(weights, device=device, dtype=dtype, progress=progress)
        return cls(model, config, classes=classes, cache_dir=cache_dir, progress=progress,
                   keep=override_keys(overrides))

    # ----------------------------------------------------------------------------------------------- classes
    @property
    def weights_id(self) -> str:
        return self.model.weights_id

    @property
    def class_names(self) -> list[str]:
        if self.classifier is None:
            raise RuntimeError("no classes are set: call set_classes(...) first")
        return self.classifier.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_classes(
        self,
        classes: ClassesInput,
        aux_file: str | Path | None | bool = True,
        aux_coef: float | None = None,
        background: bool | None = None,
    ) -> None:
        """Set the classes and build (or load from the cache) their text classifier.

        Args:
            classes: a class-name file, a comma-separated string (`|` between variants), a list of names or lists
                of variants.
            aux_file: definitions/synonyms file; True: the config's; False/None: none.
            aux_coef: weight of the auxiliary texts (default: the config's).
            background: class 0 is background (default: the config's).
        """
        vocab = _vocabulary(classes)
        background = self.config.background if background is None else background
        aux_path = self.config.aux_file if aux_file is True else (aux_file or None)
        aux_texts = None
        if aux_path is not None:
            resolved = resolve_text_path(aux_path, "auxiliary-text file")
            aux = read_aux_file(resolved)
            for message in check_aux_matches(aux, vocab, background, str(resolved), strict_names=False):
                warnings.warn(message + " (lines are matched to classes by position)", stacklevel=2)
            aux_texts = [text for _, text in aux]
        self.classifier = build_classifier(
            self.model,
            vocab,
            load_templates(self.config.templates),
            aux_texts=aux_texts,
            aux_coef=self.config.aux_coef if aux_coef is None else aux_coef,
            background=background,
            batch_size=self.config.text_batch_size,
            truncate=self.config.truncate_texts,
            cache_dir=self.cache_dir,
            progress=self.progress,
        ).to(self.model.device)

    # ----------------------------------------------------------------------------------------------- images
    def prepare(self, image: ImageInput, name: str | None = None) -> PreparedImage:
        """Decode and resize an image as the protocol does (short side `config.short_side`)."""
        return prepare_image(image, self.config.short_side, self.config.long_side, name=name)

    @torch.no_grad()
    def query_logits(self, prepared: PreparedImage) -> torch.Tensor:
        """Per-query similarities (Q, H0, W0) at the original size, after PAMR when enabled."""
        if self.classifier is None:
            raise RuntimeError("no classes are set: call set_classes(...) first")
        image = prepared.tensor.to(self.model.device, torch.float32)
        logits = self.engine.logits(image, self.classifier.features, prepared.original_size)
        if self.config.pamr_steps > 0:
            guide = F.interpolate(image[None], size=prepared.original_size, mode="bilinear")  # (1, 3, H0, W0)
            logits = pamr(guide, logits[None], self.config.pamr_steps, self.config.pamr_dilations)[0]
        return logits

    @torch.no_grad()
    def predict_prepared(self, prepared: PreparedImage) -> Prediction:
        """Segment an already prepared image."""
        logits = self.query_logits(prepared)
        result = postprocess(
            logits,
            self.classifier.query_to_class,
            self.config.logit_scale,
            prob_thd=self.config.prob_thd,
            area_thd=self.config.area_thd,
            closing=self.config.closing,
            num_classes=self.classifier.num_classes,
        )
        return Prediction(
            labels=result.labels.cpu().numpy().astype(np.int64),
            probs=result.probs.cpu().numpy(),
            class_names=list(self.classifier.class_names),
            name=prepared.name,
        )

    def predict(self, image: ImageInput, name: str | None = None) -> Prediction:
        """Segment an image given as a path, a PIL image or an RGB array."""
        return self.predict_prepared(self.prepare(image, name=name))
