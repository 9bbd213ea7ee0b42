"""Every path a user walks when something is wrong: a table of bad invocations of each sub-command and of the API.

Each CLI row: the arguments, the expected exit status, a phrase the message must contain; stderr never holds a
traceback, and a run refused before work leaves nothing at its output path. Each API row: the call, the error type
(always a `UserError`), a phrase. The rows run in-process with the random-tiny model and synthetic datasets; a few
run as subprocesses to see the real stderr.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itaclip_core import SegmentorConfig, get_preset, load_clip
from itaclip_core.cli import main
from itaclip_core.data.synthetic import make_synthetic_dataset
from itaclip_core.errors import ConfigError, DeviceError, UserError
from itaclip_core.inference.preprocess import ImageReadError
from itaclip_core.model import weights as weights_module
from itaclip_core.model.checkpoint import CheckpointError
from itaclip_core.text.classes import TextFileError
from itaclip_core.text.tokenizer import TokenizerError
from itaclip_core.validation import validate_config

REPO = Path(__file__).resolve().parents[1]
LONG_NAME = "an extraordinarily long class name " * 14
TINY = "--weights random-tiny --no-progress"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files the rows name: images, folders, class and auxiliary files, datasets broken in several ways."""
    base = tmp_path_factory.mktemp("world")
    files: dict[str, Path] = {}
    rng = np.random.default_rng(0)
    files["img"] = base / "cat.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(files["img"])
    files["dir"] = base / "folder"
    files["dir"].mkdir()
    files["file"] = base / "plain.txt"
    files["file"].write_text("x\n")
    files["broken_jpg"] = base / "broken.jpg"
    good = base / "good.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    files["broken_jpg"].write_bytes(good.read_bytes()[:40])  # a JPEG header, then nothing
    files["not_image"] = base / "notes.png"
    files["not_image"].write_text("these are notes, not pixels\n")
    files["empty_txt"] = base / "empty.txt"
    files["empty_txt"].write_text("\n\n")
    files["classes"] = base / "classes.txt"
    files["classes"].write_text("cat\ndog\nsky\n")
    files["aux_count"] = base / "aux_count.txt"
    files["aux_count"].write_text("cat >=a small pet\n")
    files["aux_ordered"] = base / "aux_ordered.txt"
    files["aux_ordered"].write_text("cat >=a small pet\ndog >=a hound\nsky >=the air above\n")
    files["aux_swapped"] = base / "aux_swapped.txt"
    files["aux_swapped"].write_text("dog >=a hound\ncat >=a small pet\nsky >=the air above\n")
    files["garbage_pt"] = base / "garbage.pt"
    files["garbage_pt"].write_bytes(b"this is not a checkpoint")
    files["templates"] = base / "templates.txt"
    files["templates"].write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    files["bad_templates"] = base / "bad_templates.txt"
    files["bad_templates"].write_text("a photo without a slot\n")
    voc = make_synthetic_dataset("voc21", base / "voc", num_images=2, sizes=[(48, 64), (40, 52)])
    files["voc"] = voc
    split = Path("VOC2012/ImageSets/Segmentation/val.txt")
    for name, breakage in {
        "voc_empty": lambda root: (root / split).write_text(""),
        "voc_nosplit": lambda root: (root / split).unlink(),
        "voc_nolabel": lambda root: (root / "VOC2012" / "SegmentationClass"
                                     / f"{(root / split).read_text().split()[0]}.png").unlink(),
    }.items():
        files[name] = base / name
        shutil.copytree(voc, files[name])
        breakage(files[name])
    files["coco_root"] = base / "coco_missing"
    return files


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: a model name that is not cached fails as it does offline."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(weights_module, "urlopen", refuse)


SEG = "segment {img} --classes 'cat, dog' " + TINY + " --out {out}"
EVAL = "eval --preset itaclip_voc21 --data-root {voc} " + TINY + " --workers 0 --out {out}"

