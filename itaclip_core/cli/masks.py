"""`itaclip masks generate`: mask proposals for many images, into a folder the `folder` mask source reads.

    itaclip masks generate IMAGE... --generator sam2 --out DIR [--preset corrclip_8] [--set points_per_side=16]
    itaclip masks generate --data-root ROOT --dataset voc21 --generator superpixels --out DIR

Per image it writes `<stem>.npz` (boolean masks (K, H, W) under `masks`, and `scores` when the generator gives
them) or, with `--format png`, `<stem>.png` (the masks' partition as a 16-bit label map, 0 = uncovered). Each file
is written through a temporary file; images whose file is already there and readable are skipped, so an
interrupted run resumes where it stopped. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from itaclip_core.cli.common import add_device_argument, add_progress_argument

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("masks", help="mask proposals (SAM, SAM 2, superpixels)",
                                   description="Mask proposals for the mask modes of itaclip segment.")
    commands = parser.add_subparsers(dest="masks_command", metavar="SUBCOMMAND")
    gen = commands.add_parser("generate", help="generate masks for images or a dataset into a folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files")
    gen.add_argument("--data-root", type=Path, help="a dataset root (with --dataset): all of its images")
    gen.add_argument("--dataset", help="dataset name for --data-root (voc21, context60, coco_object, ...)")
    gen.add_argument("--generator", default="superpixels", help="mask source: superpixels, sam, sam2 "
                     "(default: superpixels)")
    gen.add_argument("--preset", default=None, help="generator preset (slic, felzenszwalb, sam_default, "
                     "sam2_default, corrclip_8, corrclip_32); default: the source's")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="generator setting (repeatable), e.g. --set points_per_side=16")
    gen.add_argument("--model", default=None, help="SAM model (vit_b, vit_l, vit_h) or SAM 2 model "
                     "(sam2.1_hiera_t ... sam2_hiera_l)")
    gen.add_argument("--checkpoint", default=None, help="checkpoint path (default: the official file, "
                     "downloaded into the cache); random-tiny for a tiny random model")
    add_device_argument(gen)
    gen.add_argument("--format", choices=["npz", "png"], default="npz", help="output format (default npz)")
    gen.add_argument("--order", default="small_on_top", help="paint order for --format png (small_on_top, "
                     "large_on_top, score)")
    gen.add_argument("--out", type=Path, required=True, help="output folder")
    add_progress_argument(gen)
    gen.set_defaults(func=run_generate)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _images(args: argparse.Namespace) -> list[Path]:
    if args.data_root is not None:
        if not args.dataset:
            raise ValueError("--data-root needs --dataset NAME (voc21, context60, coco_object, ...)")
        from itaclip_core.data.registry import get_dataset

        dataset = get_dataset(args.dataset, args.data_root)
        return [dataset[i].image_path for i in range(len(dataset))] + list(args.images)
    if not args.images:
        raise ValueError("give image files or --data-root ROOT --dataset NAME")
    return list(args.images)


def _done(path: Path) -> bool:
    """Whether an output file is there and readable (a torn one is generated again)."""
    import numpy as np
    from PIL import Image

    if not path.is_file():
        return False
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return data["masks"].ndim == 3
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def _write(path: Path, masks, fmt: str, order: str) -> None:
    import numpy as np
    from PIL import Image

    from itaclip_core.masks.voting import partition

    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        if fmt == "npz":
            extra = {"scores": masks.scores} if masks.scores is not None else {}
            np.savez_compressed(tmp, masks=masks.masks, **extra)
        else:
            regions = partition(masks, order)
            if regions.max() > 65535:
                raise ValueError(f"{len(masks)} masks do not fit a 16-bit label map: use --format npz")
            Image.fromarray(regions.astype(np.uint16)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_generate(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from itaclip_core.inference.preprocess import ImageReadError, read_image_bgr
    from itaclip_core.masks import ExtraNotInstalledError, MaskError, build_mask_source
    from itaclip_core.masks.voting import PAINT_ORDERS
    from itaclip_core.model.checkpoint import CheckpointError
    from itaclip_core.model.weights import ChecksumError, WeightsUnavailableError

    fatal = (CheckpointError, WeightsUnavailableError, ChecksumError, ExtraNotInstalledError)
    try:
        if args.order not in PAINT_ORDERS:
            raise ValueError(f"--order {args.order!r} is not one of {', '.join(PAINT_ORDERS)}")
        if args.generator == "folder":
            raise ValueError("--generator folder reads masks, it does not generate them: use superpixels, sam or sam2")
        images = _images(args)
        source = build_mask_source(args.generator, generator=args.preset, generator_args=args.overrides,
                                   model=args.model, checkpoint=args.checkpoint, device=args.device,
                                   progress=not args.no_progress)
    except (ValueError, *fatal) as error:
        print(f"itaclip masks generate: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    done = skipped = total_masks = 0
    for image_path in tqdm(images, desc=f"masks ({args.generator})", unit="img", disable=args.no_progress):
        target = args.out / f"{image_path.stem}.{args.format}"
        if _done(target):
            skipped += 1
            continue
        try:
            rgb = np.ascontiguousarray(read_image_bgr(image_path)[:, :, ::-1])
            masks = source.generate(rgb, image_path.name)
            _write(target, masks, args.format, args.order)
        except (ImageReadError, MaskError) as error:
            failures.append((image_path, str(error)))
            continue
        except fatal as error:  # the model cannot be loaded: nothing more can be generated
            print(f"itaclip masks generate: {error}", file=sys.stderr)
            print(f"generated {done} image(s) before stopping; they are kept in {args.out}", file=sys.stderr)
            return 2
        done += 1
        total_masks += len(masks)
    mean = f", {total_masks / done:.1f} masks per image" if done else ""
    print(f"generated masks for {done} image(s) into {args.out} ({skipped} already there{mean})")
    for path, message in failures:
        print(f"  skipped {path}: {message}", file=sys.stderr)
    return 1 if failures else 0
