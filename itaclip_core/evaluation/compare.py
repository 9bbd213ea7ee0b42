"""Several configurations evaluated on one benchmark, each resumably, sharing the model and the text embeddings.

A comparison directory holds:

- `compare.json`: the plan (configurations, dataset, data root, weights, number of samples);
- `configs/<name>/`: one record folder of the benchmark runner per configuration (`run.json`, `records/`,
  `results.json`, `preds/` with every predicted label map), so an interrupted comparison continues where it stopped
  and a configuration already evaluated is not run again;
- the report (`results.md`, `results.json`, `figures/`), written by `itaclip_core.evaluation.comparison_report`.

Everything a bad argument can break (an unknown preset or setting, presets of different datasets, a dataset root
that does not hold the benchmark, an unknown focus class, a record folder of other settings) is checked by
`plan_comparison` before any model is loaded or image evaluated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from itaclip_core.errors import UserError
from itaclip_core.data.base import DatasetError, SegDataset
from itaclip_core.evaluation.distributed import DistContext
from itaclip_core.evaluation.records import MANIFEST_KEYS, MANIFEST_NAME, atomic_write_text

PLAN_NAME = "compare.json"
CONFIGS_DIR = "configs"
PREDS_DIR = "preds"


class CompareError(UserError, ValueError):
    """A comparison cannot be run as asked (the message names the argument and the fix)."""


@dataclass(frozen=True)
class Configuration:
    """One row of a comparison: a named preset with `key=value` changes."""

    name: str  # shown in the report; also names the record folder
    preset: str  # preset name
    overrides: tuple[str, ...] = ()  # `key=value` settings changed from the preset, applied in order

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "overrides": list(self.overrides)}


@dataclass
class ComparePlan:
    """A checked comparison: what to evaluate, on what, into where."""

    configurations: list[Configuration]
    dataset: SegDataset
    out_dir: Path
    weights: str  # weights spec (model name, checkpoint path or random spec)
    num_samples: int | None = None  # evaluate only the first N images
    focus: str | None = None  # the focus class (a class name of the dataset), if any
    configs: dict[str, Any] = field(default_factory=dict)  # configuration name -> its SegmentorConfig (or factory's)

    @property
    def num_images(self) -> int:
        total = len(self.dataset)
        return total if self.num_samples is None else min(self.num_samples, total)

    def folder(self, configuration: Configuration) -> Path:
        """The record folder of a configuration."""
        return self.out_dir / CONFIGS_DIR / folder_name(configuration.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "configurations": [c.to_dict() for c in self.configurations],
            "dataset": self.dataset.name,
            "data_root": str(self.dataset.root),
            "weights": self.weights,
            "num_samples": self.num_samples,
            "num_images": self.num_images,
            "focus": self.focus,
        }


def folder_name(name: str) -> str:
    """A configuration name as a folder name (letters, digits, `.`, `_`, `-`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "config"


# ------------------------------------------------------------------------------------------------ configurations
def _override_strings(raw: Any, where: str) -> tuple[str, ...]:
    """Overrides given as a list of `key=value` strings or as a mapping, as `key=value` strings."""
    if raw is None:
        return ()
    if isinstance(raw, Mapping):
        items = []
        for key, value in raw.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            elif value is None:
                value = "none"
            elif isinstance(value, bool):
                value = "true" if value else "false"
            items.append(f"{key}={value}")
        return tuple(items)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise CompareError(f"{where}: overrides must be a list of key=value strings or a mapping, got {raw!r}")
    for item in raw:
        if not isinstance(item, str) or "=" not in item:
            raise CompareError(f"{where}: override {item!r} is not key=value")
    return tuple(raw)


def configurations_from_presets(presets: str | Sequence[str]) -> list[Configuration]:
    """One configuration per preset of a comma-separated list (or a list), named after the preset."""
    names = [p.strip() for p in presets.split(",")] if isinstance(presets, str) else [str(p).strip() for p in presets]
    names = [n for n in names if n]
    if not names:
        raise CompareError("--presets names no preset: give a comma-separated list such as itaclip_voc21,sclip_voc21")
    return [Configuration(name, name) for name in names]


def read_configurations(path: str | Path) -> list[Configuration]:
    """The configurations of a YAML or JSON file.

    The file holds a list (or a mapping with a `configurations` list) of entries with `preset` and optionally
    `name` (default: the preset) and `overrides` (a list of `key=value` strings, or a mapping of settings).
    """
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"--configs {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # a syntax error of either format
        raise CompareError(f"--configs {path}: cannot be read as {path.suffix.lstrip('.') or 'YAML'} ({error})")
    if isinstance(data, Mapping):
        data = data.get("configurations")
    if not isinstance(data, list) or not data:
        raise CompareError(f"--configs {path}: expected a non-empty list of {{name, preset, overrides}} entries "
                           "(or a mapping with a 'configurations' list)")  # fmt: skip
    configurations = []
    for number, entry in enumerate(data, 1):
        where = f"--configs {path}, entry {number}"
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, Mapping) or not entry.get("preset"):
            raise CompareError(f"{where}: each entry needs a 'preset' (and optionally 'name' and 'overrides')")
        unknown = set(entry) - {"name", "preset", "overrides"}
        if unknown:
            raise CompareError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: name, preset, "
                               "overrides")  # fmt: skip
        preset = str(entry["preset"])
        configurations.append(Configuration(str(entry.get("name") or preset), preset,
                                            _override_strings(entry.get("overrides"), where)))  # fmt: skip
    return configurations


