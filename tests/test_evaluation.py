"""The benchmark runner: scoring, reports, resuming (also after kill -9), refusal of other settings, torchrun."""

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
from PIL import Image

from _fake_segmentor import make as make_fake
from itaclip_core.cli import main
from itaclip_core.data import get_dataset
from itaclip_core.data.synthetic import make_synthetic_dataset
from itaclip_core.evaluation import EvalOptions, ResumeError, evaluate
from itaclip_core.inference.preprocess import prepare_image
from itaclip_core.metrics import IoUAccumulator

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 8
SIZES = [(64, 96), (48, 200), (120, 90), (200, 150)]


@pytest.fixture(scope="module")
def city_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset("cityscapes", tmp_path_factory.mktemp("city"), num_images=NUM_IMAGES, seed=3,
                                  sizes=SIZES, easy=True)  # fmt: skip


@pytest.fixture(scope="module")
def reference(city_root: Path) -> tuple[IoUAccumulator, list[np.ndarray]]:
    """Counts computed image by image, without the runner."""
    dataset = get_dataset("cityscapes", city_root)
    segmentor = make_fake("fake_cityscapes")
    accumulator = IoUAccumulator(dataset.num_classes)
    predictions = []
    for index, sample in enumerate(dataset.samples):
        labels = segmentor.predict_prepared(prepare_image(sample.image_path, 336, name=sample.name)).labels
        accumulator.update(labels, dataset.load_label(index))
        predictions.append(labels)
    return accumulator, predictions


def _options(out: Path, **changes) -> EvalOptions:
    settings = dict(out_dir=out, preset="fake_cityscapes", weights_id="fake:fake", workers=0, progress=False)
    settings.update(changes)
    return EvalOptions(**settings)


def _run(city_root: Path, out: Path, overrides: list[str] | None = None, **changes) -> dict:
    segmentor = make_fake("fake_cityscapes", weights="fake", overrides=overrides or [])
    options = _options(out, overrides=overrides or [], **changes)
    return evaluate(segmentor, get_dataset("cityscapes", city_root), options)