# (id, arguments, exit status, phrase in stderr)
CLI_ROWS = [
    # ------------------------------------------------------------------ itaclip
    ("no-command", "", 2, "usage: itaclip"),
    ("unknown-command", "segmnt", 2, "invalid choice"),
    # ------------------------------------------------------------------ segment: inputs
    ("seg-missing-image", "segment {dir}/missing.jpg --classes cat " + TINY + " --out {out}", 2, "does not exist"),
    ("seg-folder-as-image", "segment {dir} --classes cat " + TINY + " --out {out}", 2, "is a folder"),
    ("seg-no-classes", "segment {img} " + TINY + " --out {out}", 2, "give the classes"),
    ("seg-empty-classes", "segment {img} --classes '' " + TINY + " --out {out}", 2, "--classes is empty"),
    ("seg-commas-only", "segment {img} --classes ' , ,' " + TINY + " --out {out}", 2, "--classes is empty"),
    ("seg-empty-name", "segment {img} --classes 'cat, , dog' " + TINY + " --out {out}", 2, "class 2 has an empty name"),
    ("seg-duplicate-name", "segment {img} --classes 'cat, dog, Cat' " + TINY + " --out {out}", 2,
     "class 1 and class 3"),
    ("seg-classes-and-file", "segment {img} --classes cat --classes-file {classes} " + TINY + " --out {out}", 2,
     "not allowed with"),
    ("seg-classes-file-missing", "segment {img} --classes-file {dir}/none.txt " + TINY + " --out {out}", 2,
     "--classes-file"),
    ("seg-classes-file-folder", "segment {img} --classes-file {dir} " + TINY + " --out {out}", 2, "is a folder"),
    ("seg-classes-file-empty", "segment {img} --classes-file {empty_txt} " + TINY + " --out {out}", 2,
     "class list is empty"),
    ("seg-out-is-file", "segment {img} --classes cat " + TINY + " --out {file}", 2, "is a file"),
    ("seg-unknown-preset", SEG + " --preset nope", 2, "invalid choice"),
    ("seg-batch-size-0", SEG + " --batch-size 0", 2, "must be at least 1"),
    ("seg-bad-dtype", SEG + " --dtype float8", 2, "invalid choice"),
    # ------------------------------------------------------------------ segment: settings
    ("seg-stride-0", SEG + " --set stride=0", 2, "--set stride=0 must be an integer of at least 1"),
    ("seg-stride-text", SEG + " --set stride=x", 2, "cannot read 'x' for stride"),
    ("seg-crop-negative", SEG + " --set crop=-1", 2, "--set crop=-1"),
    ("seg-readout-unknown", SEG + " --set readout=nope", 2, "--set readout='nope': unknown dense readout"),
    ("seg-refine-unknown", SEG + " --set refine=selfcorr,nope", 2, "--set refine: unknown feature refinement 'nope'"),
    ("seg-short-side-negative", SEG + " --set short_side=-5", 2, "--set short_side=-5"),
    ("seg-stride-over-crop", SEG + " --set stride=300", 2, "stride must not exceed crop"),
    ("seg-attention", SEG + " --set attention=nope", 2, "not a known attention variant"),
    ("seg-fuse-blocks-text", SEG + " --set fuse_blocks=7,x", 2, "cannot read '7,x' for fuse_blocks"),
    ("seg-fuse-blocks-range", SEG + " --set fuse_blocks=7,99", 2, "fused blocks must be in 1..11"),
    ("seg-templates-missing", SEG + " --set templates=none.txt", 2, "--set templates=none.txt names no file"),
    ("seg-templates-no-slot", SEG + " --set templates={bad_templates}", 2, "exactly one '{}'"),
    ("seg-logit-scale-nan", SEG + " --set logit_scale=nan", 2, "--set logit_scale=nan must be a finite number"),
    ("seg-prob-thd", SEG + " --set prob_thd=2", 2, "--set prob_thd=2.0 must be a number in [0, 1]"),
    ("seg-img-eng-coef", SEG + " --set img_eng_coef=5", 2, "--set img_eng_coef=5.0"),
    ("seg-area-thd", SEG + " --set area_thd=-1", 2, "--set area_thd=-1.0"),
    ("seg-unknown-setting", SEG + " --set nosuch=1", 2, "expected key=value with key one of"),
    ("seg-set-without-value", SEG + " --set stride", 2, "expected KEY=VALUE"),
    ("seg-bool-setting", SEG + " --set truncate_texts=maybe", 2, "expected true or false"),
    ("seg-long-class-name", "segment {img} --classes '" + LONG_NAME + "' " + TINY + " --out {out}", 2,
     "--set truncate_texts=true"),
    # ------------------------------------------------------------------ segment: files beside the classes
    ("seg-aux-missing", SEG + " --aux {dir}/none.txt", 2, "--aux"),
    ("seg-aux-count", "segment {img} --classes-file {classes} --aux {aux_count} " + TINY + " --out {out}", 2,
     "1 lines, but the class list has 3"),
    ("seg-aux-out-of-order", "segment {img} --classes-file {classes} --aux {aux_swapped} " + TINY + " --out {out}",
     2, "write the lines in class order"),
    # ------------------------------------------------------------------ segment: weights and device
    ("seg-weights-missing", "segment {img} --classes cat --weights {dir}/none.pt --out {out}", 2,
     "checkpoint not found"),
    ("seg-weights-folder", "segment {img} --classes cat --weights {dir} --out {out}", 2, "is a folder"),
    ("seg-weights-garbage", "segment {img} --classes cat --weights {garbage_pt} --out {out}", 2, "garbage.pt"),
    ("seg-weights-random-size", "segment {img} --classes cat --weights random-huge --out {out}", 2,
     "unknown random model"),
    ("seg-weights-offline", "segment {img} --classes cat --weights ViT-B/16 --out {out}", 2,
     "--weights random-tiny"),
    ("seg-device-cuda", SEG + " --device cuda", 2, "--device cuda: no CUDA GPU is usable here"),
    ("seg-device-name", SEG + " --device gpu", 2, "--device gpu: not a device name"),
    ("seg-undecodable-only", "segment {not_image} --classes cat " + TINY + " --set templates={templates} "
     "--out {out}", 2, "could be read; nothing was written"),
    # ------------------------------------------------------------------ eval
    ("eval-no-preset", "eval --data-root {voc}", 2, "--preset"),
    ("eval-unknown-preset", "eval --preset nope --data-root {voc} --out {out}", 2, "unknown preset 'nope'"),
    ("eval-open-vocab", "eval --preset open_vocab --data-root {voc} --out {out}", 2, "not tied to a benchmark"),
    ("eval-missing-root", "eval --preset itaclip_voc21 --data-root {dir}/none --out {out}", 2,
     "dataset root not found"),
    ("eval-root-is-file", "eval --preset itaclip_voc21 --data-root {file} --out {out}", 2, "--data-root"),
    ("eval-wrong-layout", "eval --preset itaclip_voc21 --data-root {dir} --out {out}", 2, "image folder"),
    ("eval-empty-split", "eval --preset itaclip_voc21 --data-root {voc_empty} --out {out}", 2, "lists no images"),
    ("eval-missing-split", "eval --preset itaclip_voc21 --data-root {voc_nosplit} --out {out}", 2,
     "split file"),
    ("eval-missing-label", "eval --preset itaclip_voc21 --data-root {voc_nolabel} " + TINY + " --out {out}", 2,
     "itaclip data check"),
    ("eval-num-samples-0", EVAL + " --num-samples 0", 2, "must be at least 1"),
    ("eval-workers-negative", EVAL + " --workers -1", 2, "must not be negative"),
    ("eval-stride-0", EVAL + " --set stride=0", 2, "--set stride=0"),
    ("eval-prob-thd", EVAL + " --set prob_thd=nan", 2, "--set prob_thd=nan"),
    ("eval-device-cuda", EVAL + " --device cuda", 2, "no CUDA GPU is usable here"),
    ("eval-weights-offline", "eval --preset itaclip_voc21 --data-root {voc} --weights ViT-B/16 --out {out}", 2,
     "could not download ViT-B/16"),
    ("eval-weights-missing", "eval --preset itaclip_voc21 --data-root {voc} --weights {dir}/x.pt --out {out}", 2,
     "checkpoint not found"),
    ("eval-out-is-file", "eval --preset itaclip_voc21 --data-root {voc} --out {file}", 2, "is a file"),
    ("eval-bad-factory", "eval --preset itaclip_voc21 --data-root {voc} --segmentor-factory nocolon --out {out}",
     2, "MODULE:FUNCTION"),
    # ------------------------------------------------------------------ data
    ("data-alone", "data", 2, "DATA_COMMAND"),
    ("data-check-missing-root", "data check {dir}/none --dataset voc21", 2, "not found"),
    ("data-check-unknown-dataset", "data check {voc} --dataset voc99", 2, "invalid choice"),
    ("data-check-max-images-0", "data check {voc} --dataset voc21 --max-images 0", 2, "must be at least 1"),
    ("data-check-empty-split", "data check {voc_empty} --dataset voc21 -q", 1, ""),
    ("data-synthetic-zero", "data synthetic voc21 {out} --num-images 0", 2, "must be at least 1"),
    ("data-synthetic-into-file", "data synthetic voc21 {file}", 2, "is a file"),
    ("data-coco-missing", "data coco-object {coco_root} -q", 2, "coco_missing"),
    # ------------------------------------------------------------------ texts
    ("texts-alone", "texts", 2, "ACTION"),
    ("texts-check-missing-classes", "texts check --classes {dir}/none.txt --aux {aux_count}", 2, "not found"),
    ("texts-check-missing-aux", "texts check --classes {classes} --aux {dir}/none.txt", 2, "not found"),
    ("texts-generate-top-p", "texts generate --classes {classes} --kind definitions --model m --out {out}/a.txt "
     "--top-p 2", 2, "must be in (0, 1]"),
    ("texts-generate-temperature", "texts generate --classes {classes} --kind definitions --model m "
     "--out {out}/a.txt --temperature 0", 2, "must be above 0"),
    ("texts-generate-missing-classes", "texts generate --classes {dir}/none.txt --kind definitions --model m "
     "--out {out}/a.txt", 2, "--classes"),
    ("texts-generate-device", "texts generate --classes {classes} --kind definitions --model m --out {out}/a.txt "
     "--device cuda", 2, "no CUDA GPU"),
]


