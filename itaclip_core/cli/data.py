"""`itaclip data ...`: dataset preparation and checks.

    itaclip data check ROOT --dataset NAME [--max-images N]
    itaclip data coco-object COCO_STUFF_ROOT [-o OUT] [--splits val2017 train2017]
    itaclip data synthetic NAME OUT [--num-images N] [--seed S] [--easy]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from itaclip_core.cli.common import CliError, add_progress_argument, check_output_dir, positive_int


def _run_check(args: argparse.Namespace) -> int:
    """Status 0: no problems; 1: problems found (listed); 2: the root is not a folder."""
    from itaclip_core.data.base import DatasetError
    from itaclip_core.data.check import check_dataset, format_report
    from itaclip_core.data.registry import get_dataset

    root = Path(args.root)
    if not root.is_dir():
        raise CliError(f"dataset root {root} {'is a file' if root.exists() else 'not found'}; give the folder "
                       f"holding the {args.dataset} benchmark (MMSegmentation layout)")  # fmt: skip
    problems = check_dataset(args.dataset, args.root, max_images=args.max_images, progress=not args.no_progress)
    try:
        num_listed: int | None = len(get_dataset(args.dataset, args.root))
    except DatasetError:
        num_listed = None
    print(format_report(args.dataset, args.root, problems, num_listed))
    return 1 if problems else 0


def _run_coco_object(args: argparse.Namespace) -> int:
    from itaclip_core.data.coco_object import convert_coco_object

    if args.out is not None:
        check_output_dir(args.out, "--out")
    summary = convert_coco_object(args.coco_root, args.out, splits=args.splits, progress=not args.no_progress)
    out = args.out or args.coco_root
    copied = f", {summary.images_copied} images copied" if summary.images_copied else ""
    print(f"COCO-Object labels in {out}/annotations: {summary.converted} converted, {summary.skipped} already there"
          f"{copied}")
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    from itaclip_core.data.synthetic import make_synthetic_dataset

    check_output_dir(args.out, "OUT")
    root = make_synthetic_dataset(args.name, args.out, num_images=args.num_images, seed=args.seed, easy=args.easy)
    print(f"synthetic {args.name} dataset written to {root}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `itaclip data` and its sub-commands to the `itaclip` parser."""
    from itaclip_core.data.registry import DATASET_NAMES

    parser = subparsers.add_parser(
        "data", help="prepare and check benchmark datasets (or write a synthetic one to try `itaclip eval`)"
    )
    commands = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])

    check = commands.add_parser("check", help="report what is missing or malformed in a dataset folder")
    check.add_argument("root", help="dataset root (MMSegmentation layout)")
    check.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="benchmark name")
    check.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                       help="read only the first N images and labels")  # fmt: skip
    add_progress_argument(check)
    check.set_defaults(func=_run_check)

    coco = commands.add_parser(
        "coco-object", help="build COCO-Object _instanceTrainIds.png maps from COCO-Stuff 164k stuff-thing maps"
    )
    coco.add_argument("coco_root", help="COCO-Stuff 164k root holding images/ and annotations/<split>/<id>.png")
    coco.add_argument("-o", "--out", default=None, help="output root (default: the input root)")
    coco.add_argument("--splits", nargs="+", default=["val2017"], help="splits to convert (default: val2017)")
    add_progress_argument(coco)
    coco.set_defaults(func=_run_coco_object)

    synthetic = commands.add_parser(
        "synthetic", help="write a small synthetic dataset in a benchmark's layout (to try `itaclip eval` without "
        "downloading a benchmark)"
    )
    synthetic.add_argument("name", choices=DATASET_NAMES, help="benchmark whose layout to write")
    synthetic.add_argument("out", help="folder to write into")
    synthetic.add_argument("--num-images", type=positive_int, default=4, metavar="N",
                           help="number of evaluation images (default 4)")  # fmt: skip
    synthetic.add_argument("--seed", type=int, default=0, help="random seed")
    synthetic.add_argument("--easy", action="store_true", help="flat class colours (easy to segment)")
    synthetic.set_defaults(func=_run_synthetic)
