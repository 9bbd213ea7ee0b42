"""Single-image latency: the first image against the next ones, step by step, against this machine's matrix rate.

    python -m itaclip_core.latency                                  # random ViT-B/16, ITACLIP VOC, float32
    python -m itaclip_core.latency --dtypes float32 bfloat16 --cold-cli

In a fresh process per dtype it loads the model, builds the text classifier with an empty cache, then segments the
image `--images` times exactly as `itaclip segment` does (decode, predict, write the label map, overlay and areas),
timing every step of every image (`itaclip_core.timing`). The *marginal* image is the median of images 2..n. One more,
untimed, pass counts the floating-point work of each step (and of the text classifier), so each step's achieved
GFLOP/s can be set against the rate a plain large matrix product reaches in the same process (measured last, so
that it warms nothing up): the step's time over its work at that rate is how far it is from the matrix-multiply
floor. The matrix rate is measured after every image (never before the first) and its median used.

`--cold-cli` also runs `itaclip segment` as a new process with an empty cache (what a user's first call costs, from
the interpreter's start to the files on disk) and sets it against the published ITACLIP code's time for the same
work (`PUBLISHED_SECONDS`). With two dtypes the second's times and labels are compared with the first's.
Random weights do exactly the work of the real weights of their size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The published ITACLIP code on this project's 2-core development machines, ViT-B/16-sized random weights, the VOC
# preset, the 300 x 420 test image (text classifier, one image).
PUBLISHED_SECONDS = {("itaclip_voc21", "random-vit-b-16"): {"text": 560.0, "image": 105.0}}
_CHECKOUT_IMAGE = Path(__file__).resolve().parent.parent / "tests" / "golden" / "synthetic_300x420.png"
DEFAULT_IMAGE = _CHECKOUT_IMAGE if _CHECKOUT_IMAGE.is_file() else Path(__file__).parent / "assets" / "sample_coffee.jpg"


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), with family/model when the name is generic."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def gemm_rate(dtype: Any, size: int = 4096, repeats: int = 3, device: str = "cpu") -> float:
    """GFLOP/s of a plain (size x size) @ (size x size) product in `dtype`: the best of `repeats` after a warm-up."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    best = float("inf")
    for index in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if index:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _one_image(segmentor: Any, path: Path, out: Path, stem: str) -> Any:
    """What `itaclip segment` does for one image: decode, predict, write its files."""
    from itaclip_core.cli.segment import output_colours, write_outputs
    from itaclip_core.inference.preprocess import read_image_bgr
    from itaclip_core.timing import step

    with step("decode and resize"):
        rgb = read_image_bgr(path)[:, :, ::-1].copy()
        prepared = segmentor.prepare(rgb, name=path.name)
    prediction = segmentor.predict_prepared(prepared)
    write_outputs(prediction, rgb, out, stem, str(path), output_colours(segmentor), segmentor.config.name,
                  segmentor.weights_id)
    return prediction


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One dtype in a fresh process (see the module docstring)."""
    started = time.perf_counter()
    import numpy as np
    import torch

    from itaclip_core import load_clip
    from itaclip_core.presets import get_preset
    from itaclip_core.segmentor import Segmentor
    from itaclip_core.benchmark import _texts
    from itaclip_core.text.classifier import build_classifier, load_templates
    from itaclip_core.timing import StepTimes

    imported = time.perf_counter() - started
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    image = Path(spec["image"])
    with StepTimes(device=spec["device"]) as setup:
        model = load_clip(spec["weights"], device=spec["device"], dtype=spec["dtype"])
        segmentor = Segmentor(model, get_preset(spec["preset"]), cache_dir=work / "cache")
    images = []
    prediction = None
    rates = []
    for index in range(spec["images"]):
        with StepTimes(device=spec["device"]) as times:
            prediction = _one_image(segmentor, image, work / "out", f"image{index}")
        images.append(times.as_dict())
        rates.append(gemm_rate(model.dtype, device=spec["device"]))  # after the image: it warms nothing up
    assert prediction is not None
    np.savez_compressed(work / "prediction.npz", probs=prediction.probs, labels=prediction.labels)
    with StepTimes(count_flops=True) as counted:  # the work of each step (not timed)
        _one_image(segmentor, image, work / "out", "counted")
    config = segmentor.config
    vocab, aux = _texts(config)
    with StepTimes(count_flops=True) as text_counted:  # the text classifier's work, built again without a cache
        build_classifier(model, vocab, load_templates(config.templates), aux, config.aux_coef, config.background,
                         batch_size=config.text_batch_size, cache_dir=None)
    dtype = str(model.dtype).replace("torch.", "")
    return {
        "dtype": dtype,
        "import_seconds": imported,
        "setup": setup.as_dict(),
        "images": images,
        "image_flops": counted.flops,
        "text_flops": text_counted.total_flops,
        "windows": len(segmentor.engine.windows(*segmentor.prepare(image).tensor.shape[-2:])),
        "views": segmentor.engine.num_views,
        "threads": torch.get_num_threads(),
        "gemm_gflops": float(np.median(rates)),
        "gemm_gflops_each": rates,
        "gemm_gflops_float32": gemm_rate(torch.float32, device=spec["device"]),
    }


def cold_cli(args: argparse.Namespace, dtype: str, work: Path) -> dict[str, Any]:
    """`itaclip segment` in a new process with an empty cache: wall seconds and its own per-step report."""
    cache, out = work / "cli-cache", work / "cli-out"
    command = [sys.executable, "-m", "itaclip_core.cli", "segment", str(args.image), "--preset", args.preset,
               "--weights", args.weights, "--out", str(out), "--device", args.device, "--dtype", dtype,
               "--no-progress", "--timings"]  # fmt: skip
    env = {**os.environ, "ITACLIP_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"itaclip segment failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"seconds": seconds, "report": done.stderr.strip(), "command": " ".join(command[1:])}


def _floor(seconds: float, flops: float, rate: float) -> str:
    return f"{seconds / (flops / (rate * 1e9)):6.2f}x" if flops > 0 else "      -"


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    rate = result["gemm_gflops"]
    images = result["images"]
    first, rest = images[0]["seconds"], images[1:]

    def marginal_of(values: list[float]) -> float:  # the median of images 2..n (the machine may be noisy)
        return float(statistics.median(values)) if values else 0.0

    steps = list(dict.fromkeys(name for record in images for name in record["seconds"]))
    print(f"\n== {result['dtype']}: {args.weights}, {args.preset}, {args.image.name} "
          f"({result['windows']} windows x {result['views']} views), {result['threads']} threads")
    print(f"   plain {result['dtype']} GEMM 4096^3 in this process, after each image: "
          f"{', '.join(f'{r:.0f}' for r in result['gemm_gflops_each'])} GFLOP/s, median {rate:.0f}"
          + (f" (float32: {result['gemm_gflops_float32']:.0f})" if result["dtype"] != "float32" else ""))
    print(f"   {'step':<18} {'first image':>12} {'marginal':>10} {'GFLOP':>9} {'GFLOP/s':>9} {'vs GEMM floor':>14}")
    totals = {"first": 0.0, "marginal": 0.0}
    for name in steps + ["other"]:
        if name == "other":
            first_s = images[0]["total_seconds"] - sum(first.values())
            marginal_s = marginal_of([r["total_seconds"] - sum(r["seconds"].values()) for r in rest])
        else:
            first_s = first.get(name, 0.0)
            marginal_s = marginal_of([r["seconds"].get(name, 0.0) for r in rest])
        flops = result["image_flops"].get(name, 0)
        totals["first"] += first_s
        totals["marginal"] += marginal_s
        achieved = f"{flops / marginal_s / 1e9:9.1f}" if flops and marginal_s > 0 else f"{'-':>9}"
        print(f"   {name:<18} {first_s:10.2f} s {marginal_s:8.2f} s {flops / 1e9:9.1f} {achieved} "
              f"{_floor(marginal_s, flops, rate):>14}")
    all_flops = sum(result["image_flops"].values())
    print(f"   {'image, in all':<18} {totals['first']:10.2f} s {totals['marginal']:8.2f} s {all_flops / 1e9:9.1f} "
          f"{all_flops / totals['marginal'] / 1e9:9.1f} {_floor(totals['marginal'], all_flops, rate):>14}")
    whole = marginal_of([r["total_seconds"] for r in rest])
    each = ", ".join(f"{r['total_seconds']:.2f} s" for r in images)
    print(f"   each image: {each}; first image / marginal "
          f"image (median of images 2..{len(images)}): {images[0]['total_seconds'] / whole:.3f}")
    setup = result["setup"]["seconds"]
    text_s = setup.get("text classifier", 0.0)
    print(f"   text classifier (empty cache): {text_s:.2f} s, {result['text_flops'] / 1e9:.0f} GFLOP, "
          f"{result['text_flops'] / text_s / 1e9:.0f} GFLOP/s, {_floor(text_s, result['text_flops'], rate).strip()} "
          "the GEMM floor")
    print(f"   imports {result['import_seconds']:.2f} s, model load {setup.get('model load', 0.0):.2f} s")
    if "cold" in result:
        cold = result["cold"]
        published = PUBLISHED_SECONDS.get((args.preset, args.weights))
        line = f"   cold `itaclip segment` (new process, empty cache): {cold['seconds']:.1f} s"
        if published:
            total = published["text"] + published["image"]
            line += (f"; the published code: {published['text']:.0f} s text + {published['image']:.0f} s image = "
                     f"{total:.0f} s, {total / cold['seconds']:.1f}x slower")
        print(line)
        print("   " + cold["report"].replace("\n", "\n   "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m itaclip_core.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="random-vit-b-16", help="model (random-<size> or real weights)")
    parser.add_argument("--preset", default="itaclip_voc21")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--images", type=int, default=3, help="images segmented in one process (at least 2)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="float32, bfloat16, float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    parser.add_argument("--cold-cli", action="store_true", help="also time `itaclip segment` in a new process")
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    args = parser.parse_args(argv)
    if args.images < 2:
        parser.error("--images must be at least 2 (the first image and at least one marginal image)")
    from itaclip_core.benchmark import in_fresh_process

    print(f"CPU: {cpu_name()}; {os.cpu_count()} logical CPUs; Python {platform.python_version()}", flush=True)
    results = []
    for dtype in args.dtypes:
        work = Path(tempfile.mkdtemp(prefix=f"itaclip-latency-{dtype}-"))
        spec = {"weights": args.weights, "preset": args.preset, "image": str(args.image), "images": args.images,
                "dtype": dtype, "device": args.device, "threads": args.threads, "work": str(work)}
        print(f"[{dtype}] {args.images} images in one process ...", flush=True)
        result = in_fresh_process(_measure, spec)
        if "error" in result:
            raise SystemExit(f"{dtype}: {result['error']}")
        if args.cold_cli:
            print(f"[{dtype}] cold `itaclip segment` ...", flush=True)
            result["cold"] = cold_cli(args, dtype, work)
        result["work"] = str(work)
        report(result, args)
        results.append(result)
    if len(results) > 1:
        import numpy as np

        base = results[0]
        reference = np.load(Path(base["work"]) / "prediction.npz")
        for other in results[1:]:
            def marginal(r: dict[str, Any]) -> float:
                return float(statistics.median(rec["total_seconds"] for rec in r["images"][1:]))

            text = base["setup"]["seconds"]["text classifier"] / other["setup"]["seconds"]["text classifier"]
            line = (f"\n{other['dtype']} against {base['dtype']}: marginal image {marginal(base) / marginal(other):.2f}x "
                    f"faster, text classifier {text:.2f}x")
            if "cold" in base and "cold" in other:
                line += f", cold `itaclip segment` {base['cold']['seconds'] / other['cold']['seconds']:.2f}x"
            this = np.load(Path(other["work"]) / "prediction.npz")
            line += (f"; labels equal on {100 * (this['labels'] == reference['labels']).mean():.2f}% of pixels, "
                     f"probabilities within {np.abs(this['probs'] - reference['probs']).max():.1e}")
            print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=2, default=str))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
