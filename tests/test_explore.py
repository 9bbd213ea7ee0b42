"""Tests of the notebooks' helper module: each helper against the pipeline it inspects or re-implements."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itaclip_core import explore
from itaclip_core.attention.dense import DENSE_METHODS, DenseConfig
from itaclip_core.data.synthetic import make_synthetic_dataset
from itaclip_core.inference.views import VIEW_NAMES
from itaclip_core.model.random import save_random_clip
from itaclip_core.postprocess import class_probabilities
from itaclip_core.presets import get_preset
from itaclip_core.resources import texts_dir
from itaclip_core.segmentor import Segmentor
from itaclip_core.text.classes import read_aux_file

GOLDEN_IMAGE = Path(__file__).parent / "golden" / "synthetic_300x420.png"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explore")
    (root / "templates.txt").write_text("a photo of a {}.\nthere is a {} in the scene.\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model():
    return explore.load_model("random-tiny", device="cpu")


@pytest.fixture(scope="module")
def config(workdir: Path):
    # Two templates, a short side of 224 and a wide stride keep the tiny model fast (three windows on the test
    # image); the settings are otherwise ITACLIP's for VOC.
    return get_preset("itaclip_voc21").replace(templates=str(workdir / "templates.txt"), short_side=224, stride=56)


@pytest.fixture(scope="module")
def segmentor(model, config, workdir: Path) -> Segmentor:
    return Segmentor(model, config, cache_dir=workdir / "cache")


@pytest.fixture(scope="module")
def prepared(segmentor: Segmentor, workdir: Path):
    small = workdir / "image.png"
    Image.open(GOLDEN_IMAGE).resize((210, 150), Image.BILINEAR).save(small)
    return segmentor.prepare(small)


@pytest.fixture(scope="module")
def dataset(workdir: Path):
    root = make_synthetic_dataset("voc21", workdir / "voc", num_images=2, sizes=((120, 160), (100, 150)))
    return explore.open_dataset("voc21", root)


# ------------------------------------------------------------------------------------------------ image side
def test_batched_engine_with_another_batch_size_gives_the_same_logits(model, segmentor, prepared, config) -> None:
    text = segmentor.classifier.features
    reference = segmentor.engine.logits(prepared.tensor, text, prepared.original_size)
    small = explore.batched_engine(model, config, 3)
    assert small.batch_size == 3 and small.stride == config.stride
    torch.testing.assert_close(small.logits(prepared.tensor, text, prepared.original_size), reference,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    plain = explore.batched_engine(model, config.replace(image_engineering=False), 3)
    assert (plain.logits(prepared.tensor, text, prepared.original_size) - reference).abs().max() > 1e-3


def test_view_logits_mix_to_the_pipeline_and_original_view_is_the_plain_pipeline(model, segmentor, prepared,
                                                                                config) -> None:  # fmt: skip
    views = explore.view_logits(segmentor, prepared)
    assert list(views) == list(VIEW_NAMES)
    text = segmentor.classifier.features
    mixed = explore.mix_view_logits(views, config.img_eng_coef)
    torch.testing.assert_close(mixed, segmentor.engine.logits(prepared.tensor, text, prepared.original_size),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    plain = explore.batched_engine(model, config.replace(image_engineering=False), 40)
    torch.testing.assert_close(views["original"], plain.logits(prepared.tensor, text, prepared.original_size),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert (views["grayscale"] - views["original"]).abs().max() > 1e-3


def test_prediction_from_window_features_equals_predict(segmentor, prepared) -> None:
    features, windows = explore.window_features(segmentor, prepared)
    logits = explore.logits_from_features(features, windows, prepared, segmentor.classifier.features)
    ours = explore.finish_prediction(segmentor, prepared, logits)
    reference = segmentor.predict_prepared(prepared)
    np.testing.assert_array_equal(ours.labels, reference.labels)
    np.testing.assert_allclose(ours.probs, reference.probs, rtol=0, atol=1e-6)


def test_pipeline_steps_end_at_the_prediction(model, segmentor, prepared, config, workdir: Path) -> None:
    steps = explore.pipeline_steps(segmentor, prepared)
    assert [s.enabled for s in steps] == [True, True, True, True, True]
    np.testing.assert_array_equal(steps[-1].labels, segmentor.predict_prepared(prepared).labels)
    raw = segmentor.engine.logits(prepared.tensor, segmentor.classifier.features, prepared.original_size)
    first = class_probabilities(raw, segmentor.classifier.query_to_class, config.logit_scale).argmax(dim=0)
    np.testing.assert_array_equal(steps[0].labels, first.numpy())
    bare = Segmentor(model, config.replace(pamr_steps=0, closing=False, area_thd=None, prob_thd=0.0),
                     cache_dir=workdir / "cache")  # fmt: skip
    bare_steps = explore.pipeline_steps(bare, prepared)
    assert [s.enabled for s in bare_steps] == [True, False, False, False, False]
    for step in bare_steps[1:]:
        np.testing.assert_array_equal(step.labels, bare_steps[0].labels)
    assert (bare_steps[-1].labels != steps[-1].labels).any()


def test_query_attention_maps(model, prepared) -> None:
    configs = {"qk": DENSE_METHODS["clip"], "selfself": DenseConfig(variant="selfself"),
               "itaclip": DENSE_METHODS["itaclip"]}  # fmt: skip
    rows, cols = model.visual.grid_size(*prepared.tensor.shape[-2:])
    maps = explore.query_attention(model, prepared.tensor, (2, 3), configs)
    for name, mass in (("qk", 1.0), ("selfself", 2.0), ("itaclip", 2.0)):
        assert maps[name].shape == (rows, cols)
        assert maps[name].min() >= 0
        assert maps[name].sum() <= mass + 1e-4  # the class token takes the rest of the row's mass
    other = explore.query_attention(model, prepared.tensor, (rows - 1, 0), {"selfself": configs["selfself"]})
    assert not np.allclose(other["selfself"], maps["selfself"])
    assert not np.allclose(maps["itaclip"], maps["selfself"])
    with pytest.raises(ValueError, match="outside"):
        explore.query_attention(model, prepared.tensor, (rows, 0), configs)
    parts = explore.attention_parts(model, prepared.tensor, (2, 3), DENSE_METHODS["itaclip"])
    assert list(parts) == ["block7", "block8", "block10", "last", "fused"]
    mean_blocks = (parts["block7"] + parts["block8"] + parts["block10"]) / 3
    np.testing.assert_allclose(parts["fused"], 0.5 * parts["last"] + 0.5 * mean_blocks, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(parts["fused"], maps["itaclip"], rtol=1e-6, atol=1e-8)


def test_patch_tokens_and_pca_colours(model, prepared) -> None:
    tokens = explore.patch_tokens(model, prepared.tensor, DENSE_METHODS["itaclip"])
    rows, cols = model.visual.grid_size(*prepared.tensor.shape[-2:])
    assert tokens.shape == (rows, cols, model.visual.output_dim)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(rows, cols))
    # three clusters of features: equal colours within a cluster, different colours between clusters
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assignment = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 1, 0]])
    colours = explore.pca_rgb(centres[assignment])
    assert colours.shape == (3, 4, 3) and colours.min() >= 0 and colours.max() <= 1
    np.testing.assert_allclose(colours[0, 0], colours[2, 3], atol=1e-9)
    assert np.abs(colours[0, 0] - colours[0, 2]).max() > 0.1 and np.abs(colours[0, 2] - colours[1, 1]).max() > 0.1


# ------------------------------------------------------------------------------------------------ settings, texts
def test_with_dense_sets_the_readout(model, config, prepared, workdir: Path) -> None:
    for name, dense in DENSE_METHODS.items():
        assert explore.with_dense(config, dense).dense_config() == dense, name
    with pytest.raises(ValueError, match="block_variants"):
        explore.with_dense(config, DenseConfig(block_variants=((3, "qq"),)))


def test_evaluate_logits_scores_each_variant(model, segmentor, config, dataset) -> None:
    subset = explore.load_subset(dataset, 2, config, progress=False)

    def variants(prepared):
        views = explore.view_logits(segmentor, prepared)
        return {"all": explore.mix_view_logits(views, config.img_eng_coef), "original": views["original"]}

    scored = explore.evaluate_logits(segmentor, dataset, subset, variants, progress=False)
    assert list(scored) == ["all", "original"]
    direct = explore.evaluate_subset(segmentor, dataset, subset, progress=False)
    assert scored["all"]["mIoU"] == pytest.approx(direct["mIoU"], abs=1e-9)
    plain = Segmentor(model, config.replace(image_engineering=False), cache_dir=segmentor.cache_dir)
    assert scored["original"]["mIoU"] == pytest.approx(explore.evaluate_subset(plain, dataset, subset,
                                                                               progress=False)["mIoU"], abs=1e-9)


def test_ablation_configs() -> None:
    base = get_preset("itaclip_voc21")
    configs = explore.ablation_configs(base)
    assert list(configs) == ["baseline", "+A", "+A+T", "+A+I", "+A+T+I"]
    baseline, overrides = configs["baseline"]
    assert (baseline.image_engineering, baseline.aux_file, baseline.aux_coef) == (False, None, 0.0)
    assert (baseline.fuse_blocks, baseline.last_mlp) == ((), True)
    assert (baseline.pamr_steps, baseline.closing, baseline.stride) == (base.pamr_steps, base.closing, base.stride)
    assert len(overrides) == 5
    full, none = configs["+A+T+I"]
    assert none == [] and full.replace(name=base.name) == base
    plus_a = configs["+A"][0]
    assert plus_a.fuse_blocks == base.fuse_blocks and not plus_a.image_engineering and plus_a.aux_file is None
    plus_ai = configs["+A+I"][0]
    assert plus_ai.image_engineering and plus_ai.aux_file is None and not plus_ai.last_mlp
    with pytest.raises(ValueError, match="ITACLIP preset"):
        explore.ablation_configs(get_preset("sclip_voc21"))
    with pytest.raises(ValueError, match="unknown components"):
        explore.ablation_configs(base, rows=["AX"])


def test_open_vocabulary_config_and_dataset_checks(dataset) -> None:
    base = explore.notebook_config("itaclip_voc21", ["stride=56"])
    assert base.stride == 56
    assert explore.notebook_config("itaclip_voc21", "stride=112").stride == 112
    assert explore.override_list("stride=112") == ["stride=112"] and explore.override_list(None) == []
    assert explore.override_list(("a=1", "b=2")) == ["a=1", "b=2"] and explore.override_list(" ") == []
    with_file = explore.notebook_config("itaclip_voc21", ["templates=tests/golden/voc20_definitions_sample.txt"])
    assert with_file.templates == str((explore.project_root() / "tests/golden/voc20_definitions_sample.txt"))
    assert with_file.aux_file == base.aux_file  # shipped texts/ files stay as they are
    typed = explore.open_vocabulary_config(base)
    assert (typed.classes, typed.aux_file, typed.background, typed.prob_thd, typed.area_thd) == (
        None, None, False, 0.0, None)  # fmt: skip
    assert (typed.stride, typed.pamr_steps, typed.logit_scale) == (56, base.pamr_steps, base.logit_scale)
    with pytest.raises(ValueError, match="made for voc21"):
        explore.open_dataset("context60", dataset.root, base)
    with pytest.raises(FileNotFoundError, match="DATA_ROOT"):
        explore.open_dataset("voc21", "no/such/folder", base)


def test_class_palette() -> None:
    with_background = explore.class_palette(4, background=True)
    without = explore.class_palette(4, background=False)
    assert with_background.shape == without.shape == (4, 3)
    assert with_background[0].tolist() == [0, 0, 0] and (without.sum(axis=1) > 0).all()
    assert len({tuple(c) for c in without}) == 4


def test_explorer_config() -> None:
    base = explore.open_vocabulary_config(get_preset("itaclip_voc21"))
    on = explore.explorer_config(base, True, "selfself", True, True, True, 0.2, 0.05, 56)
    assert (on.image_engineering, on.fuse_blocks, on.pamr_steps, on.closing) == (True, (7, 8, 10), 10, True)
    assert (on.prob_thd, on.area_thd, on.stride) == (0.2, 0.05, 56)
    off = explore.explorer_config(base.replace(pamr_steps=0), False, "qk", False, False, False, 0.0, 0.0, 112)
    assert (off.image_engineering, off.attention, off.fuse_blocks, off.pamr_steps) == (False, "qk", (), 0)
    assert (off.closing, off.prob_thd, off.area_thd, off.stride) == (False, 0.0, None, 112)
    pamr_on = explore.explorer_config(base.replace(pamr_steps=0), False, "qk", False, True, False, 0, 0, 28)
    assert pamr_on.pamr_steps == 10


def test_shipped_aux_texts() -> None:
    found = explore.shipped_aux_texts(["road", "no-such-class-xyz", "automobile|car"], "synonyms")
    shipped = [entry for path in (texts_dir() / "synonyms").glob("*.txt") for entry in read_aux_file(path)]
    assert found[0] in {text for name, text in shipped if name.lower() == "road"}
    assert found[1] is None
    assert found[2] in {text for name, text in shipped if name.lower() in ("car", "automobile")}
    with pytest.raises(ValueError, match="definitions"):
        explore.shipped_aux_texts(["road"], "glossary")


def test_set_classes_with_texts(model, config, workdir: Path) -> None:
    typed = Segmentor(model, explore.open_vocabulary_config(config), classes="road, sky", cache_dir=workdir / "cache")
    plain = typed.classifier.features.clone()
    unchanged = explore.set_classes_with_texts(typed, "road, sky", [None, None], aux_coef=0.5)
    torch.testing.assert_close(unchanged.features, plain)
    mixed = explore.set_classes_with_texts(typed, "road, sky", ["street, roadway", None], aux_coef=0.5)
    assert typed.classifier is mixed
    torch.testing.assert_close(mixed.features[1], plain[1])
    assert (mixed.features[0] - plain[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one per class"):
        explore.set_classes_with_texts(typed, "road, sky", [None], aux_coef=0.5)


# ------------------------------------------------------------------------------------------------ evaluation
def test_load_subset_prepares_images_as_the_config_says(dataset, config) -> None:
    subset = explore.load_subset(dataset, None, config.replace(long_side=200), progress=False)
    assert len(subset) == len(dataset) == 2
    for item, sample in zip(subset, dataset.samples):
        assert item.prepared.name == sample.name and max(item.prepared.tensor.shape[-2:]) <= 200
        assert item.label.shape == item.prepared.original_size


def test_run_ablation_rows_agree_with_direct_evaluation(model, config, dataset, workdir: Path) -> None:
    rows = explore.run_ablation(model, config, dataset, num_images=2, rows=("", "ATI"),
                                cache_dir=workdir / "cache", progress=False)  # fmt: skip
    assert [r["row"] for r in rows] == ["baseline", "+A+T+I"]
    for row in rows:
        assert 0 <= row["mIoU"] <= 100 and 0 <= row["aAcc"] <= 100 and row["num_images"] == 2
    subset = explore.load_subset(dataset, 2, config, progress=False)
    direct = explore.evaluate_subset(Segmentor(model, config, cache_dir=workdir / "cache"), dataset, subset,
                                     progress=False)  # fmt: skip
    assert rows[1]["mIoU"] == direct["mIoU"]
    np.testing.assert_array_equal(rows[1]["IoU"], direct["IoU"])


def test_sweep_aux_coef_equals_segmenting_with_each_coefficient(model, config, dataset, workdir: Path) -> None:
    segmentor = Segmentor(model, config, cache_dir=workdir / "cache")
    original = segmentor.classifier
    subset = explore.load_subset(dataset, 2, config, progress=False)
    files = {"definitions": "definitions/voc21.txt"}
    sweep = explore.sweep_aux_coef(segmentor, dataset, subset, [0.0, 0.6], files, progress=False)
    assert segmentor.classifier is original
    assert [(r["aux"], r["aux_coef"]) for r in sweep] == [("definitions", 0.0), ("definitions", 0.6)]
    for row in sweep:
        direct = Segmentor(model, config.replace(aux_coef=row["aux_coef"]), cache_dir=workdir / "cache")
        expected = explore.evaluate_subset(direct, dataset, subset, progress=False)
        assert row["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-9)
    with pytest.raises(ValueError, match="no images"):
        explore.load_subset(dataset, 0, get_preset("itaclip_voc21"))


# ------------------------------------------------------------------------------------------------ speed
def test_measure_throughput_counts_calls_and_sees_memory() -> None:
    calls = []

    def work(item: int) -> None:
        calls.append(item)
        block = torch.ones(50 * 2**20)  # 200 MiB, held for a while
        time.sleep(0.05)
        del block

    result = explore.measure_throughput(work, [1, 2, 3], "cpu", warmup=1)
    assert calls == [1, 1, 2, 3]
    assert result.images_per_second == pytest.approx(1 / result.seconds_per_image)
    assert result.seconds_per_image >= 0.05
    if result.memory_kind.startswith("cpu") and Path("/proc/self/statm").is_file():
        assert 150 <= result.peak_memory_mb <= 1000
    with pytest.raises(ValueError, match="at least one"):
        explore.measure_throughput(work, [], "cpu")


# ------------------------------------------------------------------------------------------------ runs and files
def test_start_notebook_figures_and_results(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace = {name: None for name in explore.PARAMETER_NAMES}
    namespace.update(MODEL="random-tiny", SEED=3, OUT_DIR=str(tmp_path / "out"), FIGURES_DIR=str(tmp_path / "fig"))
    run = explore.start_notebook("03_views", namespace)
    first = torch.rand(3)
    explore.start_notebook("03_views", namespace)
    assert torch.equal(torch.rand(3), first)  # seeded
    assert run.random_model
    figure = plt.figure()
    assert run.save_figure(figure, "03_grid.png").is_file()
    with pytest.raises(ValueError, match="03_"):
        run.save_figure(figure, "grid.png")
    path = run.write_results({"mIoU": np.float32(41.5), "absent": math.nan, "per_class": np.array([1.0, np.inf]),
                              "where": tmp_path, "shape": (2, 3)})  # fmt: skip
    payload = json.loads(path.read_text())
    assert path.name == "03_views.json"
    assert payload["results"] == {"mIoU": 41.5, "absent": None, "per_class": [1.0, None], "where": str(tmp_path),
                                  "shape": [2, 3]}  # fmt: skip
    assert payload["figures"] == ["03_grid.png"] and payload["parameters"]["SEED"] == 3
    del namespace["CLASSES"]
    with pytest.raises(NameError, match="CLASSES"):
        explore.start_notebook("03_views", namespace)


def test_resolve_path_and_load_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = explore.resolve_path("tests/golden/synthetic_300x420.png", what="IMAGE")
    assert found == GOLDEN_IMAGE.resolve()
    with pytest.raises(FileNotFoundError, match="IMAGE"):
        explore.resolve_path("tests/golden/missing.png", what="IMAGE")
    assert explore.resolve_path("out/x", must_exist=False) == explore.project_root() / "out" / "x"
    checkpoint = save_random_clip(tmp_path / "tiny.pt", seed=5)
    model = explore.load_model("ViT-B/16", weights=str(checkpoint), device="cpu")  # WEIGHTS wins over MODEL
    assert model.weights_id.startswith("tiny.pt")
    assert explore.is_random_model("ViT-B/16", "random-tiny") and not explore.is_random_model("ViT-B/16", None)


def test_strip_and_check_notebooks(tmp_path: Path) -> None:
    notebook = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# t"]},
            {"cell_type": "code", "execution_count": 4, "metadata": {"tags": ["parameters"], "papermill": {}},
             "outputs": [{"output_type": "stream", "name": "stdout", "text": ["x"]}], "source": ["x = 1"]},
        ],
        "metadata": {"papermill": {"duration": 1}, "widgets": {"state": {}}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip
    path = tmp_path / "00_x.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    problems = explore.notebook_problems(path)
    assert len(problems) == 3 and explore.main(["check", str(path)]) == 1
    assert explore.strip_notebook(path)
    stripped = json.loads(path.read_text())
    code = stripped["cells"][1]
    assert code["outputs"] == [] and code["execution_count"] is None and code["metadata"] == {"tags": ["parameters"]}
    assert stripped["metadata"] == {} and code["source"] == ["x = 1"]
    assert explore.notebook_problems(path) == [] and explore.main(["check", str(path)]) == 0
    assert not explore.strip_notebook(path)
