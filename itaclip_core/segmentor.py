"""The stateful segmentor: classes are set once (their text classifier cached), then many images are predicted.

    from itaclip_core import Segmentor
    seg = Segmentor.from_preset("open_vocab", weights="ViT-B/16", classes="cat, dog, sky, grass")
    prediction = seg.predict("photo.jpg")       # labels (H, W), probs (K, H, W), class_names
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from itaclip_core.errors import ConfigError, UserError, short
from itaclip_core.inference.engine import DenseInference
from itaclip_core.methods import get_readout
from itaclip_core.inference.preprocess import ImageInput, PreparedImage, denormalise, prepare_image, to_bgr_uint8
from itaclip_core.masks.maskset import MaskSet
from itaclip_core.masks.readouts import readout_config
from itaclip_core.masks.stage import MaskStage, resize_masks
from itaclip_core.methods.cliptrase import check_protocol, denormalise_rgb, prepare_centre_crop
from itaclip_core.model.clip import CLIP
from itaclip_core.model.weights import default_cache_dir, load_clip
from itaclip_core.postprocess import postprocess
from itaclip_core.backbones import fit_to_backbone, parse_backbone
from itaclip_core.presets import SegmentorConfig, apply_overrides, get_preset, override_keys
from itaclip_core.refinement.features import build_refinements
from itaclip_core.refinement.logits import build_logit_refinements, refine_logits
from itaclip_core.resources import texts_dir
from itaclip_core.text.classes import (
    ClassVocabulary,
    TextFileError,
    check_aux_matches,
    parse_class_list,
    read_aux_file,
    read_class_file,
)
from itaclip_core.text.classifier import TextClassifier, build_classifier, check_prompt_lengths, load_templates
from itaclip_core.timing import timed
from itaclip_core.validation import check_against_model, find_text_file, user_classes_config, validate_config
from itaclip_core.upsamplers.window import build_upsampler

ClassesInput = str | Path | Sequence[str] | Sequence[Sequence[str]] | ClassVocabulary


class NoClassesError(UserError, RuntimeError):
    """A prediction was asked of a segmentor without classes."""


@dataclass
class Prediction:
    """The segmentation of one image, at its original size."""

    labels: np.ndarray  # (H, W) int64 class ids
    probs: np.ndarray  # (K, H, W) float32 per-class scores: softmax over queries, max over a class's name variants
    # (so with variants they need not sum to 1 over classes), area threshold applied
    class_names: list[str]  # K display names (`background` for a background class)
    name: str = ""  # the image's name, when known
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB pixels the labels cover when not the input's (centre crop)
    masks: MaskSet | None = None  # the mask proposals used (mask modes), at the original size
    regions: np.ndarray | None = None  # (H, W) their partition (0 = uncovered, i + 1 = mask i on top)

    @property
    def height(self) -> int:
        return int(self.labels.shape[0])

    @property
    def width(self) -> int:
        return int(self.labels.shape[1])

    def areas(self) -> dict[str, float]:
        """Fraction of the image each class covers, for the classes present, largest first."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        total = max(int(self.labels.size), 1)
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[i]: float(counts[i]) / total for i in order if counts[i] > 0}

    def __repr__(self) -> str:
        top = ", ".join(f"{name} {share:.0%}" for name, share in list(self.areas().items())[:3])
        more = len(self.areas()) - 3
        named = f"{self.name!r}, " if self.name else ""
        return (f"Prediction({named}{self.height}x{self.width}, {len(self.class_names)} classes; "
                f"{top}{f' +{more} more' if more > 0 else ''})")  # fmt: skip


def resolve_text_path(path: str | Path, what: str) -> Path:
    """A path as given if it exists, else relative to the project's texts/ folder."""
    found = find_text_file(path)
    if found is not None:
        return found
    kind = "is a folder, not a file" if Path(path).expanduser().is_dir() else "not found"
    raise TextFileError(f"{what} {str(path)!r} {kind} (looked for it as a path and under {texts_dir()})")


_FILE_NAME = re.compile(r"^[^,|\s]+\.[A-Za-z0-9]{1,5}$|[/\\]")