def _argv(template: str, world: dict[str, Path], out: Path) -> list[str]:
    names = {key: str(value) for key, value in world.items()}
    return shlex.split(template.format(out=out, **names))


@pytest.mark.parametrize("row", CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_bad_invocation(row, world, tmp_path, capsys) -> None:
    _, template, expected_code, phrase = row
    out = tmp_path / "out"
    code = main(_argv(template, world, out))
    captured = capsys.readouterr()
    assert code == expected_code, captured.err
    assert phrase in captured.err, captured.err
    assert "Traceback" not in captured.err
    if expected_code == 2:
        assert not out.exists(), "a run refused before work left files behind"
        if "usage:" not in captured.err:  # argparse's own errors print the usage first
            assert len(captured.err.strip().splitlines()) <= 2, captured.err


def test_the_table_covers_every_command() -> None:
    assert len(CLI_ROWS) >= 40
    for command in ("segment", "eval", "data check", "data synthetic", "data coco-object", "texts check",
                    "texts generate"):  # fmt: skip
        assert any(row[1].startswith(command) for row in CLI_ROWS), command


@pytest.mark.parametrize(
    "arguments, phrase",
    [("segment {img} --classes cat --weights random-tiny --set stride=0 --out {out}", "--set stride=0"),
     ("segment {img} --classes cat --weights random-tiny --device cuda --out {out}", "--device cuda"),
     ("data check {dir}/none --dataset voc21", "not found")],
)  # fmt: skip
def test_real_stderr_has_no_traceback(arguments, phrase, world, tmp_path) -> None:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "itaclip_core.cli", *_argv(arguments, world, out)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 2 and phrase in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("itaclip ") and len(result.stderr.strip().splitlines()) <= 2
    assert not out.exists()


def test_make_spells_the_weights_variable(world, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ITACLIP_FLAG_NAMES", "--weights=WEIGHTS=;--out=DEMO_OUT=")
    assert main(_argv("segment {img} --classes cat --weights {dir}/none.pt --out {out}", world, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "WEIGHTS=" in err and "--weights" not in err


def test_makefile_demo_names_its_variables() -> None:
    text = (REPO / "Makefile").read_text()
    assert "ITACLIP_FLAG_NAMES" in text and "--weights=WEIGHTS=" in text


# ---------------------------------------------------------------------------------------------------- API rows
def _segmentor(**changes):
    from itaclip_core.segmentor import Segmentor

    settings = {"weights": "random-tiny", "device": "cpu", "cache_dir": None, **changes}
    return Segmentor.from_preset("open_vocab", **settings)


@pytest.fixture(scope="module")
def tiny_segmentor(world):
    return _segmentor(classes="cat, dog", overrides={"stride": 112, "pamr_steps": 0,
                                                     "templates": str(world["templates"])})


API_ROWS = [
    ("file-name-not-found", lambda w, s: _segmentor(classes="classes.lst"), TextFileError, "looks like a file name"),
    ("path-without-txt", lambda w, s: s.set_classes(str(w["dir"] / "my.classes")), TextFileError, "file name"),
    ("stride-0", lambda w, s: _segmentor(classes="cat", overrides={"stride": 0}), ConfigError, "stride=0"),
    ("prob-thd", lambda w, s: _segmentor(classes="cat", overrides=["prob_thd=2"]), ConfigError, "prob_thd=2.0"),
    ("unknown-preset", lambda w, s: get_preset("x"), ConfigError, "unknown preset 'x'"),
    ("validate", lambda w, s: SegmentorConfig(logit_scale=float("nan")).validate(), ConfigError, "logit_scale=nan"),
    ("validate-function", lambda w, s: validate_config(SegmentorConfig(area_thd=-1.0)), ConfigError, "area_thd"),
    ("device", lambda w, s: _segmentor(classes="cat", device="cuda"), DeviceError, "device='cuda'"),
    ("dtype", lambda w, s: _segmentor(classes="cat", dtype="int8"), ConfigError, "dtype='int8'"),
    ("weights-path", lambda w, s: load_clip(w["dir"] / "none.pt"), CheckpointError, "weights="),
    ("weights-offline", lambda w, s: load_clip("ViT-B/32", device="cpu"), UserError, "weights='random-tiny'"),
    ("folder-image", lambda w, s: s.predict(w["dir"]), ImageReadError, "is a folder"),
    ("url-image", lambda w, s: s.predict("https://example.com/cat.jpg"), ImageReadError, "not URLs"),
    ("no-classes", lambda w, s: _segmentor().predict(w["img"]), UserError, "no classes are set"),
    ("truncated-jpeg", lambda w, s: s.predict(w["broken_jpg"]), ImageReadError, "truncated or damaged"),
    ("tensor-shape", lambda w, s: s.predict(torch.zeros(5, 8, 8)), ImageReadError, "(3, H, W)"),
    ("batch-size", lambda w, s: s.predict_many([w["img"]], batch_size=0), ConfigError, "batch_size=0"),
    ("long-name", lambda w, s: s.set_classes([LONG_NAME]), TokenizerError, "truncate_texts=True"),
    ("aux-swapped", lambda w, s: s.set_classes(w["classes"], aux_file=w["aux_swapped"]), TextFileError,
     "class order"),
]


@pytest.mark.parametrize("row", API_ROWS, ids=[row[0] for row in API_ROWS])
def test_bad_api_call(row, world, tiny_segmentor) -> None:
    _, call, error_type, phrase = row
    with pytest.raises(error_type) as caught:
        call(world, tiny_segmentor)
    assert isinstance(caught.value, UserError)
    assert phrase in str(caught.value)
    assert "--set" not in str(caught.value) and "--weights" not in str(caught.value)  # Python's terms, not flags


# ---------------------------------------------------------------------------------------------------- what must work
def test_bom_class_file_and_background_display_name(world, tmp_path) -> None:
    from itaclip_core.segmentor import plan_classes
    from itaclip_core.presets import get_preset

    bom = tmp_path / "bom.lst"
    bom.write_bytes("\ufeffcat, kitten\ndog\n".encode("utf-8"))
    plan = plan_classes(get_preset("open_vocab"), str(bom))
    assert plan.vocab.class_names == ["cat", "dog"]
    voc = plan_classes(get_preset("itaclip_voc21"))
    from itaclip_core.text.classes import display_names

    assert display_names(voc.vocab, voc.background)[0] == "background" and voc.vocab.class_names[0] != "background"


def test_benchmark_preset_with_own_classes_keeps_architecture_and_says_so(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(_argv("segment {img} --preset itaclip_voc21 --classes 'cat, dog' " + TINY
                      + " --set templates={templates} --set stride=112 --set short_side=224 --out {out}",
                      world, out))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "keeps its architecture" in err and "no background class" in err
    areas = json.loads((out / "cat_areas.json").read_text())
    assert set(areas["classes"]) <= {"cat", "dog"} and areas["preset"] == "itaclip_voc21+own_classes"
    assert (areas["height"], areas["width"]) == (40, 56)


def test_background_is_displayed_as_background(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(_argv("segment {img} --preset itaclip_voc21 " + TINY + " --set templates={templates} "
                      "--set stride=112 --set short_side=224 --set prob_thd=1 --save-npz --out {out}", world, out))
    assert code == 0, capsys.readouterr().err
    areas = json.loads((out / "cat_areas.json").read_text())
    assert list(areas["classes"]) == ["background"]  # prob_thd=1 sends every pixel to class 0
    assert list(np.load(out / "cat.npz")["class_names"])[:2] == ["background", "aeroplane"]


def test_finished_images_are_kept_when_one_fails(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(_argv("segment {img} {broken_jpg} --classes 'cat, dog' " + TINY + " --set templates={templates} "
                      "--set stride=112 --out {out}", world, out))
    err = capsys.readouterr().err
    assert code == 1 and "truncated or damaged" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["cat_areas.json", "cat_labels.png", "cat_overlay.png"]


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom itaclip_core.cli import main\nassert main(['--help']) == 0\n"
            "assert main(['segment', '--help']) == 0\nprint('torch' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "False"


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("itaclip-core ")


def test_weights_help_lists_every_model_name() -> None:
    from itaclip_core.cli.common import MODEL_NAMES

    assert set(MODEL_NAMES) == set(weights_module.REGISTRY)


def test_eval_refuses_a_class_file_of_another_size_before_loading(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(_argv(EVAL + " --set classes={classes} --weights {dir}/never-loaded.pt", world, out))
    err = capsys.readouterr().err
    assert code == 2 and "has 3 classes but Pascal VOC" in err and not out.exists()


def test_an_unreadable_label_mid_run_is_reported_and_finished_images_kept(world, tmp_path, capsys) -> None:
    root = tmp_path / "voc"
    shutil.copytree(world["voc"], root)
    second = (root / "VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[1]
    (root / "VOC2012/SegmentationClass" / f"{second}.png").write_bytes(b"\x89PNG damaged")
    out = tmp_path / "out"
    arguments = (f"eval --preset itaclip_voc21 --data-root {root} {TINY} --workers 1 --out {out} "
                 f"--set templates={world['templates']} --set stride=112 --set short_side=224")  # fmt: skip
    assert main(shlex.split(arguments)) == 2
    err = capsys.readouterr().err
    assert "could not read the label file" in err and "1 images scored so far are kept" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    records = (out / "records" / "rank0.jsonl").read_text().splitlines()
    assert len(records) == 1  # the first image's record is kept for the next run


def test_aux_texts_without_weight_are_noted(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(_argv("segment {img} --classes-file {classes} --aux {aux_ordered} " + TINY
                      + " --set templates={templates} --set stride=112 --out {out}", world, out))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "aux_coef is 0" in err and "--set aux_coef=0.1" in err
