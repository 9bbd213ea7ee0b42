"""`itaclip compare` and its report: confusion records, focus figures, the bootstrap, sharing, resuming, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from itaclip_core.cli import main
from itaclip_core.data.registry import DATASET_NAMES
from itaclip_core.data.synthetic import make_synthetic_dataset
from itaclip_core.evaluation import analysis
from itaclip_core.evaluation.compare import (
    CompareError,
    Configuration,
    SharedResources,
    plan_comparison,
    read_configurations,
    run_comparison,
    with_common_overrides,
)
from itaclip_core.evaluation.comparison_report import build_report
from itaclip_core.evaluation.published import published_presets, published_result, published_sources
from itaclip_core.evaluation.records import ImageRecord, sparse_confusion
from itaclip_core.metrics import confusion_counts, intersect_and_union
from itaclip_core.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 6
SIZES = [(64, 96), (48, 200), (120, 90)]
FAKE = ["--segmentor-factory", "_fake_segmentor:make", "--weights", "fake", "--workers", "0", "-q"]


@pytest.fixture(scope="module")
def city_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset("cityscapes", tmp_path_factory.mktemp("city"), num_images=NUM_IMAGES, seed=3,
                                  sizes=SIZES, easy=True)  # fmt: skip


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset("voc21", tmp_path_factory.mktemp("voc"), num_images=2, sizes=[(64, 80), (72, 60)],
                                  easy=True)  # fmt: skip


def _configs_file(path: Path, delay: float = 0.0) -> Path:
    entries = [{"name": "base", "preset": "fake_cityscapes", "overrides": [f"delay={delay}"]},
               {"name": "coarse", "preset": "fake_cityscapes", "overrides": {"patch": 32, "delay": delay}},
               {"name": "shifted", "preset": "fake_cityscapes", "overrides": ["shift=1", f"delay={delay}"]}]  # fmt: skip
    path.write_text(json.dumps(entries))
    return path


# ------------------------------------------------------------------------------------------------ confusion records
def record_fields(record: ImageRecord) -> tuple:
    """The fields of a record after its index and name (size, histograms, seconds, confusion)."""
    return (record.height, record.width, record.intersect, record.union, record.pred, record.label, 0.0,
            record.confusion)


def test_confusion_by_hand_and_its_record_round_trip() -> None:
    label = np.array([[0, 0, 1, 255], [1, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 2], [2, 2, 0, 7]])  # 7: outside the classes
    # counted pixels (label, pred): (0,0) (0,1) (1,1) | (1,2) (2,2) (2,0); (255, 2) ignored, (2, 7) out of range
    expected = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    matrix = confusion_counts(pred, label, 3)
    assert np.array_equal(matrix, expected)
    cells = sparse_confusion(matrix)
    assert cells == ((0, 0, 1), (0, 1, 1), (1, 1, 1), (1, 2, 1), (2, 0, 1), (2, 2, 1))
    counts = intersect_and_union(pred, label, 3)
    record = ImageRecord(0, "a", 2, 4, *(tuple(c.tolist()) for c in counts), confusion=cells)
    again = ImageRecord.from_json(record.to_json(), 3)
    assert again == record and np.array_equal(again.confusion_matrix(3), expected)
    # a record written before confusion matrices were recorded is still read, without one
    old = json.loads(record.to_json())
    del old["confusion"]
    legacy = ImageRecord.from_json(json.dumps(old), 3)
    assert legacy is not None and legacy.confusion is None and legacy.intersect == record.intersect
    mixed = analysis.image_counts({0: legacy, 1: ImageRecord(1, "b", *record_fields(record))}, 3)
    assert mixed.without_confusion == 1 and np.array_equal(mixed.confusion, expected)
    bad = dict(old, confusion=[[0, 3, 1]])  # a class id beyond the classes
    assert ImageRecord.from_json(json.dumps(bad), 3) is None


def test_focus_figures_by_hand() -> None:
    # class 1 over two images: image 0 labels 4 pixels, predicts 3 of them right and 2 others wrongly as 1
    label0 = np.array([[1, 1, 1, 1], [0, 0, 2, 2]])
    pred0 = np.array([[1, 1, 1, 0], [1, 1, 2, 2]])
    label1 = np.array([[2, 2], [1, 0]])
    pred1 = np.array([[2, 1], [2, 0]])
    records = {}
    for index, (pred, label) in enumerate([(pred0, label0), (pred1, label1)]):
        counts = intersect_and_union(pred, label, 3)
        records[index] = ImageRecord(index, f"im{index}", *label.shape, *(tuple(c.tolist()) for c in counts),
                                     confusion=sparse_confusion(confusion_counts(pred, label, 3)))  # fmt: skip
    counts = analysis.image_counts(records, 3)
    totals = [getattr(counts, k).sum(0) for k in ("intersect", "union", "pred", "label")]
    figures = analysis.class_figures(*totals, 1)
    # class 1: labelled 4 + 1 = 5, predicted 5 + 1 = 6, right 3 + 0 = 3, union 5 + 6 - 3 = 8
    assert (figures["intersect"], figures["labelled"], figures["predicted"], figures["union"]) == (3, 5, 6, 8)
    assert figures["IoU"] == pytest.approx(300 / 8) and figures["precision"] == pytest.approx(50.0)
    assert figures["recall"] == pytest.approx(60.0)
    found = analysis.confusions(counts.confusion, 1, ["bg", "one", "two"])
    # its labelled pixels went to bg (1, image 0) and two (1, image 1); bg (2) and two (1) were predicted as it
    assert found["predicted_as"] == [{"class": "bg", "pixels": 1, "share": 20.0},
                                     {"class": "two", "pixels": 1, "share": 20.0}]  # fmt: skip
    assert found["mistaken_for_it"] == [{"class": "bg", "pixels": 2, "share": pytest.approx(100 * 2 / 6)},
                                        {"class": "two", "pixels": 1, "share": pytest.approx(100 / 6)}]  # fmt: skip
    per_image = analysis.per_image_iou(counts)[:, 1]
    assert per_image == pytest.approx([3 / 6 * 100, 0.0])  # image 0: I 3, U 4 + 5 - 3; image 1: I 0


# ------------------------------------------------------------------------------------------------ bootstrap
def _one_class_counts(intersections: list[int], union: int = 10) -> analysis.ImageCounts:
    n = len(intersections)
    column = np.array(intersections, dtype=np.int64)[:, None]
    unions = np.full((n, 1), union, dtype=np.int64)
    return analysis.ImageCounts([f"im{i}" for i in range(n)], column, unions, unions, unions,
                                np.zeros((1, 1), np.int64), 0)  # fmt: skip


def test_bootstrap_matches_the_binomial_quantiles() -> None:
    # One class, union 10 in every image: a resample's mIoU is the share of its images where b is right, so the
    # difference b - a is X - 100 with X ~ Binomial(100, 1/2) (a is always right). Its 2.5% and 97.5% quantiles
    # are 40 and 60 (P(X <= 39) = 0.018, P(X <= 40) = 0.028).
    a = _one_class_counts([10] * 100)
    b = _one_class_counts([10] * 50 + [0] * 50)
    result = analysis.bootstrap_miou_difference(a, b, resamples=20000, seed=1)
    assert result["difference"] == pytest.approx(-50.0)
    assert (result["low"], result["high"]) == (pytest.approx(-60.0), pytest.approx(-40.0))
    assert result["share_positive"] == 0.0
    same = analysis.bootstrap_miou_difference(b, b, resamples=200)
    assert (same["low"], same["high"], same["difference"]) == (0.0, 0.0, 0.0)


def test_bootstrap_refuses_other_image_lists() -> None:
    with pytest.raises(ValueError, match="different images"):
        analysis.bootstrap_miou_difference(_one_class_counts([1, 2]), _one_class_counts([1, 2, 3]))


# ------------------------------------------------------------------------------------------------ published table
def test_published_table_covers_every_benchmark_preset() -> None:
    sources = published_sources()
    for preset in published_presets():
        method, _, dataset = preset.partition("_")
        assert dataset in DATASET_NAMES, preset
        result = published_result(preset)
        assert result.source in sources and result.url.startswith("https://") and 0 < result.miou < 100
    for name, config in PRESETS.items():
        if config.dataset is not None and name.split("_")[0] in ("itaclip", "sclip"):
            assert published_result(name) is not None, f"{name} has no published mIoU"
    assert published_result("itaclip_voc21").miou == 67.9 and published_result("open_vocab") is None


def test_reference_weights_are_recognised_by_their_sha256() -> None:
    from itaclip_core.evaluation.comparison_report import is_reference_weights, weights_line
    from itaclip_core.model.weights import REGISTRY

    digest = REGISTRY["ViT-B/16"].sha256
    assert is_reference_weights(f"ViT-B/16 sha256:{digest}") and is_reference_weights(f"ViT-B-16.pt sha256:{digest}")
    assert not is_reference_weights(f"ViT-B/32 sha256:{REGISTRY['ViT-B/32'].sha256}")
    assert not is_reference_weights("random-tiny:0")
    assert weights_line(f"ViT-B-16.pt sha256:{digest}") == f"weights: `ViT-B-16.pt`, sha256 `{digest}`"


# ------------------------------------------------------------------------------------------------ configurations
def test_configuration_files_and_common_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_file = tmp_path / "grid.yaml"
    yaml_file.write_text("configurations:\n  - preset: itaclip_voc21\n  - name: wide\n    preset: itaclip_voc21\n"
                         "    overrides: {stride: 56, fuse_blocks: [7, 8], area_thd: null}\n")  # fmt: skip
    configurations = read_configurations(yaml_file)
    assert configurations == [Configuration("itaclip_voc21", "itaclip_voc21"),
                              Configuration("wide", "itaclip_voc21", ("stride=56", "fuse_blocks=7,8", "area_thd=none"))]
    json_file = tmp_path / "grid.json"
    json_file.write_text(json.dumps([{"preset": "sclip_voc21", "overrides": ["stride=56"], "weights": "x"}]))
    with pytest.raises(CompareError, match="entry 1: unknown key.*weights"):
        read_configurations(json_file)
    combined = with_common_overrides(configurations, ["short_side=224"])
    assert combined[1].overrides == ("short_side=224", "stride=56", "fuse_blocks=7,8", "area_thd=none")
    # --refine names refinements of either kind; PAMR stays first among the logit refinements unless named
    assert with_common_overrides(configurations, [], refine="selfcorr,crf")[0].overrides == (
        "refine=selfcorr", "logit_refine=pamr,crf")
    assert with_common_overrides(configurations, [], refine="guided,pamr")[0].overrides == ("logit_refine=guided,pamr",)
    with pytest.raises(CompareError, match="unknown refinement.*nope"):
        with_common_overrides(configurations, [], refine="selfcorr,nope")
    import itaclip_core.presets as presets

    monkeypatch.setattr(presets, "field_names", lambda: ["stride"])
    with pytest.raises(CompareError, match="no 'refine' field"):
        with_common_overrides(configurations, [], refine="selfcorr")


@pytest.mark.parametrize("arguments, message", [
    (["--presets", "itaclip_voc21,nope_voc21"], "unknown preset 'nope_voc21'"),
    (["--presets", "itaclip_voc21,sclip_voc20"], "different datasets.*itaclip_voc21 -> voc21.*sclip_voc20 -> voc20"),
    (["--presets", "itaclip_cityscapes"], "does not hold the cityscapes benchmark"),
    (["--presets", "itaclip_voc21", "--focus", "persn"], "--focus persn: no class of that name.*person"),
    (["--presets", "itaclip_voc21", "--set", "stride=wide"], "stride"),
    (["--presets", "itaclip_voc21,itaclip_voc21"], "given twice"),
    (["--presets", "open_vocab"], "not tied to a benchmark"),
    (["--presets", "itaclip_voc21", "--refine", "selfcorr,nope"], "--refine selfcorr,nope: unknown refinement"),
    (["--presets", "itaclip_voc21", "--configs", "x.yaml"], "either --presets"),
])  # fmt: skip
def test_bad_input_is_refused_before_any_work(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              arguments: list[str], message: str) -> None:  # fmt: skip
    out = tmp_path / "out"
    status = main(["compare", *arguments, "--data-root", str(voc_root), "--out", str(out), "--weights",
                   str(tmp_path / "missing.pt"), "-q"])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists()  # nothing written, no weights looked for (the checkpoint path does not exist)


def test_a_record_folder_of_other_settings_is_refused_before_any_work(city_root: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "out"
    configs = _configs_file(tmp_path / "grid.json")
    base = ["compare", "--configs", str(configs), "--data-root", str(city_root), "--out", str(out), *FAKE]
    assert main([*base, "--num-samples", "2"]) == 0
    stamp = (out / "configs" / "base" / "records" / "rank0.jsonl").stat().st_mtime_ns
    entries = json.loads(configs.read_text())
    entries[0]["overrides"] = ["delay=0.0", "shift=2"]  # the same name with other settings
    configs.write_text(json.dumps(entries))
    assert main([*base, "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "configs/base holds an evaluation with different settings" in err and "shift" in err
    assert (out / "configs" / "base" / "records" / "rank0.jsonl").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------------ report
def test_report_of_a_comparison(city_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    configs = _configs_file(tmp_path / "grid.json")
    assert main(["compare", "--configs", str(configs), "--data-root", str(city_root), "--out", str(out),
                 "--focus", "Person", "--bootstrap", "300", *FAKE]) == 0  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    per_config = {name: json.loads((out / "configs" / name / "results.json").read_text())
                  for name in ("base", "coarse", "shifted")}  # fmt: skip
    rows = {row["name"]: row for row in report["configurations"]}
    for name, results in per_config.items():
        assert rows[name]["mIoU"] == results["mIoU"] and rows[name]["aAcc"] == results["aAcc"]
        assert report["per_class_iou"][name] == [row["IoU"] for row in results["per_class"]]
        assert rows[name]["published_mIoU"] is None  # fake presets have no published number
    # the focus figures equal those of the summed per-class counts of each run
    person = report["dataset"]["num_classes"] and report["class_names"].index("person")
    assert report["focus"]["class"] == "person"
    for row in report["focus"]["configurations"]:
        counts = per_config[row["name"]]["counts"]
        assert row["intersect"] == counts["intersect"][person] and row["union"] == counts["union"][person]
        assert row["recall"] == pytest.approx(per_config[row["name"]]["per_class"][person]["Acc"])
        assert row["confusion_images_missing"] == 0
    shifted = next(r for r in report["focus"]["configurations"] if r["name"] == "shifted")
    assert shifted["predicted_as"][0]["class"] == "rider"  # shift=1 moves every person pixel to the next class
    pairs = {pair["name"]: pair for pair in report["paired"]}
    assert report["baseline"] == "base" and set(pairs) == {"coarse", "shifted"}
    difference = rows["shifted"]["mIoU"] - rows["base"]["mIoU"]
    assert pairs["shifted"]["bootstrap"]["difference"] == pytest.approx(difference, abs=1e-9)
    assert pairs["shifted"]["bootstrap"]["high"] < 0 and pairs["shifted"]["worse"] == NUM_IMAGES
    assert report["differ_most"][0]["worst"] == "shifted"
    markdown = (out / "results.md").read_text()
    assert "| base | `fake_cityscapes` |" in markdown and "## Focus: person" in markdown
    assert "95% bootstrap CI" in markdown and "fake:fake" in markdown
    for key in ("main", "heatmap", "paired", "focus_distribution", "focus_gallery"):
        assert Path(report["figures"][key]).read_bytes()[:4] == b"\x89PNG"
    # a second report from the records alone gives the same numbers, another baseline pairs the others with it
    again = build_report(out, baseline="coarse", resamples=300, figures=False)
    assert again["configurations"] == report["configurations"] and again["baseline"] == "coarse"
    with pytest.raises(CompareError, match="baseline 'nope'"):
        build_report(out, baseline="nope", figures=False)


# ------------------------------------------------------------------------------------------------ sharing
def test_model_and_text_embeddings_are_shared_and_finished_runs_skipped(
    voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itaclip_core.text.classifier as classifier

    encoded: list[int] = []
    original = classifier._encode_uncached
    monkeypatch.setattr(classifier, "_encode_uncached",
                        lambda model, texts, *rest: encoded.append(len(texts)) or original(model, texts, *rest))
    common = ["short_side=224", "stride=112", f"templates={REPO / 'notebooks' / 'ci_templates.txt'}", "pamr_steps=1"]
    configurations = with_common_overrides([Configuration("itaclip", "itaclip_voc21"),
                                            Configuration("narrow", "itaclip_voc21", ("stride=56",)),
                                            Configuration("sclip", "sclip_voc21")], common)  # fmt: skip
    plan = plan_comparison(configurations, voc_root, tmp_path / "out", "random-tiny", focus="person")
    resources = SharedResources(device="cpu", cache_dir=None)  # no disk cache: sharing is in memory
    loads: list[str] = []
    model_of = resources.model
    resources.model = lambda weights: loads.append(weights) or model_of(weights)
    first = run_comparison(plan, resources=resources, workers=0, progress=False)
    assert resources.classifiers_built == 2  # itaclip and narrow share one; SCLIP's class names differ
    assert len(encoded) == 2 and len(resources.models) == 1  # one load of the weights
    # the shared classifier gives the same numbers as a segmentor built on its own
    from itaclip_core.evaluation import EvalOptions, evaluate
    from itaclip_core.segmentor import Segmentor

    alone = Segmentor(resources.models["random-tiny"], plan.configs["narrow"], cache_dir=None)
    direct = evaluate(alone, plan.dataset, EvalOptions(out_dir=tmp_path / "direct", preset="itaclip_voc21",
                                                       weights_id=alone.weights_id, workers=0, progress=False))
    assert direct["counts"] == first["narrow"]["counts"]
    # run again: every configuration is finished, nothing is built or encoded
    built = []
    again = run_comparison(plan, build=lambda c: built.append(c) or None, resources=resources, workers=0,
                           progress=False, weights_id=first["itaclip"]["weights_id"])  # fmt: skip
    assert built == [] and len(encoded) == 3 and {k: v["counts"] for k, v in again.items()} == {
        k: v["counts"] for k, v in first.items()}  # fmt: skip
    report = build_report(tmp_path / "out", resamples=100)
    row = report["configurations"][0]
    assert row["published_mIoU"] == 67.9 and row["difference"] == pytest.approx(row["mIoU"] - 67.9)
    assert row["comparable"] is False  # changed settings and random weights
    assert "random-tiny" in (tmp_path / "out" / "results.md").read_text()


def test_disk_text_cache_is_hit_across_comparisons(voc_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import itaclip_core.text.classifier as classifier

    encoded: list[int] = []
    original = classifier._encode_uncached
    monkeypatch.setattr(classifier, "_encode_uncached",
                        lambda model, texts, *rest: encoded.append(len(texts)) or original(model, texts, *rest))
    common = ["short_side=224", "stride=224", f"templates={REPO / 'notebooks' / 'ci_templates.txt'}", "pamr_steps=0",
              "image_engineering=false"]  # fmt: skip
    configurations = with_common_overrides([Configuration("sclip", "sclip_voc21")], common)
    for out in ("a", "b"):  # two comparisons (two processes' worth of resources) on one disk cache
        plan = plan_comparison(configurations, voc_root, tmp_path / out, "random-tiny", num_samples=1)
        run_comparison(plan, resources=SharedResources(device="cpu", cache_dir=tmp_path / "cache"), workers=0,
                       progress=False)  # fmt: skip
    assert len(encoded) == 1


# ------------------------------------------------------------------------------------------------ subprocesses
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _command(configs: Path, city_root: Path, out: Path) -> list[str]:
    return ["-m", "itaclip_core.cli", "compare", "--configs", str(configs), "--data-root", str(city_root), "--out",
            str(out), "--focus", "person", "--bootstrap", "200", *FAKE]  # fmt: skip


def _numbers(out: Path) -> dict:
    report = json.loads((out / "results.json").read_text())
    return {key: report[key] for key in ("configurations", "paired", "per_class_iou", "per_image_miou", "focus",
                                         "differ_most")}  # fmt: skip


@pytest.mark.slow
def test_interrupted_comparison_resumes_to_identical_numbers(city_root: Path, tmp_path: Path) -> None:
    configs = _configs_file(tmp_path / "grid.json", delay=0.15)
    reference = tmp_path / "reference"  # the same comparison, uninterrupted
    assert main(_command(configs, city_root, reference)[2:]) == 0
    out = tmp_path / "out"
    command = [sys.executable, *_command(configs, city_root, out)]
    process = subprocess.Popen(command, env=_env(), cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    records = out / "configs" / "coarse" / "records" / "rank0.jsonl"  # killed inside the second configuration
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if records.is_file() and records.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the comparison ended before it could be killed: {process.stderr.read()}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists()
    done = records.read_bytes().count(b"\n")
    assert 2 <= done < NUM_IMAGES
    base_stamp = (out / "configs" / "base" / "results.json").stat().st_mtime_ns
    resumed = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "configs" / "base" / "results.json").stat().st_mtime_ns == base_stamp  # not run again
    coarse = json.loads((out / "configs" / "coarse" / "results.json").read_text())
    assert coarse["run"]["loaded_from_records"] >= done and coarse["run"]["computed"] <= NUM_IMAGES - done
    assert _numbers(out) == _numbers(reference)


@pytest.mark.slow
def test_comparison_under_torchrun_matches_one_process(city_root: Path, tmp_path: Path) -> None:
    configs = _configs_file(tmp_path / "grid.json")
    single = tmp_path / "single"
    assert main(["compare", "--configs", str(configs), "--data-root", str(city_root), "--out", str(single),
                 "--focus", "person", "--bootstrap", "200", *FAKE]) == 0  # fmt: skip
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_command(configs, city_root, out)]  # fmt: skip
    finished = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _numbers(out) == _numbers(single)
    assert json.loads((out / "configs" / "base" / "results.json").read_text())["run"]["world_size"] == 2
