"""Settings per backbone: block numbers, crop and stride follow the image tower they run on.

A preset is tuned on one backbone (`SegmentorConfig.tuned_on`, `vit-b-16` for every published ITACLIP and SCLIP
preset). A ViT-L/14 has 24 blocks and 14-px patches: block 7 of 12 and a 224-px crop mean something else there.
When a segmentor runs a config on another backbone, `fit_to_backbone` takes, field by field,
1. the PUBLISHED setting of that method for that backbone, when there is one (`PUBLISHED`), else
2. the field's RULE (`FIELD_RULES`, and a method's own rules in `METHOD_RULES`), marked as not published, with a
   warning that names the fields, the values derived and how to override them.
Fields the user set explicitly (`--set`, `overrides=`) are kept as given.

Backbones are named by their geometry (`backbone_of`): `vit-b-16` (12 blocks, patch 16), `vit-b-32`, `vit-l-14`
(24 blocks, patch 14), `vit-h-14` (32, 14), `vit-g-14` (40, 14), `vit-bigg-14` (48, 14), `vit-l-16` (24, 16), with
`-336` etc. appended when the training resolution is not 224; other towers are `vit-<blocks>x<patch>`. The random
test models share the geometry of what they imitate (`random-tiny` is a `vit-b-16`, `random-tiny-l-14` a `vit-l-14`).

The rules (documented; none of them is a published setting):
- block numbers (`relative_block`, `relative_blocks`, `relative_block_range`): the same relative depth,
  b -> round(b * L_target / L_source), 1-based, kept before the last block; duplicates merged in order;
- block numbers that each mean something else (`relative_block_each`, e.g. SC-CLIP's `scclip_blocks`): each at
  the same relative depth, position by position, nothing merged;
- pixel sizes (`same_patches`): the same size in patches, px -> round(px * patch_target / patch_source), half up
  (crop 224 = 14 patches of 16 px -> 196 = 14 patches of 14 px; stride 28 -> 25, 112 -> 98); crop 0 (the whole
  image) stays 0.

The methods' own entries (registered next to their presets, `itaclip_core.methods.presets` and
`itaclip_core.methods.scclip_cliptrase_presets`): ResCLIP's RCS blocks (`fuse_blocks`), SC-CLIP's `scclip_blocks`
and its published ViT-L/14 setting. Blocks a method finds from the depth itself need no entry: NACLIP and ClearCLIP
use the last block only, CLIPtrase's correlation is block L-1's, the mask attention's spatial branch averages
blocks L-2-n .. L-3 (`itaclip_core.masks.attention.spatial_blocks`), ProxyCLIP replaces the last block.

How a method adds its entries (e.g. in its own module, next to its presets):

    from itaclip_core.backbones import (PUBLISHED, BackboneSetting, register_method_rules, relative_block,
                                         relative_block_range)
    register_method_rules("scclip", {"scclip_blocks": relative_block_each})
    register_published("scclip", "vit-l-14", {"scclip_blocks": (17, 7, 9, 19), "scclip_res_cls": 0.1, ...},
                       source="SuleBai/SC-CLIP configs/base_config.py, ViT-L/14 block; issue #5")

Field names are `SegmentorConfig` fields; a rule for a field the config does not have is skipped.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover - torch is imported only when a model is built (presets register rules here)
    from itaclip_core.model.clip import CLIPConfig


@dataclass(frozen=True)
class Backbone:
    """The geometry of an image tower that settings depend on."""

    key: str  # e.g. "vit-l-14", "vit-l-14-336", "vit-20x16"
    patch_size: int
    layers: int
    image_size: int = 224

    @property
    def base_key(self) -> str:
        """The key without the resolution suffix (`vit-l-14-336` -> `vit-l-14`)."""
        return re.sub(r"-\d+$", "", self.key) if self.image_size != 224 else self.key


# (patch size, blocks) -> name.
GEOMETRIES: dict[tuple[int, int], str] = {
    (16, 12): "vit-b-16",
    (32, 12): "vit-b-32",
    (14, 24): "vit-l-14",
    (16, 24): "vit-l-16",
    (14, 32): "vit-h-14",
    (14, 40): "vit-g-14",
    (14, 48): "vit-bigg-14",
}
_KEY = re.compile(r"^vit-(?:(?P<name>b|l|h|g|bigg)-(?P<patch>\d+)|(?P<layers>\d+)x(?P<gpatch>\d+))(?:-(?P<size>\d+))?$")


def backbone_of(config: CLIPConfig) -> Backbone:
    """The backbone (geometry) of a CLIP's image tower."""
    name = GEOMETRIES.get((config.patch_size, config.vision_layers))
    key = name or f"vit-{config.vision_layers}x{config.patch_size}"
    if config.image_size != 224:
        key = f"{key}-{config.image_size}"
    return Backbone(key, config.patch_size, config.vision_layers, config.image_size)


