"""`itaclip data check` finds every malformed case it knows; `data coco-object` and `data synthetic` work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from itaclip_core.cli import main
from itaclip_core.data import DATASET_NAMES, get_dataset
from itaclip_core.data.check import ADVICE, check_dataset
from itaclip_core.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pristine")
    return {name: make_synthetic_dataset(name, base / name, num_images=3, seed=2) for name in DATASET_NAMES}


def _copy(pristine: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine[name], tmp_path / name))


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_clean_datasets_pass(pristine: dict[str, Path], name: str, capsys: pytest.CaptureFixture) -> None:
    assert check_dataset(name, pristine[name], progress=False) == []
    assert main(["data", "check", str(pristine[name]), "--dataset", name, "-q"]) == 0
    out = capsys.readouterr().out
    assert "OK: no problems found" in out and "3 images listed" in out


def _first(root: Path, name: str):
    return get_dataset(name, root).samples[0]


def _remove_split(root: Path) -> Path:
    path = root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    path.unlink()
    return path


def _remove_label(root: Path) -> Path:
    path = _first(root, "voc21").label_path
    path.unlink()
    return path


def _orphan_label(root: Path) -> Path:
    path = _first(root, "voc21").label_path.with_name("2099_000001.png")
    shutil.copy(_first(root, "voc21").label_path, path)
    return path


def _unlisted_image(root: Path) -> Path:
    split = root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + "2099_000002\n")
    return root / "VOC2012" / "JPEGImages" / "2099_000002.jpg"


def _resize_label(root: Path) -> Path:
    path = _first(root, "voc21").label_path
    with Image.open(path) as image:
        image.crop((0, 0, image.width - 3, image.height)).save(path)
    return path


def _bad_values(root: Path) -> Path:
    path = _first(root, "voc21").label_path
    with Image.open(path) as image:
        array = np.array(image)
        palette = image.getpalette()
    array[0, :5] = 42  # VOC has 0..20 and 255
    out = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
    out.putpalette(palette)
    out.save(path)
    return path


def _garbage_image(root: Path) -> Path:
    path = _first(root, "voc21").image_path
    path.write_bytes(b"not a jpeg at all")
    return path


def _garbage_label(root: Path) -> Path:
    path = _first(root, "voc21").label_path
    path.write_bytes(b"\x89PNG but truncated")
    return path


def _colour_label(root: Path) -> Path:
    path = _first(root, "voc21").label_path
    with Image.open(path) as image:
        image.convert("RGB").save(path)
    return path


def _remove_label_dir(root: Path) -> Path:
    path = root / "VOC2012" / "SegmentationClass"
    shutil.rmtree(path)
    return path


def _empty_split(root: Path) -> Path:
    (root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    return root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"


def _wrong_root(root: Path) -> Path:
    shutil.rmtree(root / "VOC2012" / "JPEGImages")
    return root / "VOC2012" / "JPEGImages"


BREAKAGES: dict[str, Callable[[Path], Path]] = {
    "missing_split": _remove_split,
    "missing_label": _remove_label,
    "orphan_label": _orphan_label,
    "missing_image": _unlisted_image,
    "size_mismatch": _resize_label,
    "unexpected_values": _bad_values,
    "unreadable_image": _garbage_image,
    "unreadable_label": _garbage_label,
    "not_single_channel": _colour_label,
    "missing_label_dir": _remove_label_dir,
    "empty": _empty_split,
    "missing_image_dir": _wrong_root,
}


def test_every_problem_kind_has_a_test_case() -> None:
    assert set(BREAKAGES) | {"missing_root"} == set(ADVICE)


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_each_malformed_case_is_reported(
    pristine: dict[str, Path], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture
) -> None:
    root = _copy(pristine, "voc21", tmp_path)
    broken_path = BREAKAGES[kind](root)
    problems = check_dataset("voc21", root, progress=False)
    matching = [p for p in problems if p.kind == kind]
    assert matching, f"expected a {kind} problem, got {problems}"
    assert any(p.path == broken_path for p in matching)
    assert main(["data", "check", str(root), "--dataset", "voc21", "-q"]) == 1
    out = capsys.readouterr().out
    assert kind in out and str(broken_path) in out and ADVICE[kind] in out


def test_missing_root(tmp_path: Path) -> None:
    problems = check_dataset("ade20k", tmp_path / "nowhere", progress=False)
    assert [p.kind for p in problems] == ["missing_root"]


def test_values_are_checked_against_each_benchmark(pristine: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(pristine, "coco_object", tmp_path)
    label_path = _first(root, "coco_object").label_path
    array = np.array(Image.open(label_path))
    array[0, 0] = 255  # COCO-Object maps have no ignore value
    Image.fromarray(array).save(label_path)
    problems = check_dataset("coco_object", root, progress=False)
    assert [p.kind for p in problems] == ["unexpected_values"] and "255" in problems[0].message
    assert check_dataset("coco_stuff", root, progress=False) == []  # its own files are untouched


def test_missing_coco_object_maps_point_to_the_converter(
    pristine: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _copy(pristine, "coco_object", tmp_path)
    for path in (root / "annotations" / "val2017").glob("*_instanceTrainIds.png"):
        path.unlink()
    problems = check_dataset("coco_object", root, progress=False)
    assert {p.kind for p in problems} == {"missing_label"} and len(problems) == 3
    assert all("itaclip data coco-object" in p.message for p in problems)
    assert main(["data", "coco-object", str(root), "-q"]) == 0
    assert "3 converted" in capsys.readouterr().out
    assert check_dataset("coco_object", root, progress=False) == []
    assert main(["data", "coco-object", str(root), "-q"]) == 0
    assert "0 converted, 3 already there" in capsys.readouterr().out
    assert main(["data", "coco-object", str(tmp_path / "nothing"), "-q"]) == 2
    assert "annotations/val2017" in capsys.readouterr().err


def test_synthetic_command_writes_a_checkable_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "synthetic", "cityscapes", str(tmp_path / "city"), "--num-images", "2", "--easy"]) == 0
    assert len(get_dataset("cityscapes", tmp_path / "city")) == 2
    assert check_dataset("cityscapes", tmp_path / "city", progress=False) == []
