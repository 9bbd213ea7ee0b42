"""Speed and memory of the refinements, against pydensecrf2 for DenseCRF, on the same inputs.

    python -m itaclip_core.refinement.benchmark [--classes 150] [--size 512 683] [--device cpu|cuda] [--rounds 3]
        [--one-thread] [--skip-loftup]

Each step runs in a fresh process, so its peak memory (resident set on the CPU, allocated memory on CUDA) is its
own. DenseCRF runs in rounds, ours and pydensecrf2 in turn, and the speed-up quoted is the median of the rounds'
ratios, so that a machine whose speed drifts still compares like with like. Inputs: the shipped sample photo
resized to the size, and coarse class probabilities (a random 1/32-scale map upsampled bilinearly, like dense
CLIP's) for the number of classes. Steps: DenseCRF with our permutohedral lattice
and with pydensecrf2 (the C++ package, CPU, single-threaded; skipped when it is not installed), their label
agreement; PAMR (10 steps, dilations 8 and 16); the guided and joint bilateral filters (kornia) of the logits;
LoftUp (random weights, 512-d, one 14 x 14 window to 224 x 224).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample_cat.jpg"


def _inputs(classes: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    image = cv2.imread(str(SAMPLE))[:, :, ::-1]
    image = np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR))
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (classes, max(1, height // 32), max(1, width // 32))).astype(np.float32)
    logits = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=(height, width),
                                             mode="bilinear")[0]
    probs = (logits * 4.0).softmax(0).numpy()
    return probs, image


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    from itaclip_core.refinement import dense_crf, pamr
    from itaclip_core.refinement.guided import guided_filter

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    probs, image = _inputs(spec["classes"], *spec["size"])
    step = spec["step"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: Any = None
    if step in ("crf_lattice", "crf_warmup"):
        p = torch.from_numpy(probs).to(device)
        if step == "crf_warmup":  # CUDA kernels compiled/loaded before the timed run
            dense_crf(p[:, :64, :64].contiguous(), image[:64, :64], iterations=1)
        sync()
        tick = time.perf_counter()
        out = dense_crf(p, image, iterations=spec["iterations"])
        sync()
        seconds = time.perf_counter() - tick
        out = out.cpu().numpy()
    elif step == "crf_pydensecrf2":
        tick = time.perf_counter()
        out = dense_crf(probs, image, iterations=spec["iterations"], backend="pydensecrf2")
        seconds = time.perf_counter() - tick
    elif step == "pamr":
        logits = torch.from_numpy(np.log(probs))[None].to(device)
        guide = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
        pamr(guide[..., :8, :8], logits[..., :8, :8], 1)
        sync()
        tick = time.perf_counter()
        pamr(guide, logits, 10, (8, 16))
        sync()
        seconds = time.perf_counter() - tick
    elif step in ("guided", "joint_bilateral"):
        logits = torch.from_numpy(np.log(probs)).to(device)
        guide = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0).to(device)
        guided_filter(logits[:, :16, :16], guide[:, :16, :16], mode=step, kernel_size=5)
        sync()
        tick = time.perf_counter()
        guided_filter(logits, guide, mode=step)
        sync()
        seconds = time.perf_counter() - tick
    elif step == "loftup":
        from itaclip_core.upsamplers import random_loftup

        model = random_loftup(512).to(device)
        feats = torch.randn(1, 512, 14, 14, device=device)
        crop = torch.rand(1, 3, 224, 224, device=device)
        model(feats, crop[..., :28, :28])
        sync()
        tick = time.perf_counter()
        model(feats, crop)
        sync()
        seconds = time.perf_counter() - tick
    else:
        raise ValueError(f"unknown step {step}")
    result = {"step": step, "seconds": seconds, "peak_mib": _peak_mib(device)}
    if out is not None:
        result["labels"] = out.argmax(0).astype(np.int16)
        result["probs_sample"] = out[:, ::16, ::16].copy()
    return result


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """One step in a fresh process (`itaclip_core.benchmark.in_fresh_process`); a failure is reported in the row."""
    from itaclip_core.benchmark import in_fresh_process

    return {"step": spec["step"], **in_fresh_process(_measure, spec)}


def _report(step: str, result: dict[str, Any], device: str) -> None:
    if "error" in result:
        print(f"{step:>24}: {result['error']}")
    else:
        print(f"{step:>24}: {result['seconds']:8.3f} s   peak memory {result['peak_mib']:8.1f} MiB"
              + (" (process RSS)" if device == "cpu" else " (CUDA allocated)"))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m itaclip_core.refinement.benchmark",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="DenseCRF rounds: ours and pydensecrf2 in turn, each run in a fresh process")
    parser.add_argument("--one-thread", action="store_true",
                        help="also time ours on one thread in each round (pydensecrf2 is single-threaded)")
    parser.add_argument("--skip-loftup", action="store_true")
    parser.add_argument("--skip-pydensecrf2", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds is {args.rounds}: give at least 1")
    common = dict(classes=args.classes, size=tuple(args.size), iterations=args.iterations, device=args.device,
                  threads=args.threads)
    print(f"# refinements at {args.classes} classes, {args.size[0]}x{args.size[1]}, device {args.device}, "
          f"torch threads {args.threads or torch.get_num_threads()}, {args.iterations} CRF iterations, "
          f"{args.rounds} DenseCRF round(s)")
    ours_step = "crf_warmup" if args.device.startswith("cuda") else "crf_lattice"
    crf_steps = [(ours_step, dict(common, step=ours_step))]
    if args.one_thread and not args.device.startswith("cuda"):
        crf_steps.append(("crf_lattice_1_thread", dict(common, step="crf_lattice", threads=1)))
    if not args.skip_pydensecrf2:
        crf_steps.append(("crf_pydensecrf2", dict(common, step="crf_pydensecrf2", device="cpu")))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in crf_steps}
    for round_number in range(args.rounds):
        for name, spec in crf_steps:
            result = run_isolated(spec)
            runs[name].append(result)
            _report(f"{name} (round {round_number + 1})", result, spec["device"])
    timed = {name: [r for r in results if "error" not in r] for name, results in runs.items()}
    for name, results in timed.items():
        if results:
            seconds = [r["seconds"] for r in results]
            median = statistics.median(seconds)
            print(f"{name:>24}: median {median:.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f}), "
                  f"peak memory {max(r['peak_mib'] for r in results):.1f} MiB")
    ref = timed.get("crf_pydensecrf2")
    for name in [n for n, _ in crf_steps if n != "crf_pydensecrf2"]:
        ours = timed.get(name)
        if not (ours and ref) or len(ours) != len(ref):
            continue
        ratios = [b["seconds"] / a["seconds"] for a, b in zip(ours, ref)]
        agree = float((ours[0]["labels"] == ref[0]["labels"]).mean())
        diff = float(np.abs(ours[0]["probs_sample"] - ref[0]["probs_sample"]).max())
        print(f"DenseCRF {name}: {statistics.median(ratios):.2f}x faster than pydensecrf2 (median of the rounds' "
              f"ratios; {min(ratios):.2f}x to {max(ratios):.2f}x); label agreement {agree * 100:.3f}%, "
              f"max |dQ| (every 16th pixel) {diff:.2e}")
    steps = ["pamr", "guided", "joint_bilateral"] + ([] if args.skip_loftup else ["loftup"])
    for step in steps:
        _report(step, run_isolated(dict(common, step=step)), args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
