"""Benchmark datasets in MMSegmentation's layouts, synthetic datasets, COCO-Object conversion, dataset checks."""

from itaclip_core.data.base import IGNORE_INDEX, DatasetError, DatasetSpec, Sample, SegDataset, read_label_png
from itaclip_core.data.registry import DATASET_NAMES, get_dataset, get_spec

__all__ = [
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "DatasetError",
    "DatasetSpec",
    "Sample",
    "SegDataset",
    "get_dataset",
    "get_spec",
    "read_label_png",
]
