"""The benchmark registry: the eight evaluation datasets of ITACLIP and SCLIP by name.

| name | layout (under the root) | labels after loading |
|---|---|---|
| voc21 | `VOC2012/JPEGImages`, `VOC2012/SegmentationClass`, split `ImageSets/Segmentation/val.txt` | 0-20, 255 |
| voc20 | same | background -> 255, k -> k-1 |
| context60 | `VOC2010/JPEGImages`, `VOC2010/SegmentationClassContext`, split `.../SegmentationContext/val.txt` | 0-59 |
| context59 | same | 0 -> 255, k -> k-1 |
| coco_stuff | `images/val2017`, `annotations/val2017/*_labelTrainIds.png` | 0-170, 255 |
| coco_object | `images/val2017`, `annotations/val2017/*_instanceTrainIds.png` | 0-80, no ignore |
| cityscapes | `leftImg8bit/val/<city>/*_leftImg8bit.png`, `gtFine/val/<city>/*_gtFine_labelTrainIds.png` | 0-18, 255 |
| ade20k | `images/validation`, `annotations/validation` | 0 -> 255, k -> k-1 |
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from itaclip_core.data.base import DatasetError, DatasetSpec, SegDataset
from itaclip_core.resources import text_file

DATASET_NAMES = ("voc21", "voc20", "context60", "context59", "coco_stuff", "coco_object", "cityscapes", "ade20k")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# COCO-Stuff 164k: the raw stuff-thing maps use ids 0..181 (0 = person) with these eleven ids unused; the
# remaining 171 ids, in increasing order, are the train ids 0..170. Ids 0..90 are things, 91..181 stuff.
COCO_UNUSED_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})
COCO_USED_IDS = tuple(i for i in range(182) if i not in COCO_UNUSED_IDS)
COCO_MAX_THING_ID = 90


def _first_variants(relative: str) -> tuple[str, ...]:
    """First name variant of each line of a class file under texts/class_names/."""
    lines = text_file(f"class_names/{relative}").read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.split(",")[0].strip() for line in lines)


@lru_cache(maxsize=None)
def _specs() -> dict[str, DatasetSpec]:
    voc_raw = frozenset(range(21)) | {255}
    context_raw = frozenset(range(60))
    context60 = _first_variants("sclip/cls_context60.txt")
    coco_object = ("background",) + _first_variants("sclip/cls_coco_object.txt")[1:]
    voc = dict(
        base_dir="VOC2012", image_dir="JPEGImages", label_dir="SegmentationClass", image_suffix=".jpg",
        label_suffix=".png", split_file="ImageSets/Segmentation/val.txt", raw_values=voc_raw,
        quoted_size=1449,
    )  # fmt: skip
    context = dict(
        base_dir="VOC2010", image_dir="JPEGImages", label_dir="SegmentationClassContext", image_suffix=".jpg",
        label_suffix=".png", split_file="ImageSets/SegmentationContext/val.txt", raw_values=context_raw,
        quoted_size=5105,
    )  # fmt: skip
    coco = dict(image_dir="images/val2017", label_dir="annotations/val2017", image_suffix=".jpg", quoted_size=5000)
    specs = [
        DatasetSpec("voc21", "Pascal VOC 2012 (21 classes, with background)", num_classes=21,
                    class_names=VOC_CLASSES, **voc),
        DatasetSpec("voc20", "Pascal VOC 2012 (20 classes, without background)", num_classes=20,
                    class_names=VOC_CLASSES[1:], reduce_zero_label=True, **voc),
        DatasetSpec("context60", "Pascal Context (60 classes, with background)", num_classes=60,
                    class_names=context60, **context),
        DatasetSpec("context59", "Pascal Context (59 classes, without background)", num_classes=59,
                    class_names=context60[1:], reduce_zero_label=True, **context),
        DatasetSpec("coco_stuff", "COCO-Stuff 164k (171 classes)", num_classes=171,
                    class_names=_first_variants("sclip/cls_coco_stuff.txt"), label_suffix="_labelTrainIds.png",
                    raw_values=frozenset(range(171)) | {255}, **coco),
        DatasetSpec("coco_object", "COCO-Object (81 classes, with background)", num_classes=81,
                    class_names=coco_object, label_suffix="_instanceTrainIds.png",
                    raw_values=frozenset(range(81)), **coco),
        DatasetSpec("cityscapes", "Cityscapes (19 classes)", image_dir="leftImg8bit/val", label_dir="gtFine/val",
                    image_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelTrainIds.png", num_classes=19,
                    class_names=CITYSCAPES_CLASSES, raw_values=frozenset(range(19)) | {255}, quoted_size=500),
        DatasetSpec("ade20k", "ADE20K (150 classes)", image_dir="images/validation",
                    label_dir="annotations/validation", image_suffix=".jpg", label_suffix=".png", num_classes=150,
                    class_names=_first_variants("sclip/cls_ade20k.txt"), reduce_zero_label=True,
                    raw_values=frozenset(range(151)), quoted_size=2000),
    ]  # fmt: skip
    return {spec.name: spec for spec in specs}


def get_spec(name: str) -> DatasetSpec:
    """The layout and label convention of benchmark `name` (one of `DATASET_NAMES`)."""
    specs = _specs()
    if name not in specs:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return specs[name]


def get_dataset(name: str, root: str | Path) -> SegDataset:
    """Open the benchmark `name` stored under `root` in MMSegmentation's layout.

    Args:
        name: one of `DATASET_NAMES` ("voc21", "voc20", "context60", "context59", "coco_stuff", "coco_object",
            "cityscapes", "ade20k").
        root: the dataset root, e.g. `data/VOCdevkit` for VOC (holding `VOC2012/`; the `VOC2012` folder itself
            is accepted too), `data/VOCdevkit` or `VOC2010` for Context, `data/coco_stuff164k` for the COCO
            benchmarks, `data/cityscapes`, `data/ade/ADEChallengeData2016`.

    Raises:
        DatasetError: unknown name, or the root lacks the benchmark's image folder or split file.
    """
    return SegDataset(get_spec(name), root)
