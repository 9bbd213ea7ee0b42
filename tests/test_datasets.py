"""Dataset readers: file order, label handling of each benchmark, synthetic layouts, COCO-Object conversion."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itaclip_core.data import DATASET_NAMES, DatasetError, get_dataset, get_spec
from itaclip_core.data.coco_object import convert_coco_object, stuff_to_object, stuff_to_train_ids
from itaclip_core.data.synthetic import DEFAULT_SIZES, make_synthetic_dataset, voc_palette

NUM_CLASSES = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_stuff": 171, "coco_object": 81,
               "cityscapes": 19, "ade20k": 150}  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synthetic")
    return {name: make_synthetic_dataset(name, base / name, num_images=4, seed=1) for name in DATASET_NAMES}


def _write_png(path: Path, values: np.ndarray, palette: bool = False) -> None:
    if palette:
        image = Image.frombytes("P", (values.shape[1], values.shape[0]), values.astype(np.uint8).tobytes())
        image.putpalette(voc_palette())
    else:
        image = Image.fromarray(values.astype(np.uint8))
    image.save(path)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_layout_opens_with_matching_sizes(synthetic_roots: dict[str, Path], name: str) -> None:
    dataset = get_dataset(name, synthetic_roots[name])
    assert len(dataset) == 4
    assert dataset.num_classes == NUM_CLASSES[name] == len(dataset.class_names)
    sizes = set()
    for index, sample in enumerate(dataset.samples):
        assert sample.image_path.is_file() and sample.label_path.is_file()
        label = dataset.load_label(index)
        with Image.open(sample.image_path) as image:
            assert label.shape == (image.height, image.width)
        assert label.dtype == np.uint8
        values = set(np.unique(label).tolist())
        assert values <= set(range(dataset.num_classes)) | {255}
        sizes.add(label.shape)
    assert sizes == set(DEFAULT_SIZES)


@pytest.mark.parametrize("name", ["voc21", "voc20", "context60", "context59"])
def test_split_file_order_is_kept(synthetic_roots: dict[str, Path], name: str) -> None:
    dataset = get_dataset(name, synthetic_roots[name])
    split = dataset.split_path.read_text().split()
    assert [s.name for s in dataset.samples] == split
    assert split != sorted(split)  # the synthetic split is deliberately not alphabetical
    train = (dataset.split_path.parent / "train.txt").read_text().split()
    assert train and (dataset.image_dir / f"{train[0]}.jpg").is_file()
    assert train[0] not in split


@pytest.mark.parametrize("name", ["coco_stuff", "coco_object", "cityscapes", "ade20k"])
def test_scanned_layouts_are_sorted_by_path(synthetic_roots: dict[str, Path], name: str) -> None:
    dataset = get_dataset(name, synthetic_roots[name])
    paths = [str(s.image_path) for s in dataset.samples]
    assert paths == sorted(paths)
    suffix = get_spec(name).image_suffix
    assert all(p.endswith(suffix) for p in paths)


def test_cityscapes_names_keep_city_folder(synthetic_roots: dict[str, Path]) -> None:
    dataset = get_dataset("cityscapes", synthetic_roots["cityscapes"])
    sample = dataset.samples[0]
    city, stem = sample.name.split("/")
    assert sample.image_path.parent.name == city and sample.image_path.name == f"{stem}_leftImg8bit.png"
    assert sample.label_path.name == f"{stem}_gtFine_labelTrainIds.png"
    assert sample.label_path.parent.name == city


def test_voc_palette_png_reads_as_indices(synthetic_roots: dict[str, Path]) -> None:
    dataset = get_dataset("voc21", synthetic_roots["voc21"])
    path = dataset.samples[0].label_path
    with Image.open(path) as image:
        assert image.mode == "P"
        colours = np.array(image.convert("RGB"))
    label = dataset.load_label(0)
    assert 255 in label  # VOC's boundary outlines are kept as the ignore value
    assert label.max() == 255 and not np.array_equal(label, colours[:, :, 0])
    # reading colours would give e.g. 128/192 values: the loader gives class indices
    assert set(np.unique(label).tolist()) <= set(range(21)) | {255}


# Hand-written on-disk values and what each benchmark must load from them.
HAND_CASES = {
    "voc21": ([[0, 1, 20, 255]], [[0, 1, 20, 255]]),
    "voc20": ([[0, 1, 20, 255]], [[255, 0, 19, 255]]),
    "context60": ([[0, 1, 59, 30]], [[0, 1, 59, 30]]),
    "context59": ([[0, 1, 59, 30]], [[255, 0, 58, 29]]),
    "coco_stuff": ([[0, 170, 255, 80]], [[0, 170, 255, 80]]),
    "coco_object": ([[0, 80, 1, 40]], [[0, 80, 1, 40]]),
    "cityscapes": ([[0, 18, 255, 7]], [[0, 18, 255, 7]]),
    "ade20k": ([[0, 1, 150, 75]], [[255, 0, 149, 74]]),
}


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_label_conversion_on_hand_written_files(tmp_path: Path, name: str) -> None:
    root = make_synthetic_dataset(name, tmp_path, num_images=1, sizes=[(8, 8)])
    dataset = get_dataset(name, root)
    raw, expected = (np.array(a) for a in HAND_CASES[name])
    raw = np.repeat(raw, 2, axis=0)  # (2, 4)
    expected = np.repeat(expected, 2, axis=0)
    _write_png(dataset.samples[0].label_path, raw, palette=name.startswith("voc"))
    assert dataset.load_label(0).tolist() == expected.tolist()


def test_reduce_zero_label_keeps_255_and_shifts_others(tmp_path: Path) -> None:
    root = make_synthetic_dataset("ade20k", tmp_path, num_images=1, sizes=[(8, 8)])
    dataset = get_dataset("ade20k", root)
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    _write_png(dataset.samples[0].label_path, raw)
    loaded = dataset.load_label(0).reshape(-1)
    assert loaded[0] == 255 and loaded[255] == 255
    assert loaded[1:255].tolist() == list(range(0, 254))


def test_colour_label_file_is_an_error(tmp_path: Path) -> None:
    root = make_synthetic_dataset("ade20k", tmp_path, num_images=1, sizes=[(8, 8)])
    dataset = get_dataset("ade20k", root)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(dataset.samples[0].label_path)
    with pytest.raises(DatasetError, match="colour image"):
        dataset.load_label(0)


def test_missing_folders_and_split_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        get_dataset("pascal", tmp_path)
    with pytest.raises(DatasetError, match="VOC2012/JPEGImages"):
        get_dataset("voc21", tmp_path)
    root = make_synthetic_dataset("voc21", tmp_path / "voc", num_images=2)
    (root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="split file"):
        get_dataset("voc21", root)


def test_voc_root_may_be_the_voc2012_folder(synthetic_roots: dict[str, Path]) -> None:
    outer = get_dataset("voc21", synthetic_roots["voc21"])
    inner = get_dataset("voc21", synthetic_roots["voc21"] / "VOC2012")
    assert [s.image_path for s in inner.samples] == [s.image_path for s in outer.samples]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_synthetic_data_is_deterministic(tmp_path: Path) -> None:
    first = make_synthetic_dataset("coco_stuff", tmp_path / "a", num_images=3, seed=5)
    second = make_synthetic_dataset("coco_stuff", tmp_path / "b", num_images=3, seed=5)
    other = make_synthetic_dataset("coco_stuff", tmp_path / "c", num_images=3, seed=6)
    assert _tree_digest(first) == _tree_digest(second) != _tree_digest(other)


def test_synthetic_sizes_cover_small_and_extreme_images() -> None:
    short_sides = [min(s) for s in DEFAULT_SIZES]
    ratios = [max(s) / min(s) for s in DEFAULT_SIZES]
    assert min(short_sides) < 224 and max(ratios) > 4


def test_synthetic_raw_conventions_on_disk(synthetic_roots: dict[str, Path]) -> None:
    def raw_values(directory: Path, pattern: str) -> set[int]:
        values: set[int] = set()
        for path in directory.glob(pattern):
            values |= set(np.unique(np.array(Image.open(path))).tolist())
        return values

    coco = synthetic_roots["coco_stuff"] / "annotations" / "val2017"
    originals = raw_values(coco, "*[0-9].png")
    assert 255 in originals and any(v > 90 for v in originals) and max(originals - {255}) <= 181
    ade = raw_values(synthetic_roots["ade20k"] / "annotations" / "validation", "*.png")
    assert 0 in ade  # ADE's "other"
    voc = raw_values(synthetic_roots["voc21"] / "VOC2012" / "SegmentationClass", "*.png")
    assert 255 in voc and 0 in voc


def test_easy_images_use_flat_class_colours(tmp_path: Path) -> None:
    from itaclip_core.data.synthetic import class_colour

    root = make_synthetic_dataset("cityscapes", tmp_path, num_images=1, easy=True, sizes=[(64, 96)])
    dataset = get_dataset("cityscapes", root)
    label = dataset.load_label(0)
    image = np.array(Image.open(dataset.samples[0].image_path))
    for value in set(np.unique(label).tolist()) - {255}:
        pixels = image[label == value]
        assert (pixels == np.array(class_colour(value))).all()


# ---- COCO-Object and COCO-Stuff train ids from the original stuff-thing maps ----

# raw id -> expected COCO-Object value, worked out from the published conversion by hand:
# used thing ids map to (train id + 1), stuff and 255 to 0, ids the conversion does not list stay as they are.
OBJECT_CASES = {0: 1, 1: 2, 5: 6, 10: 11, 12: 12, 24: 24, 26: 25, 89: 80, 91: 0, 120: 0, 181: 0, 255: 0,
                11: 11, 90: 90, 182: 182}  # fmt: skip
STUFF_CASES = {0: 0, 10: 10, 12: 11, 89: 79, 91: 80, 92: 81, 181: 170, 255: 255, 11: 11, 200: 200}


def test_object_and_stuff_maps_from_hand_built_raw() -> None:
    raw = np.array([list(OBJECT_CASES)], dtype=np.uint8)
    assert stuff_to_object(raw).tolist() == [list(OBJECT_CASES.values())]
    raw = np.array([list(STUFF_CASES)], dtype=np.uint8)
    assert stuff_to_train_ids(raw).tolist() == [list(STUFF_CASES.values())]


def test_every_used_thing_id_maps_to_1_to_80() -> None:
    from itaclip_core.data.registry import COCO_USED_IDS

    things = [i for i in COCO_USED_IDS if i <= 90]
    assert len(things) == 80 and len(COCO_USED_IDS) == 171
    mapped = stuff_to_object(np.array([things], dtype=np.uint8))[0].tolist()
    assert mapped == list(range(1, 81))


def test_conversion_writes_resumes_and_copies(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    annotations = root / "annotations" / "val2017"
    (root / "images" / "val2017").mkdir(parents=True)
    annotations.mkdir(parents=True)
    raws = {"000000000001": np.array([[0, 91], [255, 89]], np.uint8), "000000000002": np.array([[5, 5]], np.uint8)}
    for stem, raw in raws.items():
        Image.fromarray(raw).save(annotations / f"{stem}.png")
        image = Image.fromarray(np.zeros((raw.shape[0], raw.shape[1], 3), np.uint8))
        image.save(root / "images" / "val2017" / f"{stem}.jpg")
        Image.fromarray(raw).save(annotations / f"{stem}_labelTrainIds.png")  # converted files are not inputs
    summary = convert_coco_object(root, progress=False)
    assert (summary.converted, summary.skipped) == (2, 0)
    out = np.array(Image.open(annotations / "000000000001_instanceTrainIds.png"))
    assert out.tolist() == [[1, 0], [0, 80]]
    assert np.array(Image.open(annotations / "000000000002_instanceTrainIds.png")).tolist() == [[6, 6]]
    assert not list(annotations.glob("*TrainIds_instanceTrainIds.png"))
    again = convert_coco_object(root, progress=False)
    assert (again.converted, again.skipped) == (0, 2)
    (annotations / "000000000002_instanceTrainIds.png").unlink()  # as if interrupted before this file
    resumed = convert_coco_object(root, progress=False)
    assert (resumed.converted, resumed.skipped) == (1, 1)
    copied = convert_coco_object(root, tmp_path / "out", progress=False)
    assert copied.images_copied == 2 and copied.converted == 2
    dataset = get_dataset("coco_object", tmp_path / "out")
    assert [s.name for s in dataset.samples] == sorted(raws)
    assert dataset.load_label(0).tolist() == [[1, 0], [0, 80]]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_conversion_without_maps_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="annotations/val2017"):
        convert_coco_object(tmp_path, progress=False)
    (tmp_path / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="stuffthingmaps"):
        convert_coco_object(tmp_path, progress=False)