def with_common_overrides(configurations: Iterable[Configuration], overrides: Sequence[str],
                          refine: str | None = None) -> list[Configuration]:  # fmt: skip
    """Every configuration with the command line's `--set` items (and `--refine`) before its own.

    `--refine a,b,...` names refinements of either kind, in order: the feature refinements (`selfcorr`, `regional`,
    `sfr`) become `refine=...`, the logit refinements (`crf`, `guided`, `pamr`) `logit_refine=...`, where PAMR
    stays first unless it is named (it runs only where the preset sets `pamr_steps`)."""
    common = list(overrides)
    for item in common:
        if "=" not in item:
            raise CompareError(f"--set takes key=value, got {item!r}")
    if refine is not None:
        from itaclip_core.presets import field_names

        if "refine" not in field_names():
            raise CompareError(
                f"--refine {refine}: this installation's settings have no 'refine' field (the feature refinements "
                f"of the method zoo are not installed); known settings: {', '.join(field_names())}"
            )
        common.extend(_refine_overrides(refine))
    return [Configuration(c.name, c.preset, tuple(common) + c.overrides) for c in configurations]


def _refine_overrides(refine: str) -> list[str]:
    """`--refine a,b` as `refine=` / `logit_refine=` settings (see `with_common_overrides`)."""
    names = [name.strip() for name in refine.split(",") if name.strip()]
    try:
        from itaclip_core.refinement.features import REFINEMENTS
        from itaclip_core.refinement.logits import LOGIT_REFINEMENTS
    except ImportError:  # an installation without the refinement registries: every name is a feature refinement
        return [f"refine={','.join(names)}"]
    unknown = [name for name in names if name not in REFINEMENTS and name not in LOGIT_REFINEMENTS]
    if unknown:
        raise CompareError(f"--refine {refine}: unknown refinement(s) {', '.join(unknown)}; feature refinements: "
                           f"{', '.join(REFINEMENTS)}; logit refinements: {', '.join(LOGIT_REFINEMENTS)}")
    features = [name for name in names if name in REFINEMENTS]
    logits = [name for name in names if name in LOGIT_REFINEMENTS]
    result = [f"refine={','.join(features)}"] if features else []
    if logits:
        result.append(f"logit_refine={','.join(logits if 'pamr' in logits else ['pamr', *logits])}")
    return result


# ------------------------------------------------------------------------------------------------ planning
def _planned_config(configuration: Configuration) -> Any:
    from itaclip_core.presets import PRESETS, apply_overrides

    if configuration.preset not in PRESETS:
        raise CompareError(f"configuration {configuration.name!r}: unknown preset {configuration.preset!r}; "
                           f"available: {', '.join(PRESETS)}")  # fmt: skip
    try:
        return apply_overrides(PRESETS[configuration.preset], list(configuration.overrides))
    except ValueError as error:
        raise CompareError(f"configuration {configuration.name!r}: {error}") from None


def manifest_for(plan: ComparePlan, configuration: Configuration, weights_id: str) -> dict[str, Any]:
    """The runner's `run.json` keys of a configuration (see `records.MANIFEST_KEYS`)."""
    return {
        "preset": configuration.preset,
        "overrides": list(configuration.overrides),
        "weights_id": weights_id,
        "dataset": plan.dataset.name,
        "num_samples": plan.num_samples,
        "num_images": plan.num_images,
        "num_classes": plan.dataset.num_classes,
    }


def folder_state(folder: Path, manifest: Mapping[str, Any]) -> str:
    """"new", "partial" or "finished" for a configuration's record folder.

    Raises:
        CompareError: the folder holds an evaluation with other settings.
    """
    run_file = folder / MANIFEST_NAME
    if not run_file.is_file():
        return "new"
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CompareError(f"{run_file} is not valid JSON ({error}); delete {folder} or use another --out") from None
    differences = [f"{key}: {previous.get(key)!r} there, {manifest.get(key)!r} now" for key in MANIFEST_KEYS
                   if previous.get(key) != manifest.get(key)]  # fmt: skip
    if differences:
        raise CompareError(
            f"{folder} holds an evaluation with different settings ({'; '.join(differences)}): give this "
            "configuration another name, use another --out, or delete that folder"
        )
    results_file = folder / "results.json"
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
        except ValueError:
            return "partial"
        if results.get("num_images") == manifest["num_images"] and results.get("weights_id") == manifest["weights_id"]:
            return "finished"
    return "partial"