def parse_backbone(key: str) -> Backbone:
    """A backbone from its key (`vit-b-16`, `vit-l-14-336`, `vit-20x16`)."""
    match = _KEY.match(key.strip().lower())
    if match:
        size = int(match.group("size") or 224)
        if match.group("name"):
            patch = int(match.group("patch"))
            for (g_patch, layers), g_name in GEOMETRIES.items():
                if g_name == f"vit-{match.group('name')}-{patch}":
                    return Backbone(key.strip().lower(), g_patch, layers, size)
        else:
            return Backbone(key.strip().lower(), int(match.group("gpatch")), int(match.group("layers")), size)
    raise ValueError(
        f"tuned_on={key!r} is not a backbone: use one of {', '.join(GEOMETRIES.values())} (optionally -<resolution>, "
        "e.g. vit-l-14-336) or vit-<blocks>x<patch>"
    )


# ----------------------------------------------------------------------------------------------------- rules
Rule = Callable[[Any, Backbone, Backbone], Any]  # (value tuned on source, source, target) -> value for target


def _block(block: int, source: Backbone, target: Backbone) -> int:
    scaled = int(block * target.layers / source.layers + 0.5)
    return max(1, min(scaled, target.layers - 1))


def relative_block(value: int, source: Backbone, target: Backbone) -> int:
    """A 1-based block number at the same relative depth (kept before the last block)."""
    return _block(int(value), source, target)


def relative_blocks(value: Iterable[int], source: Backbone, target: Backbone) -> tuple[int, ...]:
    """Each 1-based block number at the same relative depth; duplicates merged, order kept."""
    out: list[int] = []
    for block in value:
        scaled = _block(int(block), source, target)
        if scaled not in out:
            out.append(scaled)
    return tuple(out)


def relative_block_each(value: Iterable[int], source: Backbone, target: Backbone) -> tuple[int, ...]:
    """Each 1-based block number at the same relative depth, position by position (nothing merged: the positions
    mean different things, e.g. SC-CLIP's (affinity block, post block, first, last))."""
    return tuple(_block(int(block), source, target) for block in value)


def relative_block_range(value: tuple[int, int], source: Backbone, target: Backbone) -> tuple[int, int]:
    """A (first, last) block range, both ends at the same relative depth."""
    first, last = value
    return _block(int(first), source, target), _block(int(last), source, target)


def same_patches(value: int, source: Backbone, target: Backbone) -> int:
    """A size in pixels that covers the same number of patches (rounded half up, at least one patch); 0 (a crop of
    the whole image) stays 0."""
    if int(value) == 0:
        return 0
    return max(target.patch_size, int(int(value) * target.patch_size / source.patch_size + 0.5))


RULE_DESCRIPTIONS: dict[Rule, str] = {
    relative_block: "same relative depth",
    relative_blocks: "same relative depth",
    relative_block_range: "same relative depth",
    relative_block_each: "same relative depth",
    same_patches: "same size in patches",
}

# Rules of the fields every method has.
FIELD_RULES: dict[str, Rule] = {"crop": same_patches, "stride": same_patches, "fuse_blocks": relative_blocks}
# A method's own fields (by `SegmentorConfig.method`); methods add theirs with `register_method_rules`.
METHOD_RULES: dict[str, dict[str, Rule]] = defaultdict(dict)


@dataclass(frozen=True)
class BackboneSetting:
    """Published values of a method's fields on one backbone, and where they are published."""

    values: dict[str, Any]
    source: str


# method -> backbone key -> published setting. ITACLIP and SCLIP publish no setting for other backbones: their
# presets on ViT-L/H run with the rules (and say so). A method adds its published settings here.
PUBLISHED: dict[str, dict[str, BackboneSetting]] = defaultdict(dict)


def register_method_rules(method: str, rules: dict[str, Rule]) -> None:
    """Rules for a method's own fields (e.g. its block numbers), used when no published setting gives them."""
    METHOD_RULES[method].update(rules)


def register_published(method: str, backbone: str, values: dict[str, Any], source: str) -> None:
    """A method's published setting on a backbone (`vit-l-14`, ...)."""
    parse_backbone(backbone)
    PUBLISHED[method][backbone] = BackboneSetting(dict(values), source)


# ----------------------------------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class FieldChoice:
    """How one field was set for the backbone."""

    name: str
    tuned: Any  # the value the preset has for its own backbone
    value: Any  # the value used
    how: str  # "published (<source>)", "rule: <description>", "kept (set explicitly)"

    @property
    def published(self) -> bool:
        return self.how.startswith("published")


@dataclass(frozen=True)
class BackboneFit:
    """The outcome of fitting a config to a backbone: the config used and, per field, where its value comes from."""

    config: Any  # the SegmentorConfig to run
    source: Backbone  # the backbone the preset was tuned on
    target: Backbone  # the backbone it runs on
    choices: tuple[FieldChoice, ...] = field(default=())

    @property
    def adapted(self) -> bool:
        return self.source.key != self.target.key

    def table(self) -> list[dict[str, Any]]:
        """Rows (field, tuned value, value used, origin) for reports and notebooks."""
        return [{"field": c.name, f"on {self.source.key}": c.tuned, f"on {self.target.key}": c.value,
                 "origin": c.how} for c in self.choices]

    def summary(self) -> str:
        if not self.adapted:
            return f"{self.config.name}: tuned on {self.source.key}, runs as tuned"
        parts = ", ".join(f"{c.name}={c.value!r} ({c.how})" for c in self.choices)
        return f"{self.config.name}: tuned on {self.source.key}, runs on {self.target.key} with {parts}"


