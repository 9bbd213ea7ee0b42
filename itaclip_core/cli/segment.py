"""`itaclip segment IMAGE... --classes "cat, dog, sky" --out DIR`: segment images with any classes.

Per image it writes `<name>_labels.png` (paletted label map), `<name>_overlay.png` (overlay with a legend) and
`<name>_areas.json` (image height and width, and each class's pixels and share); with `--save-npz` also
`<name>.npz` (probabilities, labels, class names).

Before the model is loaded: every image path exists, the output folder can be written, the settings and their
ranges, the device, the weights argument, the class, auxiliary and template files and the prompt lengths are
checked; a problem there is an error (status 2) and nothing is written. An image that then fails to decode is
reported and skipped, the others are still segmented (status 1); each image's files are written as it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from itaclip_core.timing import StepTimes, timed
from itaclip_core.cli.common import (
    CliError,
    add_device_argument,
    add_dtype_argument,
    add_progress_argument,
    add_set_argument,
    add_weights_argument,
    check_input_file,
    check_input_files,
    check_output_dir,
    check_overrides,
    positive_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from itaclip_core.presets import list_presets

    parser = subparsers.add_parser(
        "segment",
        help="segment images with any class names",
        description="Segment images with arbitrary class names (or a benchmark preset's classes). A benchmark "
        "preset with your own classes keeps its architecture without its background class, definitions and "
        "thresholds.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", help='comma-separated class names, variants joined by "|": "cat|kitten, dog, sky"')
    group.add_argument("--classes-file", type=Path, help="class-name file: one class per line, variants by ', '")
    parser.add_argument("--preset", default=None, choices=list_presets(), metavar="NAME",
                        help="settings preset (default open_vocab with --classes); one of: "
                        + ", ".join(list_presets()))  # fmt: skip
    parser.add_argument("--aux", default=None, help="definitions/synonyms file (`name >=text` per class)")
    add_weights_argument(parser)
    add_device_argument(parser)
    add_dtype_argument(parser)
    add_set_argument(parser)
    parser.add_argument("--masks", default=None, metavar="SOURCE",
                        help="mask proposals: superpixels, sam, sam2, or a folder of <stem>.png / <stem>.npz masks "
                        "(same as --set masks=SOURCE)")
    parser.add_argument("--mask-use", default=None, choices=["vote", "attention", "proxy"],
                        help="what the masks are for: vote (relabel each mask, default), attention (mask-scoped "
                        "last block), proxy (ProxyCLIP's proxy attention; needs no masks)")
    parser.add_argument("--draw-masks", action="store_true", help="draw the mask outlines on the overlay")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created when the first image is done)")
    parser.add_argument("--save-npz", action="store_true", help="also save probabilities and labels as .npz")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                        help="images whose windows share the model's forward passes (default 4)")  # fmt: skip
    add_progress_argument(parser)
    parser.add_argument("--timings", action="store_true",
                        help="print the time each step took (model load, text classifier, image tower, ...) at the end")
    parser.set_defaults(func=run)


def _output_stems(images: list[Path]) -> list[str]:
    """A distinct output name per image (folders are dropped; repeated names get a numeric suffix)."""
    seen: dict[str, int] = {}
    stems = []
    for image in images:
        stem = image.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _write_atomically(path: Path, write: Any) -> None:
    """`write(temporary_path)`, then rename into `path`: a failure leaves no partial file."""
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def areas_record(prediction: Any, image: str, preset: str, weights: str) -> dict[str, Any]:
    """The content of `<name>_areas.json`: the image, its height and width, and per class present its pixels and
    share of the image."""
    import numpy as np

    counts = np.bincount(prediction.labels.ravel(), minlength=len(prediction.class_names))
    return {
        "image": image,
        "height": prediction.height,
        "width": prediction.width,
        "preset": preset,
        "weights": weights,
        "classes": {name: {"pixels": int(counts[i]), "fraction": float(counts[i]) / prediction.labels.size}
                    for i, name in enumerate(prediction.class_names) if counts[i] > 0},
    }  # fmt: skip


def output_colours(segmentor: Any) -> Any:
    """The label colours of `segmentor`'s classes: black (the VOC colour of index 0) is kept for a background class;
    other vocabularies start at a colour."""
    from itaclip_core.vis import palette

    count = segmentor.num_classes
    return palette(count) if segmentor.config.background else palette(count + 1)[1:]


@timed("write outputs")
def write_outputs(prediction: Any, rgb: Any, out: Path, stem: str, source: str, colours: Any, preset: str,
                  weights: str, draw_masks: bool = False, save_npz: bool = False) -> None:
    """Write one prediction's files into `out`: `<stem>_labels.png`, `<stem>_overlay.png`, `<stem>_areas.json`
    (and `<stem>.npz` with `save_npz`), each atomically. `rgb` is the decoded image (H, W, 3) uint8."""
    import numpy as np

    from itaclip_core.vis import overlay, save_label_png, save_rgb_png

    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / f"{stem}_labels.png", lambda p: save_label_png(p, prediction.labels, colours))
    # The pixels the labels cover: the image, or the crop a protocol scored (CLIPtrase's centre crop).
    pixels = prediction.image if prediction.image is not None else rgb
    outlines = prediction.regions if draw_masks else None
    shown = overlay(pixels, prediction.labels, prediction.class_names, colours, outlines=outlines)
    _write_atomically(out / f"{stem}_overlay.png", lambda p: save_rgb_png(p, shown))
    record = areas_record(prediction, source, preset, weights)
    _write_atomically(out / f"{stem}_areas.json", lambda p: p.write_text(json.dumps(record, indent=2)))
    if save_npz:
        _write_atomically(out / f"{stem}.npz", lambda p: np.savez_compressed(
            p, probs=prediction.probs, labels=prediction.labels, class_names=np.array(prediction.class_names)))


def run(args: argparse.Namespace) -> int:
    from itaclip_core.cli import note

    prog = "itaclip segment"
    preset = args.preset or "open_vocab"
    if args.classes is not None and not args.classes.strip(" ,|"):
        raise CliError('--classes is empty; give class names such as --classes "cat, dog, sky"')
    if args.classes_file is not None:
        check_input_file(args.classes_file, "--classes-file", "class-name file")
    classes = args.classes if args.classes is not None else args.classes_file
    if classes is None and preset == "open_vocab":
        raise CliError('give the classes (--classes "cat, dog, sky" or --classes-file FILE) or a benchmark --preset')
    if args.aux is not None:
        check_input_file(args.aux, "--aux", "auxiliary-text file")
    images = check_input_files(args.images, "image")
    out = check_output_dir(args.out, "--out")
    overrides = check_overrides(args.overrides) + ([f"aux_file={args.aux}"] if args.aux is not None else [])
    overrides += [f"masks={args.masks}"] if args.masks is not None else []
    overrides += [f"mask_use={args.mask_use}"] if args.mask_use is not None else []

    from itaclip_core.presets import apply_overrides, get_preset, override_keys
    from itaclip_core.text.classes import parse_class_list
    from itaclip_core.validation import user_classes_config, validate_config

    config = get_preset(preset)
    if classes is not None:
        if isinstance(classes, str):
            classes = parse_class_list(classes)  # a --classes text is never a file name
        config, changed = user_classes_config(config)
        if changed:
            note(prog, changed + " (see `itaclip segment --help`)")
    config = validate_config(apply_overrides(config, overrides))  # before torch is even imported
    if args.aux is not None and config.aux_coef == 0:
        note(prog, f"aux_coef is 0, so the texts of --aux {args.aux} have no effect; give them a weight, "
                   "e.g. --set aux_coef=0.1")  # fmt: skip

    from itaclip_core.segmentor import Segmentor

    times = StepTimes(device=args.device) if args.timings else None
    with times if times is not None else contextlib.nullcontext():
        segmentor = Segmentor.from_config(
            config, weights=args.weights, device=args.device, classes=classes, dtype=args.dtype,
            progress=not args.no_progress, notes=lambda message: note(prog, message), keep=override_keys(overrides),
        )  # fmt: skip
        status = _segment_all(segmentor, images, out, args, prog)
    if times is not None:
        print(f"{prog}: time per step ({len(images)} image(s)):\n{times.summary()}", file=sys.stderr)
    return status


def _segment_all(segmentor: Any, images: list[Path], out: Path, args: argparse.Namespace, prog: str) -> int:
    import numpy as np

    from itaclip_core.inference.preprocess import ImageReadError, read_image_bgr
    from itaclip_core.masks.maskset import MaskError
    from tqdm.auto import tqdm
    colours = output_colours(segmentor)
    failures: list[tuple[Path, str]] = []
    stems = dict(zip(images, _output_stems(images)))
    decoded: dict[str, tuple[Path, np.ndarray]] = {}  # by key, the images read and not yet written
    last_key: list[str] = []

    def readable() -> Iterator[np.ndarray]:
        for index, path in enumerate(images):
            try:
                rgb = read_image_bgr(path)[:, :, ::-1].copy()
            except ImageReadError as error:
                failures.append((path, str(error)))
                continue
            decoded[str(index)] = (path, rgb)
            last_key[:] = [str(index)]
            yield rgb

    def names() -> Iterator[str]:  # read right after each image: the key of the image just read
        while True:
            yield last_key[0]

    def one_at_a_time() -> Iterator[Any]:  # mask proposals come from each image's own pixels, one image at a time
        for rgb in readable():
            key = last_key[0]
            try:  # by the file's name: a mask folder holds <stem>.png / <stem>.npz
                prediction = segmentor.predict(rgb, name=decoded[key][0].name)
            except MaskError as error:  # this image's masks (a missing or wrong-sized file): skip the image
                failures.append((decoded.pop(key)[0], str(error)))
                continue
            prediction.name = key
            yield prediction

    done = 0
    if segmentor.mask_stage.source is not None:
        predictions: Any = tqdm(one_at_a_time(), total=len(images), desc="images", unit="img",
                                disable=args.no_progress)  # fmt: skip
    else:
        predictions = segmentor.iter_predictions(readable(), names(), batch_size=args.batch_size,
                                                 progress=not args.no_progress, total=len(images))  # fmt: skip
    for prediction in predictions:
        path, rgb = decoded.pop(prediction.name)
        prediction.name = path.name
        write_outputs(prediction, rgb, out, stems[path], str(path), colours, segmentor.config.name,
                      segmentor.weights_id, draw_masks=args.draw_masks, save_npz=args.save_npz)
        done += 1
    for path, message in failures:
        print(f"{prog}: skipped {path}: {message}", file=sys.stderr)
    if done == 0:
        print(f"{prog}: error: none of the {len(images)} image(s) could be read; nothing was written",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"segmented {done} of {len(images)} image(s) into {out}")
    return 1 if failures else 0
