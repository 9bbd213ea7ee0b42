"""The benchmark runner: every image of a dataset through a segmentor, scored as MMSegmentation's IoUMetric.

- Images are decoded and resized (`prepare_image`) and labels loaded in DataLoader worker processes, one image
  per batch (sizes differ), overlapping with inference.
- Each scored image is written at once to this process's record file (see `records.py`), so a run killed at
  any point continues where it stopped, recomputing nothing that was saved, and ends with the same numbers.
- Under `torchrun` each process takes the images with `index % world_size == rank` and the counts are summed
  over processes; only rank 0 writes the reports.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from itaclip_core.data.base import DatasetError, SegDataset
from itaclip_core.errors import ConfigError, UserError
from itaclip_core.evaluation.distributed import DistContext
from itaclip_core.evaluation.records import (
    ImageRecord,
    RecordWriter,
    ResumeError,
    check_or_write_manifest,
    read_records,
    record_path,
    repair_tail,
    sparse_confusion,
)
from itaclip_core.inference.preprocess import PreparedImage, prepare_image, read_image_bgr
from itaclip_core.metrics import (
    IoUAccumulator,
    TrimapAccumulator,
    confusion_counts,
    intersect_and_union,
    trimap_counts,
)


class SegmentorLike(Protocol):
    """What the runner needs from a segmentor (`itaclip_core.segmentor.Segmentor` has it)."""

    config: Any  # has `.dataset`, `.short_side` (and optionally `.long_side`), `.name` and `to_dict()`
    class_names: list[str]
    weights_id: str

    def predict_prepared(self, prepared: PreparedImage) -> Any:
        """Returns an object whose `labels` is an (H, W) int64 map at the original size."""


@dataclass
class EvalOptions:
    """How to run an evaluation."""

    out_dir: Path  # where run.json, records/, the reports and visualisations go
    preset: str  # preset name (recorded; part of the resume check)
    weights_id: str  # identity of the weights (recorded; part of the resume check)
    overrides: list[str] = field(default_factory=list)  # `key=value` settings changed from the preset
    num_samples: int | None = None  # evaluate only the first N images (dataset order)
    save_preds: Path | None = None  # folder for each image's predicted label map as a PNG
    save_vis: int = 0  # write image / prediction / ground-truth panels of the first K images
    workers: int = 2  # DataLoader worker processes (0: load in the main process)
    progress: bool = True  # show a progress bar (rank 0 only)
    label: str | None = None  # what the progress bar names (None: the preset)


class _EvalItems(Dataset):
    """Loads (index, prepared image, label) for the indices to evaluate; runs in worker processes."""

    def __init__(self, dataset: SegDataset, indices: Sequence[int], short_side: int, long_side: int = 2048,
                 centre_crop: int | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.short_side = short_side
        self.long_side = long_side
        self.centre_crop = centre_crop  # CLIPtrase's protocol: image and label centre-cropped to n x n

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, PreparedImage | None, np.ndarray | str]:
        """(index, prepared image, label); (index, None, message) when a file cannot be read, so that the main
        process reports it cleanly (a worker's exception would carry the worker's traceback)."""
        index = self.indices[position]
        sample = self.dataset.samples[index]
        try:
            if self.centre_crop:
                from itaclip_core.methods.cliptrase import crop_label_map, prepare_centre_crop

                prepared = prepare_centre_crop(sample.image_path, self.centre_crop, name=sample.name)
                return index, prepared, crop_label_map(self.dataset.load_label(index), self.centre_crop)
            prepared = prepare_image(sample.image_path, self.short_side, self.long_side, name=sample.name)
            return index, prepared, self.dataset.load_label(index)
        except UserError as error:
            return index, None, str(error)


def _single(batch: list) -> Any:
    """Collate a batch of one item: the item itself."""
    return batch[0]


def _palette_name(dataset_name: str) -> str:
    for prefix, name in (("voc", "voc"), ("context", "context"), ("coco", "coco"), ("cityscapes", "cityscapes")):
        if dataset_name.startswith(prefix):
            return name
    return "ade20k"


def _labels_of(prediction: Any, name: str) -> np.ndarray:
    labels = getattr(prediction, "labels", prediction)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"the segmentor returned labels of shape {labels.shape} for {name}: expected (H, W)")
    return labels


def _save_outputs(
    options: EvalOptions, dataset: SegDataset, index: int, labels: np.ndarray, gt: np.ndarray, palette: np.ndarray
) -> None:
    from itaclip_core import vis

    name = dataset.samples[index].name
    if options.save_preds is not None:
        vis.save_label_png(options.save_preds / f"{name}.png", labels, palette)
    if index < options.save_vis:
        image_rgb = cv2.cvtColor(read_image_bgr(dataset.samples[index].image_path), cv2.COLOR_BGR2RGB)
        if image_rgb.shape[:2] != labels.shape:  # a centre-crop protocol: show the crop that was scored
            from itaclip_core.methods.cliptrase import centre_crop_image, read_rgb

            image_rgb = np.asarray(centre_crop_image(read_rgb(dataset.samples[index].image_path), labels.shape[0]))
        panel = vis.side_by_side(image_rgb, labels, gt, dataset.class_names, palette=palette,
                                 ignore_index=dataset.ignore_index)  # fmt: skip
        vis.save_rgb_png(options.out_dir / "vis" / f"{name}.png", panel)


def _running_miou(accumulator: IoUAccumulator) -> str:
    if accumulator.num_images == 0:
        return "-"
    value = accumulator.results()["mIoU"]
    return "nan" if math.isnan(value) else f"{value:.2f}"


def check_eval_files(dataset: SegDataset, num_samples: int | None = None) -> int:
    """Check, before any work, that there are images to evaluate and that each has its image and label file.

    Args:
        dataset: the benchmark.
        num_samples: only the first N images are evaluated (None: all).

    Returns:
        The number of images to evaluate.

    Raises:
        DatasetError: the list is empty (naming the split file or image folder), or files are missing (the first
            few named, with the `itaclip data check` command that lists them all).
    """
    if num_samples is not None and num_samples < 1:
        raise DatasetError(f"num_samples={num_samples}: must be at least 1 (or None for every image)",
                           cli=f"--num-samples {num_samples}: must be at least 1")  # fmt: skip
    total = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    source = (f"the split file {dataset.split_path} lists no images" if dataset.split_path is not None
              else f"the image folder {dataset.image_dir} holds no '*{dataset.spec.image_suffix}' images")  # fmt: skip
    if total == 0:
        raise DatasetError(f"{dataset.spec.title} at {dataset.root}: {source}; nothing to evaluate")
    missing = []
    for sample in dataset.samples[:total]:
        for path, what in ((sample.image_path, "image"), (sample.label_path, "label map")):
            if not path.is_file():
                missing.append(f"{what} {path}")
    if missing:
        shown = "; ".join(missing[:2]) + (f"; and {len(missing) - 2} more" if len(missing) > 2 else "")
        raise DatasetError(
            f"{dataset.spec.title}: {len(missing)} file(s) of the {total} images to evaluate are missing: {shown}.\n"
            f"List every problem with: itaclip data check {dataset.root} --dataset {dataset.name}"
        )
    return total


def evaluate(
    segmentor: SegmentorLike, dataset: SegDataset, options: EvalOptions, context: DistContext | None = None
) -> dict[str, Any]:
    """Evaluate `segmentor` on `dataset`, resuming from the records in `options.out_dir`.

    Args:
        segmentor: the model (see `SegmentorLike`); its `config.short_side` sets the resize.
        dataset: the benchmark, e.g. `get_dataset(segmentor.config.dataset, root)`.
        options: output directory, settings recorded for resuming, outputs to save.
        context: the process's place in a multi-process run (default: a single process).

    Returns:
        The results (the content of results.json) on every process.

    Raises:
        ResumeError: `out_dir` holds a run with other settings or another image list.
        ValueError: a prediction does not have its label's size, or the class counts differ.
    """
    from itaclip_core import vis
    from itaclip_core.evaluation.reports import build_results, write_reports

    context = context or DistContext()
    started = time.time()
    out_dir = Path(options.out_dir)
    num_classes = dataset.num_classes
    if len(segmentor.class_names) != num_classes:
        raise ConfigError(
            f"the segmentor has {len(segmentor.class_names)} classes but {dataset.spec.title} has {num_classes}; "
            f"use a preset made for {dataset.name} (and its own class file)"
        )
    total = check_eval_files(dataset, options.num_samples)
    names = [sample.name for sample in dataset.samples[:total]]
    manifest = {
        "preset": options.preset,
        "overrides": list(options.overrides),
        "weights_id": options.weights_id,
        "dataset": dataset.name,
        "num_samples": options.num_samples,
        "num_images": total,
        "num_classes": num_classes,
        "format": 1,
    }
    error = None
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            check_or_write_manifest(out_dir, manifest)
            for stale in (out_dir / "records").glob("rank*.jsonl"):
                number = stale.stem[len("rank"):]
                if not number.isdigit() or int(number) >= context.world_size:
                    repair_tail(stale, num_classes)  # files no process of this run writes to
        except ResumeError as failure:
            error = str(failure)
    error = context.broadcast_from_main(error)
    if error is not None:
        raise ResumeError(error)
    writer = RecordWriter(record_path(out_dir, context.rank), num_classes)
    context.barrier()
    saved = read_records(out_dir, num_classes, names)
    mine = context.shard(range(total))
    todo = [i for i in mine if i not in saved]
    accumulator = IoUAccumulator(num_classes, dataset.ignore_index)
    boundary = TrimapAccumulator(ignore_index=dataset.ignore_index)  # boundary accuracy next to mIoU
    for index in mine:
        if index in saved:
            record = saved[index]
            accumulator.add(record.intersect, record.union, record.pred, record.label)
            if len(record.trimap) == 2 * len(boundary.widths):  # records of older runs may lack it
                boundary.add(record.trimap)
    palette = vis.palette(num_classes, _palette_name(dataset.name))
    long_side = int(getattr(segmentor.config, "long_side", 2048))
    loader = DataLoader(
        _EvalItems(dataset, todo, int(segmentor.config.short_side), long_side,
                   centre_crop=segmentor.config.crop if getattr(segmentor.config, "protocol", "") == "centre_crop"
                   else None),
        batch_size=1,
        shuffle=False,
        num_workers=options.workers,
        collate_fn=_single,
    )
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"eval {options.label or options.preset}", unit="img",
               disable=not (options.progress and context.is_main), dynamic_ncols=True)  # fmt: skip
    bar.set_postfix(mIoU=_running_miou(accumulator))
    scored = len(mine) - len(todo)
    try:
        for index, prepared, gt in loader:
            if prepared is None:
                raise DatasetError(
                    f"{gt}.\nThe {scored} images scored so far are kept; fix the "
                    f"file (see `itaclip data check`) and run the same command again to continue"
                )
            tick = time.perf_counter()
            labels = _labels_of(segmentor.predict_prepared(prepared), prepared.name)
            seconds = time.perf_counter() - tick
            if labels.shape != gt.shape:
                raise DatasetError(
                    f"{prepared.name}: prediction is {labels.shape} but the label map is {gt.shape}; predictions "
                    "must be at the original image size (and labels must match their images: run "
                    "`itaclip data check`)"
                )
            counts = intersect_and_union(labels, gt, num_classes, dataset.ignore_index)
            confusion = sparse_confusion(confusion_counts(labels, gt, num_classes, dataset.ignore_index))
            trimap = boundary.update(labels, gt)
            _save_outputs(options, dataset, index, labels, gt, palette)
            height, width = prepared.original_size
            writer.write(ImageRecord(index, names[index], height, width, *(tuple(c.tolist()) for c in counts),
                                     seconds=seconds, confusion=confusion,
                                     trimap=tuple(trimap.reshape(-1).tolist())))  # fmt: skip
            accumulator.add(*counts)
            scored += 1
            bar.update(1)
            bar.set_postfix(mIoU=_running_miou(accumulator))
    finally:
        bar.close()
        writer.close()
    # sum over processes: the four histograms, then (images, computed here, loaded from records)
    state = context.all_reduce_sum(accumulator.state())  # (4, N)
    tallies = context.all_reduce_sum(np.array([accumulator.num_images, len(todo), len(mine) - len(todo)]))
    accumulator.load_state(state, int(tallies[0]))
    boundary_state = context.all_reduce_sum(np.append(boundary.counts.reshape(-1), boundary.num_images))
    boundary.counts, boundary.num_images = boundary_state[:-1].reshape(-1, 2).astype(np.int64), int(boundary_state[-1])
    run_info = {
        "world_size": context.world_size,
        "computed": int(tallies[1]),
        "loaded_from_records": int(tallies[2]),
        "seconds": round(time.time() - started, 3),
        "device": str(getattr(getattr(segmentor, "model", None), "device", context.device)),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results = build_results(accumulator, dataset, segmentor, manifest, run_info, boundary)
    if context.is_main:
        write_reports(out_dir, results)
    context.barrier()
    return json.loads(json.dumps(results))