def class_vocabulary(classes: ClassesInput, separator: str = ", ") -> ClassVocabulary:
    """The classes a class-name file, a `"cat, dog|puppy"` string or a list names (a string naming an existing
    file is read as one; one that looks like a missing file name is an error). `separator` splits a class
    file's lines into name variants (`SegmentorConfig.class_separator`)."""
    if isinstance(classes, ClassVocabulary):
        return classes
    if isinstance(classes, Path):
        return read_class_file(resolve_text_path(classes, "class-name file"), separator)
    if isinstance(classes, str):
        if find_text_file(classes) is not None:
            return read_class_file(resolve_text_path(classes, "class-name file"), separator)
        if "," not in classes and "|" not in classes and _FILE_NAME.search(classes.strip()):
            raise TextFileError(
                f"classes={short(classes)!r} looks like a file name but no such file exists; give an existing "
                f"class-name file, or a list such as [{short(classes)!r}] for one class of that name",
                cli=f"--classes-file {short(classes)}: no such file",
            )
        return parse_class_list(classes)
    if isinstance(classes, (list, tuple)):
        return parse_class_list(classes)
    raise TextFileError(
        f"classes of type {type(classes).__name__} are not understood: give a class-name file, a string "
        '"cat, dog|puppy", a list of names, or a list of name variants per class'
    )


@dataclass(frozen=True)
class ClassPlan:
    """Everything the text classifier of a class choice needs, read and checked before any model is loaded."""

    config: SegmentorConfig  # the settings in effect (a benchmark preset's own-classes form when that applies)
    vocab: ClassVocabulary
    background: bool
    aux_texts: list[str] | None
    aux_coef: float
    templates: list[str]
    notes: tuple[str, ...] = ()  # what the caller should be told (changed settings, aux lines named differently)


def plan_classes(
    config: SegmentorConfig,
    classes: ClassesInput | None = None,
    aux_file: str | Path | None | bool = True,
    aux_coef: float | None = None,
    background: bool | None = None,
    context_length: int = 77,
) -> ClassPlan:
    """Read and check a class choice, its auxiliary texts and the templates, without a model.

    Classes other than a benchmark preset's own class file keep the preset's architecture but not its background
    class, auxiliary file and thresholds (`user_classes_config`); the plan's notes say so.

    Raises:
        TextFileError, TokenizerError, ConfigError: naming the file, the class or the setting.
    """
    classes = config.classes if classes is None else classes
    if classes is None:
        raise TextFileError("no classes: give classes=... (a class-name file, \"cat, dog\" or a list)")
    notes: list[str] = []
    own = isinstance(classes, (str, Path)) and config.classes is not None and str(classes) == str(config.classes)
    if not own and config.classes is not None and aux_file is True and background is None:
        config, note = user_classes_config(config)
        if note:
            notes.append(note)
    vocab = class_vocabulary(classes, config.class_separator)
    background = config.background if background is None else background
    aux_path = config.aux_file if aux_file is True else (aux_file or None)
    aux_texts = None
    if aux_path is not None:
        resolved = resolve_text_path(aux_path, "auxiliary-text file")
        aux = read_aux_file(resolved)
        for message in check_aux_matches(aux, vocab, background, str(resolved), strict_names=False):
            notes.append(message + " (lines are matched to classes by position)")
        aux_texts = [text for _, text in aux]
    templates = load_templates(config.templates)
    if not config.truncate_texts:
        check_prompt_lengths(vocab.queries + (aux_texts or []), templates, context_length)
    coef = config.aux_coef if aux_coef is None else aux_coef
    return ClassPlan(config, vocab, background, aux_texts, coef, templates, tuple(notes))


def _warn(note: str) -> None:
    warnings.warn(note, UserWarning, stacklevel=3)


