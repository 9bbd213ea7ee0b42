"""`itaclip segment IMAGE... --classes "cat, dog, sky" --out DIR`: segment images with any classes.

Per image it writes `<name>_labels.png` (paletted label map), `<name>_overlay.png` (overlay with a legend) and
`<name>_areas.json` (pixel share of each class); with `--save-npz` also `<name>.npz` (probabilities, labels, class
names). An image that cannot be read is reported and skipped; the others are still segmented.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from itaclip_core.inference.preprocess import ImageReadError, read_image_bgr
from itaclip_core.model.checkpoint import CheckpointError
from itaclip_core.model.weights import ChecksumError, WeightsUnavailableError
from itaclip_core.presets import list_presets
from itaclip_core.text.classes import TextFileError
from itaclip_core.text.tokenizer import TokenizerError

USER_ERRORS = (CheckpointError, WeightsUnavailableError, ChecksumError, TextFileError, TokenizerError, ValueError)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images with any class names",
        description="Segment images with arbitrary class names (or a benchmark preset's classes).",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", help='comma-separated class names, variants joined by "|": "cat|kitten, dog, sky"')
    group.add_argument("--classes-file", type=Path, help="class-name file: one class per line, variants by ', '")
    parser.add_argument("--preset", default=None, choices=list_presets(), metavar="NAME",
                        help=f"settings preset (default open_vocab with --classes); one of: {', '.join(list_presets())}")
    parser.add_argument("--aux", default=None, help="definitions/synonyms file (`name >=text` per class)")
    parser.add_argument("--weights", default="ViT-B/16", help="model name (ViT-B/16, ...), checkpoint path, "
                        "open_clip:<model>/<tag or path>, or random-tiny (default: ViT-B/16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="model precision (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the preset (repeatable), e.g. --set stride=56")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--save-npz", action="store_true", help="also save probabilities and labels as .npz")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
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


def run(args: argparse.Namespace) -> int:
    from itaclip_core.segmentor import Segmentor
    from itaclip_core.vis import overlay, palette, save_label_png, save_rgb_png

    preset = args.preset or "open_vocab"
    classes = args.classes if args.classes is not None else args.classes_file
    if classes is None and preset == "open_vocab":
        print("itaclip segment: give the classes (--classes \"cat, dog, sky\" or --classes-file FILE) "
              "or a benchmark --preset", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ([f"aux_file={args.aux}"] if args.aux is not None else [])
    try:
        segmentor = Segmentor.from_preset(
            preset, weights=args.weights, device=args.device, overrides=overrides, classes=classes,
            dtype=args.dtype, progress=not args.no_progress,
        )
    except USER_ERRORS as error:
        print(f"itaclip segment: {error}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    # Black (the VOC colour of index 0) is kept for a background class; other vocabularies start at a colour.
    colours = palette(segmentor.num_classes) if segmentor.config.background else palette(segmentor.num_classes + 1)[1:]
    failures: list[tuple[Path, str]] = []
    for image_path, stem in tqdm(list(zip(args.images, _output_stems(args.images))), desc="images", unit="img",
                                 disable=args.no_progress):
        try:
            bgr = read_image_bgr(image_path)
        except ImageReadError as error:
            failures.append((image_path, str(error)))
            continue
        prediction = segmentor.predict(bgr[:, :, ::-1].copy(), name=image_path.name)
        save_label_png(args.out / f"{stem}_labels.png", prediction.labels, colours)
        save_rgb_png(args.out / f"{stem}_overlay.png",
                     overlay(bgr[:, :, ::-1], prediction.labels, prediction.class_names, colours))
        counts = np.bincount(prediction.labels.ravel(), minlength=segmentor.num_classes)
        areas = {
            "image": str(image_path),
            "size": list(prediction.labels.shape),
            "preset": segmentor.config.name,
            "weights": segmentor.weights_id,
            "classes": {name: {"pixels": int(counts[i]), "fraction": float(counts[i]) / prediction.labels.size}
                        for i, name in enumerate(prediction.class_names) if counts[i] > 0},
        }
        (args.out / f"{stem}_areas.json").write_text(json.dumps(areas, indent=2))
        if args.save_npz:
            np.savez_compressed(args.out / f"{stem}.npz", probs=prediction.probs, labels=prediction.labels,
                                class_names=np.array(prediction.class_names))
    done = len(args.images) - len(failures)
    print(f"segmented {done} of {len(args.images)} image(s) into {args.out}")
    for path, message in failures:
        print(f"  skipped {path}: {message}", file=sys.stderr)
    return 1 if failures else 0