def plan_comparison(
    configurations: Sequence[Configuration],
    data_root: str | Path,
    out_dir: str | Path,
    weights: str = "ViT-B/16",
    num_samples: int | None = None,
    focus: str | None = None,
    configs: Mapping[str, Any] | None = None,
) -> ComparePlan:
    """Check a comparison before any work: presets and settings, one dataset, its root, the focus class.

    Args:
        configurations: what to compare (names must be unique).
        data_root: the benchmark's root folder.
        out_dir: the comparison directory.
        weights: the weights spec every configuration uses.
        num_samples: evaluate only the first N images.
        focus: a class name of the benchmark (matched case-insensitively) for the focus analysis.
        configs: the settings of each configuration when they do not come from the presets (a segmentor factory's
            `config`, which has `dataset`); None: from `itaclip_core.presets`.

    Raises:
        CompareError: anything that would make the comparison fail or be meaningless; the message names it.
    """
    from itaclip_core.data.registry import get_dataset

    if not configurations:
        raise CompareError("nothing to compare: give --presets a,b or --configs FILE")
    if num_samples is not None and num_samples < 1:
        raise CompareError(f"--num-samples must be at least 1, got {num_samples}")
    names = [c.name for c in configurations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompareError(f"configuration name(s) {', '.join(duplicates)} given twice: names must be unique "
                           "(in a --configs file, give each entry its own 'name')")  # fmt: skip
    folders = [folder_name(n) for n in names]
    clashing = sorted({n for n, f in zip(names, folders) if folders.count(f) > 1})
    if clashing:
        raise CompareError(f"configuration names {', '.join(clashing)} give the same folder name; rename them")
    settings = dict(configs) if configs is not None else {c.name: _planned_config(c) for c in configurations}
    datasets = {c.name: getattr(settings[c.name], "dataset", None) for c in configurations}
    untied = [name for name, dataset in datasets.items() if not dataset]
    if untied:
        raise CompareError(f"configuration(s) {', '.join(untied)} are not tied to a benchmark (no dataset): compare "
                           "benchmark presets such as itaclip_voc21 or sclip_voc21")  # fmt: skip
    if len(set(datasets.values())) > 1:
        listing = ", ".join(f"{name} -> {dataset}" for name, dataset in datasets.items())
        raise CompareError(f"the configurations are made for different datasets ({listing}); a comparison is on one "
                           "benchmark: choose presets of the same dataset (e.g. itaclip_voc21,sclip_voc21)")  # fmt: skip
    dataset_name = next(iter(datasets.values()))
    try:
        dataset = get_dataset(dataset_name, data_root)
    except DatasetError as error:
        raise CompareError(f"--data-root {data_root} does not hold the {dataset_name} benchmark the configurations "
                           f"are made for: {error}") from None  # fmt: skip
    if len(dataset) == 0:
        raise CompareError(f"--data-root {data_root}: the {dataset_name} benchmark there has no images")
    resolved_focus = None
    if focus is not None:
        resolved_focus = resolve_class(focus, dataset.class_names, f"--focus {focus}")
    return ComparePlan(list(configurations), dataset, Path(out_dir), str(weights), num_samples, resolved_focus,
                       settings)  # fmt: skip


def resolve_class(name: str, class_names: Sequence[str], what: str) -> str:
    """The class of `class_names` called `name` (exact, else case-insensitive); CompareError naming all if none."""
    if name in class_names:
        return name
    folded = [c for c in class_names if c.lower() == name.strip().lower()]
    if folded:
        return folded[0]
    raise CompareError(f"{what}: no class of that name; the classes are: {', '.join(class_names)}")


# ------------------------------------------------------------------------------------------------ running
class SharedResources:
    """What configurations share: one loaded model per weights, one text classifier per text settings.

    Text classifiers are keyed by the model and everything the text side depends on (class file, templates,
    auxiliary file and weight, background, truncation); each is built once (and its texts come from the disk
    cache when encoded before) and handed to every configuration with the same key.
    """

    def __init__(self, device: str | None = None, cache_dir: str | Path | None | bool = True,
                 progress: bool = False) -> None:  # fmt: skip
        self.device = device
        self.cache_dir = cache_dir
        self.progress = progress
        self.models: dict[str, Any] = {}
        self.classifiers: dict[tuple, Any] = {}
        self.classifiers_built = 0

    def model(self, weights: str) -> Any:
        """The CLIP of `weights`, loaded on first use."""
        if weights not in self.models:
            from itaclip_core.model.weights import load_clip

            self.models[weights] = load_clip(weights, device=self.device, progress=self.progress)
        return self.models[weights]

    @staticmethod
    def text_key(model: Any, config: Any) -> tuple:
        return (id(model), config.classes, config.templates, config.aux_file, float(config.aux_coef),
                bool(config.background), bool(config.truncate_texts))  # fmt: skip

    def segmentor(self, weights: str, config: Any) -> Any:
        """A `Segmentor` for `config` on the shared model, with the shared text classifier of its text settings."""
        from itaclip_core.segmentor import Segmentor

        model = self.model(weights)
        key = self.text_key(model, config)
        shared = self.classifiers.get(key)
        if shared is None:
            segmentor = Segmentor(model, config, cache_dir=self.cache_dir, progress=self.progress)
            self.classifiers[key] = segmentor.classifier
            self.classifiers_built += 1
            return segmentor
        # The class list only feeds the text classifier, which is taken from the pool instead of being rebuilt.
        segmentor = Segmentor(model, config.replace(classes=None), cache_dir=self.cache_dir, progress=self.progress)
        segmentor.config = config
        segmentor.classifier = shared
        return segmentor


def write_plan(plan: ComparePlan) -> Path:
    """Write `compare.json` (the report reads the comparison from it)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    path = plan.out_dir / PLAN_NAME
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    return path


def run_comparison(
    plan: ComparePlan,
    build: Callable[[Configuration], Any] | None = None,
    resources: SharedResources | None = None,
    context: DistContext | None = None,
    workers: int = 2,
    save_preds: bool = True,
    progress: bool = True,
    weights_id: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate every configuration of `plan` into its record folder, resuming and skipping finished ones.

    Args:
        plan: from `plan_comparison`.
        build: makes the segmentor of a configuration (None: `resources.segmentor` with the plan's weights).
        resources: the shared model and text classifiers (default: new ones on the context's device).
        context: the process's place under torchrun.
        workers: image-loading worker processes.
        save_preds: save every predicted label map under `configs/<name>/preds/` (the report's gallery uses them).
        progress: progress bars (main process only).
        weights_id: identity of the weights for the resume checks when `build` is given (default: taken from the
            first built segmentor).

    Returns:
        Configuration name -> its results (the runner's results.json).

    Raises:
        CompareError: a record folder holds an evaluation with other settings (checked for every configuration
            before the first is evaluated).
    """
    from itaclip_core.evaluation.runner import EvalOptions, evaluate

    context = context or DistContext()
    resources = resources or SharedResources(device=context.device, progress=progress and context.is_main)
    if build is None:
        weights_id = str(resources.model(plan.weights).weights_id)

        def build(configuration: Configuration) -> Any:
            return resources.segmentor(plan.weights, plan.configs[configuration.name])

    built: dict[str, Any] = {}
    if weights_id is None:
        first = plan.configurations[0]
        built[first.name] = build(first)
        weights_id = str(built[first.name].weights_id)
    states = {}
    for configuration in plan.configurations:  # every folder is checked before any evaluation
        manifest = manifest_for(plan, configuration, weights_id)
        states[configuration.name] = folder_state(plan.folder(configuration), manifest)
    states = context.broadcast_from_main(states)
    if context.is_main:
        write_plan(plan)
    context.barrier()
    results: dict[str, dict[str, Any]] = {}
    for number, configuration in enumerate(plan.configurations, 1):
        folder = plan.folder(configuration)
        if states[configuration.name] == "finished":
            if context.is_main and progress:
                print(f"[{number}/{len(plan.configurations)}] {configuration.name}: already evaluated ({folder})")
            results[configuration.name] = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            continue
        segmentor = built.pop(configuration.name, None) or build(configuration)
        options = EvalOptions(out_dir=folder, preset=configuration.preset, weights_id=weights_id,
                              overrides=list(configuration.overrides), num_samples=plan.num_samples,
                              save_preds=folder / PREDS_DIR if save_preds else None, workers=workers,
                              progress=progress, label=configuration.name)  # fmt: skip
        if context.is_main and progress:
            print(f"[{number}/{len(plan.configurations)}] {configuration.name}: {configuration.preset} "
                  f"{' '.join(configuration.overrides)}".rstrip())  # fmt: skip
        results[configuration.name] = evaluate(segmentor, plan.dataset, options, context)
        del segmentor
    return results


def load_plan(out_dir: str | Path) -> dict[str, Any]:
    """The `compare.json` of a comparison directory."""
    path = Path(out_dir) / PLAN_NAME
    if not path.is_file():
        raise CompareError(f"{out_dir} holds no comparison ({PLAN_NAME} is missing): run `itaclip compare` first")
    return json.loads(path.read_text(encoding="utf-8"))