def _complete_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def test_runner_scores_like_direct_accumulation(city_root: Path, reference, tmp_path: Path) -> None:
    results = _run(city_root, tmp_path / "run")
    expected = reference[0].results()
    assert results["counts"] == expected["counts"]
    assert results["num_images"] == NUM_IMAGES
    assert results["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
    assert 50.0 < results["mIoU"] < 100.0  # easy images: good but not perfect
    assert results["run"]["computed"] == NUM_IMAGES and results["run"]["loaded_from_records"] == 0


def test_reports_predictions_and_panels(city_root: Path, reference, tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    results = _run(city_root, tmp_path / "run", save_preds=preds, save_vis=2)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rounded"]["mIoU"] == round(reference[0].results()["mIoU"], 2) == results["rounded"]["mIoU"]
    assert saved["preset"] == "fake_cityscapes" and saved["weights_id"] == "fake:fake"
    assert saved["dataset"]["name"] == "cityscapes" and saved["num_images"] == NUM_IMAGES and saved["date"]
    assert saved["config"]["short_side"] == 336
    assert [row["class"] for row in saved["per_class"]][:2] == ["road", "sidewalk"]
    absent = [row for row in saved["per_class"] if row["IoU"] is None]
    assert all(reference[0].area_union[i] == 0 for i, row in enumerate(saved["per_class"]) if row in absent)
    markdown = (out / "results.md").read_text()
    assert f"{saved['rounded']['mIoU']:.2f}" in markdown and "| road |" in markdown and "fake:fake" in markdown
    assert (out / "per_class_iou.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "vis").rglob("*.png"))) == 2
    dataset = get_dataset("cityscapes", city_root)
    for index, sample in enumerate(dataset.samples):
        stored = np.array(Image.open(preds / f"{sample.name}.png"))
        assert stored.dtype == np.uint8 and np.array_equal(stored, reference[1][index])


def test_worker_processes_and_num_samples(city_root: Path, reference, tmp_path: Path) -> None:
    with_workers = _run(city_root, tmp_path / "workers", workers=2)
    assert with_workers["counts"] == reference[0].results()["counts"]
    first_three = _run(city_root, tmp_path / "three", num_samples=3)
    dataset = get_dataset("cityscapes", city_root)
    expected = IoUAccumulator(dataset.num_classes)
    for index in range(3):
        expected.update(reference[1][index], dataset.load_label(index))
    assert first_three["num_images"] == 3 and first_three["counts"] == expected.results()["counts"]


@pytest.mark.parametrize(
    "change, key",
    [({"preset": "fake_other"}, "preset"), ({"weights_id": "fake:other"}, "weights_id"),
     ({"overrides": ["shift=1"]}, "overrides")],
)  # fmt: skip
def test_resuming_with_other_settings_is_refused(city_root: Path, tmp_path: Path, change: dict, key: str) -> None:
    _run(city_root, tmp_path / "run", num_samples=2)
    settings = {"num_samples": 2, **change}
    overrides = settings.pop("overrides", None)
    with pytest.raises(ResumeError, match=f"different settings.*{key}"):
        _run(city_root, tmp_path / "run", overrides=overrides, **settings)


def test_a_num_samples_run_extends_to_more_images_reusing_its_records(city_root: Path, reference,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    _run(city_root, tmp_path / "run", num_samples=3)
    extended = _run(city_root, tmp_path / "run")
    assert extended["num_images"] == NUM_IMAGES and extended["run"]["loaded_from_records"] == 3
    assert extended["run"]["computed"] == NUM_IMAGES - 3
    assert extended["counts"] == reference[0].results()["counts"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["num_samples"] is None
    smaller = _run(city_root, tmp_path / "run", num_samples=2)  # a smaller subset is read from the same records
    assert smaller["num_images"] == 2 and smaller["run"]["computed"] == 0


def test_cli_refuses_other_settings_with_a_clear_message(
    city_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["eval", "--preset", "fake_cityscapes", "--data-root", str(city_root), "--segmentor-factory",
            "_fake_segmentor:make", "--out", str(tmp_path / "run"), "--workers", "0", "-q",
            "--num-samples", "2"]  # fmt: skip
    assert main(base) == 0
    assert main(base + ["--set", "shift=1"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "overrides" in err and "--out" in err


def test_torn_record_line_is_tolerated(city_root: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(city_root, out)
    records = out / "records" / "rank0.jsonl"
    lines = records.read_bytes().split(b"\n")[:-1]
    torn = lines[-3][: len(lines[-3]) // 2]  # as if killed while writing the 6th record
    records.write_bytes(b"\n".join(lines[:-3]) + b"\n" + torn)
    resumed = _run(city_root, out)
    assert resumed["counts"] == reference[0].results()["counts"]
    assert resumed["run"]["computed"] == 3 and resumed["run"]["loaded_from_records"] == NUM_IMAGES - 3
    assert sorted(r["index"] for r in _complete_lines(records)) == list(range(NUM_IMAGES))
    assert records.read_bytes().endswith(b"\n")


def test_complete_record_without_newline_is_kept(city_root: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(city_root, out)
    records = out / "records" / "rank0.jsonl"
    records.write_bytes(records.read_bytes().rstrip(b"\n"))  # killed between the record and its newline
    resumed = _run(city_root, out)
    assert resumed["run"]["computed"] == 0 and resumed["counts"] == reference[0].results()["counts"]
    assert len(_complete_lines(records)) == NUM_IMAGES


def test_records_of_another_image_list_are_refused(city_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(city_root, out, num_samples=2)
    records = out / "records" / "rank0.jsonl"
    records.write_text(records.read_text().replace("frankfurt", "bremen"))
    with pytest.raises(ResumeError, match="image list changed"):
        _run(city_root, out, num_samples=2)


def test_prediction_of_wrong_size_is_an_error(city_root: Path, tmp_path: Path) -> None:
    segmentor = make_fake("fake_cityscapes")
    segmentor.predict_prepared = lambda prepared: np.zeros((3, 3), np.int64)
    with pytest.raises(ValueError, match="original image size"):
        evaluate(segmentor, get_dataset("cityscapes", city_root), _options(tmp_path / "run"))


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _eval_command(city_root: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "itaclip_core.cli", "eval", "--preset", "fake_cityscapes", "--data-root", str(city_root),
            "--segmentor-factory", "_fake_segmentor:make", "--weights", "fake", "--out", str(out), "-q",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_resume_after_kill_9_recomputes_only_missing_images(city_root: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, *_eval_command(city_root, out, "--workers", "1", "--set", "delay=0.4")]
    process = subprocess.Popen(command, env=_cli_env(), cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    records = out / "records" / "rank0.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if records.is_file() and records.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    os.killpg(process.pid, signal.SIGKILL)  # the run and its data-loader worker
    process.wait()
    saved = len(_complete_lines(records))
    assert 3 <= saved < NUM_IMAGES
    finished = subprocess.run(command, env=_cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == reference[0].results()["counts"]
    assert results["run"]["computed"] == NUM_IMAGES - saved
    assert results["run"]["loaded_from_records"] == saved
    indices = [r["index"] for r in _complete_lines(records)]
    assert sorted(indices) == list(range(NUM_IMAGES))  # every image scored exactly once over both runs


@pytest.mark.slow
def test_two_processes_under_torchrun_give_identical_counts(city_root: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_eval_command(city_root, out, "--workers", "0")]  # fmt: skip
    finished = subprocess.run(command, env=_cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == reference[0].results()["counts"]
    assert results["run"]["world_size"] == 2 and results["run"]["computed"] == NUM_IMAGES
    for rank in (0, 1):
        indices = [r["index"] for r in _complete_lines(out / "records" / f"rank{rank}.jsonl")]
        assert indices == [i for i in range(NUM_IMAGES) if i % 2 == rank]
    # the records of the two-process run are reused by a single process
    resumed = _run(city_root, out, workers=0)
    assert resumed["run"]["computed"] == 0 and resumed["counts"] == results["counts"]


@pytest.mark.slow
def test_end_to_end_with_a_random_tiny_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from itaclip_core.segmentor import Segmentor

    monkeypatch.setenv("ITACLIP_CACHE", str(tmp_path / "cache"))
    root = make_synthetic_dataset("voc21", tmp_path / "voc", num_images=2, sizes=[(64, 80), (72, 60)], easy=True)
    templates = tmp_path / "templates.txt"  # two prompt templates instead of 80 keep the text tower cheap
    templates.write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    overrides = ["short_side=224", f"templates={templates}"]
    out = tmp_path / "run"
    arguments = ["eval", "--preset", "itaclip_voc21", "--data-root", str(root), "--weights", "random-tiny",
                 "--out", str(out), "--workers", "1", "--set", overrides[0], "--set", overrides[1], "--save-vis", "1",
                 "--save-preds", str(tmp_path / "preds"), "--device", "cpu", "-q"]  # fmt: skip
    assert main(arguments) == 0
    results = json.loads((out / "results.json").read_text())
    # the same images through the segmentor's own image path, scored directly
    segmentor = Segmentor.from_preset("itaclip_voc21", weights="random-tiny", device="cpu", overrides=overrides)
    dataset = get_dataset("voc21", root)
    direct = IoUAccumulator(dataset.num_classes)
    for index, sample in enumerate(dataset.samples):
        labels = segmentor.predict(sample.image_path).labels
        direct.update(labels, dataset.load_label(index))
        assert np.array_equal(np.array(Image.open(tmp_path / "preds" / f"{sample.name}.png")), labels)
    assert results["counts"] == direct.results()["counts"] and results["num_images"] == 2
    assert results["weights_id"] == segmentor.weights_id
    assert results["config"]["name"] == "itaclip_voc21" and results["config"]["short_side"] == 224
    assert results["overrides"] == overrides
    assert len(list((out / "vis").glob("*.png"))) == 1
    assert main(arguments) == 0  # a finished run started again recomputes nothing
    again = json.loads((out / "results.json").read_text())
    assert again["run"]["computed"] == 0 and again["counts"] == results["counts"]