def fit_to_backbone(config: Any, model_config: CLIPConfig, keep: Iterable[str] = (), warn: bool = True) -> BackboneFit:
    """`config` (a SegmentorConfig) for the backbone of `model_config`.

    Args:
        config: the settings, tuned on `config.tuned_on`.
        model_config: the CLIP the settings will run on.
        keep: field names set explicitly by the user; they are used as given.
        warn: warn when a field is derived by a rule (no published setting) or adaptation is switched off.
    """
    source = parse_backbone(config.tuned_on)
    target = backbone_of(model_config)
    same_geometry = (source.patch_size, source.layers) == (target.patch_size, target.layers)
    if source.key == target.key or same_geometry:
        return BackboneFit(config, source, target)
    if not config.adapt_backbone:
        if warn:
            warnings.warn(
                f"preset {config.name!r} was tuned on {source.key} and runs on {target.key} with its settings as "
                f"given (adapt_backbone=false): block numbers, crop and stride are not adapted", stacklevel=3)
        return BackboneFit(config, source, target)
    names = {f.name for f in fields(config)}
    keep = set(keep)
    published = PUBLISHED.get(config.method, {})
    setting = published.get(target.key) or published.get(target.base_key)
    rules = {**FIELD_RULES, **METHOD_RULES.get(config.method, {})}
    changes: dict[str, Any] = {}
    choices: list[FieldChoice] = []
    for name in list(rules) + [n for n in (setting.values if setting else {}) if n not in rules]:
        if name not in names:
            continue
        tuned = getattr(config, name)
        if isinstance(tuned, tuple) and not tuned:  # no blocks (e.g. fuse_blocks=()): nothing to fit
            continue
        if name in keep:
            choices.append(FieldChoice(name, tuned, tuned, "kept (set explicitly)"))
            continue
        if setting is not None and name in setting.values:
            value, how = setting.values[name], f"published ({setting.source})"
        else:
            rule = rules[name]
            described = RULE_DESCRIPTIONS.get(rule, rule.__name__)
            value, how = rule(tuned, source, target), f"rule: {described}, not published"
        if isinstance(tuned, tuple):
            value = tuple(value)
        changes[name] = value
        choices.append(FieldChoice(name, tuned, value, how))
    fitted = config.replace(**changes, tuned_on=target.key)
    ruled = [c for c in choices if c.how.startswith("rule")]
    if warn and ruled:
        listed = ", ".join(f"{c.name} {c.tuned!r} -> {c.value!r}" for c in ruled)
        warnings.warn(
            f"preset {config.name!r} (method {config.method}) was tuned on {source.key}; {target.key} has no published "
            f"setting for {', '.join(c.name for c in ruled)}, derived by rule (same relative depth, same size in "
            f"patches; not published): {listed}. Set them with --set (or adapt_backbone=false to use the "
            f"{source.key} values)", stacklevel=3)
    return BackboneFit(fitted, source, target, tuple(choices))


def settings_table(method: str, tuned: Any, backbones: Iterable[str] = ("vit-b-16", "vit-l-14", "vit-h-14")
                   ) -> list[dict[str, Any]]:
    """For a config `tuned` (of `method`), the value of every adapted field on each backbone, with its origin; for
    the README and notebooks."""
    from itaclip_core.model.clip import CLIPConfig

    rows = []
    for key in backbones:
        target = parse_backbone(key)
        model_config = CLIPConfig(embed_dim=8, image_size=target.image_size, patch_size=target.patch_size,
                                  vision_width=8, vision_layers=target.layers, vision_heads=1, context_length=77,
                                  vocab_size=8, text_width=8, text_layers=1, text_heads=1)
        fit = fit_to_backbone(tuned, model_config, warn=False)
        row: dict[str, Any] = {"backbone": key}
        published_names = [n for s in PUBLISHED.get(method, {}).values() for n in s.values]
        for name in dict.fromkeys([*FIELD_RULES, *METHOD_RULES.get(method, {}), *published_names]):
            if hasattr(fit.config, name):
                row[name] = getattr(fit.config, name)
        published = [c.name for c in fit.choices if c.published]
        ruled = [c.name for c in fit.choices if not c.published]
        if not fit.adapted:
            row["origin"] = "as tuned"
        elif published and not ruled:
            row["origin"] = "published"
        elif published:
            row["origin"] = f"published ({', '.join(published)}); rule, not published ({', '.join(ruled)})"
        else:
            row["origin"] = "rule (not published)"
        rows.append(row)
    return rows