class Segmentor:
    """Training-free open-vocabulary segmentation with a CLIP model and a `SegmentorConfig`."""

    def __init__(
        self,
        model: CLIP,
        config: SegmentorConfig | str = "open_vocab",
        classes: ClassesInput | ClassPlan | None = None,
        cache_dir: str | Path | None | bool = True,
        progress: bool = False,
        notes: Callable[[str], None] | None = None,
        masks: str | None = None,
        keep: Sequence[str] = (),
    ) -> None:
        """
        Args:
            model: a CLIP from `load_clip` (its device and dtype are used).
            config: a `SegmentorConfig` or a preset name. Tuned on another backbone (`tuned_on`), its block
                numbers, crop and stride are fitted to the model's (`itaclip_core.backbones`).
            classes: the classes (a class file, `"cat, dog"`, a list, or lists of variants); default: the config's
                class file. Settable later with `set_classes`. Other classes than a benchmark preset's own keep
                its architecture without its background class, auxiliary texts and thresholds (with a warning).
            cache_dir: where text embeddings (and generated masks) are cached (True: the default cache; False/None:
                no cache).
            progress: show progress bars while encoding texts and predicting several images.
            notes: called with each note about changed settings (default: a `UserWarning`).
            masks: a mask source (`superpixels`, `sam`, `sam2` or a folder) overriding the config's `masks`.
            keep: fields set explicitly (overrides), kept as given when the settings are fitted to the backbone.

        Raises:
            ConfigError: a setting is out of range or does not fit the model (checked before texts are encoded).
        """
        self.model = model.eval()
        config = validate_config(get_preset(config) if isinstance(config, str) else config)
        self._keep = tuple(keep)
        self.backbone_fit = fit_to_backbone(config, model.config, keep=keep)  # block numbers, crop, stride
        self.config = self.backbone_fit.config
        check_against_model(self.config, model)
        self.notes = notes or _warn
        if masks is not None:
            self.config = validate_config(self.config.replace(masks=str(masks)))
        check_protocol(self.config)
        self.cache_dir = default_cache_dir() if cache_dir is True else (cache_dir or None)
        self.progress = progress
        self.classifier: TextClassifier | None = None
        self.logit_refinements = build_logit_refinements(self.config)
        self.engine = DenseInference(
            model,
            self.config.dense_config(),
            crop=self.config.crop,
            stride=self.config.stride,
            image_engineering=self.config.image_engineering,
            img_eng_coef=self.config.img_eng_coef,
            batch_size=self.config.batch_size,
            readout=get_readout(readout_config(self.config)),
            refinements=build_refinements(self.config),
            upsampler=build_upsampler(self.config, model),
        )
        self.mask_stage = MaskStage(self.config, self.cache_dir, device=model.device, progress=progress)
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
        notes: Callable[[str], None] | None = None,
        masks: str | None = None,
    ) -> "Segmentor":
        """Load the weights and build a segmentor from a preset, with `key=value` overrides (`masks`: a mask
        source overriding the preset's).

        Everything that can be checked without the model (settings and their ranges, the device, the weights
        argument, the class, auxiliary and template files, prompt lengths) is checked before the weights load.
        With classes other than a benchmark preset's own, the preset's architecture is used without its background
        class, auxiliary texts and thresholds, and `notes` (default: a warning) says so.
        """
        config = get_preset(preset)
        if classes is not None:
            config, note = user_classes_config(config)
            if note:
                (notes or _warn)(note)
        config = apply_overrides(config, overrides)
        if masks is not None:
            config = config.replace(masks=str(masks))
        return cls.from_config(config, weights=weights, device=device, classes=classes, dtype=dtype,
                               cache_dir=cache_dir, progress=progress, notes=notes,
                               keep=override_keys(overrides))  # fmt: skip

    @classmethod
    def from_config(
        cls,
        config: SegmentorConfig,
        weights: str | Path = "ViT-B/16",
        device: str | torch.device | None = None,
        classes: ClassesInput | None = None,
        dtype: torch.dtype | str | None = None,
        cache_dir: str | Path | None | bool = True,
        progress: bool = False,
        notes: Callable[[str], None] | None = None,
        keep: Sequence[str] = (),
    ) -> "Segmentor":
        """`from_preset` with a ready `SegmentorConfig`: checks first, then loads the weights and encodes texts.
        `keep`: the fields set explicitly, kept as given when the settings are fitted to another backbone."""
        from itaclip_core.model.weights import check_weights_spec, resolve_device
        from itaclip_core.validation import resolve_dtype

        validate_config(config)
        parse_backbone(config.tuned_on)  # a wrong tuned_on fails before the weights are loaded
        MaskStage(config, None)  # the mask settings are checked before the weights are loaded
        resolve_device(device)
        resolve_dtype(dtype)
        check_weights_spec(weights)
        plan = None
        if classes is not None or config.classes is not None:
            plan = plan_classes(config, classes)
            for note in plan.notes:
                (notes or _warn)(note)
            plan = dataclasses.replace(plan, notes=())
        model = load_clip(weights, device=device, dtype=dtype, progress=progress)
        return cls(model, plan.config if plan else config, classes=plan, cache_dir=cache_dir, progress=progress,
                   notes=notes, keep=keep)  # fmt: skip

    # ----------------------------------------------------------------------------------------------- classes
    @property
    def weights_id(self) -> str:
        return self.model.weights_id

    @property
    def class_names(self) -> list[str]:
        if self.classifier is None:
            raise NoClassesError("no classes are set: give classes= to the Segmentor or call set_classes(...) first")
        return self.classifier.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_classes(
        self,
        classes: ClassesInput | ClassPlan,
        aux_file: str | Path | None | bool = True,
        aux_coef: float | None = None,
        background: bool | None = None,
    ) -> None:
        """Set the classes and build (or load from the cache) their text classifier.

        Args:
            classes: a class-name file, a comma-separated string (`|` between variants), a list of names or lists
                of variants (or a `plan_classes` result). Other classes than a benchmark preset's own switch the
                settings to the preset's architecture without its background class, auxiliary texts and
                thresholds, with a note.
            aux_file: definitions/synonyms file; True: the config's; False/None: none.
            aux_coef: weight of the auxiliary texts (default: the config's).
            background: class 0 is background (default: the config's).
        """
        if isinstance(classes, ClassPlan):
            plan = classes
        else:
            plan = plan_classes(self.config, classes, aux_file, aux_coef, background, self.model.context_length)
        for note in plan.notes:
            self.notes(note)
        # the plan's settings (own classes) fitted to this backbone like the rest (a no-op when already fitted)
        self.config = fit_to_backbone(plan.config, self.model.config, keep=self._keep, warn=False).config
        self.classifier = build_classifier(
            self.model,
            plan.vocab,
            plan.templates,
            aux_texts=plan.aux_texts,
            aux_coef=plan.aux_coef,
            background=plan.background,
            batch_size=self.config.text_batch_size,
            truncate=self.config.truncate_texts,
            cache_dir=self.cache_dir,
            progress=self.progress,
        ).to(self.model.device)

    # ----------------------------------------------------------------------------------------------- images
    @timed("decode and resize")
    def prepare(self, image: ImageInput, name: str | None = None) -> PreparedImage:
        """Decode and resize an image as the protocol does (short side `config.short_side`; with
        `protocol=centre_crop`, CLIPtrase's n x n centre crop, n = `config.crop`)."""
        if self.config.protocol == "centre_crop":
            return prepare_centre_crop(image, self.config.crop, name=name)
        return prepare_image(image, self.config.short_side, self.config.long_side, name=name)

    @torch.no_grad()
    def query_logits(self, prepared: PreparedImage, regions: np.ndarray | None = None) -> torch.Tensor:
        """Per-query similarities (Q, H0, W0) at the original size, after the logit refinements (`logit_refine`).
        `regions`: the masks' region map at the original size, for readouts that use masks (mask attention)."""
        if self.classifier is None:
            raise NoClassesError("no classes are set: give classes= to the Segmentor or call set_classes(...) first")
        image = prepared.tensor.to(self.model.device, torch.float32)
        side = None
        if regions is not None and self.mask_stage.scopes_attention:
            side = self.mask_stage.regions_at(regions, tuple(image.shape[-2:])).to(self.model.device)
        logits = self.engine.logits(image, self.classifier.features, prepared.original_size, side=side)
        return self._refine(image, logits, prepared)

    @timed("logit refinement")
    def _refine(self, image: torch.Tensor, logits: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """The logit refinements (`logit_refine`: PAMR, DenseCRF, guided filtering) at the original size."""
        return refine_logits(logits, self.logit_refinements, image, prepared.original_size, self.config.logit_scale)

    def image_masks(self, prepared: PreparedImage, masks: Any = None) -> MaskSet | None:
        """The masks of a prepared image at its original size: `masks` as given (checked), else the configured
        source's. Without the original pixels the source sees the protocol-resized image, and its masks are
        nearest-resized to the original size."""
        if masks is not None:
            return self.mask_stage.resolve(masks, prepared.original_size)
        source = self.mask_stage.source
        if source is None:
            return None
        if not source.needs_pixels:  # read by name (a folder), checked against the original size
            return source.load(prepared.name or None, prepared.original_size)
        generated = self.mask_stage.generate(denormalise(prepared.tensor), prepared.name or None)
        return resize_masks(generated, prepared.original_size)

    @torch.no_grad()
    def predict_prepared(self, prepared: PreparedImage, masks: Any = None) -> Prediction:
        """Segment an already prepared image; `masks` (a MaskSet, boolean (K, H, W), label map or SAM's mask
        dicts, at the original size) replace the configured mask source's."""
        mask_set = self.image_masks(prepared, masks)
        regions = self.mask_stage.regions(mask_set) if mask_set is not None else None
        return self._labels(self.query_logits(prepared, regions), prepared, mask_set, regions)

    def _finish(self, prepared: PreparedImage, image: torch.Tensor, logits: torch.Tensor) -> Prediction:
        return self._labels(self._refine(image, logits, prepared), prepared)

    @timed("labels")
    def _labels(self, logits: torch.Tensor, prepared: PreparedImage, mask_set: MaskSet | None = None,
                regions: np.ndarray | None = None) -> Prediction:
        result = postprocess(
            logits,
            self.classifier.query_to_class,
            self.config.logit_scale,
            prob_thd=self.config.prob_thd,
            area_thd=self.config.area_thd,
            closing=self.config.closing,
            num_classes=self.classifier.num_classes,
        )
        probs = result.probs
        if self.config.renormalize:  # after the thresholds, as NACLIP and ResCLIP do: only the probabilities change
            probs = probs / probs.sum(dim=0, keepdim=True)
        # A readout may revise the label map with what it saw per window (CLIPtrase's cluster vote).
        windows = self.engine.windows(*prepared.tensor.shape[-2:])
        labels = self.engine.readout.revise_labels(result.labels, windows, tuple(prepared.tensor.shape[-2:]))
        labels = labels.cpu().numpy().astype(np.int64)
        if regions is not None and self.mask_stage.votes:  # the mask vote comes last, on the final labels
            labels = self.mask_stage.vote(labels, regions, probs, logits, self.classifier.query_to_class)
        return Prediction(
            labels=labels,
            probs=probs.cpu().numpy(),
            class_names=list(self.classifier.class_names),
            name=prepared.name,
            image=denormalise_rgb(prepared.tensor) if self.config.protocol == "centre_crop" else None,
            masks=mask_set,
            regions=regions,
        )

    def predict(self, image: ImageInput | Sequence[ImageInput], name: str | None = None, masks: Any = None) -> Any:
        """Segment an image given as a path, a PIL image, an RGB array or a torch tensor ((3, H, W) as
        torchvision uses, uint8 or floats in [0, 1]). A list of images gives a list of predictions
        (`predict_many`).

        `masks`: the image's own mask proposals (a boolean (K, H, W) array, a label map with 0 = uncovered, or the
        list of dicts of SAM's / SAM 2's automatic mask generators), used instead of the configured source."""
        if isinstance(image, (list, tuple)):
            if masks is not None:
                raise ConfigError("masks= goes with one image: call predict(image, masks=...) for each image")
            return self.predict_many(image)
        if masks is None and self.mask_stage.source is not None and self.mask_stage.source.needs_pixels:
            if name is None and isinstance(image, (str, Path)):
                name = Path(image).name
            rgb = np.ascontiguousarray(to_bgr_uint8(image)[:, :, ::-1])
            masks = self.mask_stage.generate(rgb, name)  # from the original pixels
            return self.predict_prepared(self.prepare(rgb, name=name), masks=masks)
        return self.predict_prepared(self.prepare(image, name=name), masks=masks)

    def predict_many(
        self,
        images: Sequence[ImageInput],
        names: Sequence[str] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> list[Prediction]:
        """Segment several images; the windows of `batch_size` images share the image tower's forward passes.

        Args:
            images: paths, PIL images, RGB arrays or torch tensors.
            names: a name per image (default: the file names).
            batch_size: images whose windows are batched together (default 4).
            progress: show a progress bar (default: the segmentor's `progress`).
        """
        return list(self.iter_predictions(images, names, batch_size, progress, total=len(images)))

    def iter_predictions(
        self,
        images: Iterable[ImageInput],
        names: Iterable[str] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        total: int | None = None,
    ) -> Iterator[Prediction]:
        """`predict_many` as a generator: each prediction is yielded as soon as its batch is done, and images are
        read only when their batch starts."""
        if self.classifier is None:
            raise NoClassesError("no classes are set: give classes= to the Segmentor or call set_classes(...) first")
        batch_size = 4 if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer of at least 1",
                              cli=f"--batch-size {batch_size}: must be at least 1")  # fmt: skip
        named = iter(names) if names is not None else None
        show = self.progress if progress is None else progress
        with tqdm(total=total, desc="images", unit="img", disable=not show) as bar:
            batch: list[PreparedImage] = []
            for image in images:
                batch.append(self.prepare(image, name=next(named) if named is not None else None))
                if len(batch) == batch_size:
                    yield from self._predict_batch(batch, bar)
                    batch = []
            if batch:
                yield from self._predict_batch(batch, bar)

    @torch.no_grad()
    def _predict_batch(self, batch: list[PreparedImage], bar: Any) -> Iterator[Prediction]:
        if not self.engine.readout.shares_batches or self.mask_stage.source is not None:  # per-image state, masks
            for prepared in batch:
                yield self.predict_prepared(prepared)
                bar.update(1)
            return
        tensors = [p.tensor.to(self.model.device, torch.float32) for p in batch]
        all_logits = self.engine.logits_many(tensors, self.classifier.features, [p.original_size for p in batch])
        for prepared, image, logits in zip(batch, tensors, all_logits):
            yield self._finish(prepared, image, logits)
            bar.update(1)
