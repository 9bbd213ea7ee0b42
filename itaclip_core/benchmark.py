"""Speed and memory of the batched pipeline against the straightforward algorithm, on the same inputs.

    python -m itaclip_core.benchmark --models tiny vit-b-16 --settings voc coco_stuff [--device cuda --dtype float16]
    python -m itaclip_core.benchmark --models tiny --methods naclip,clearclip,resclip   # the method zoo

For each random model size and dataset setting it measures, each in a fresh process (so peak memory belongs to that
step alone):
- text classifier: the straightforward construction (one batch of 80 prompts per text at the full 77 tokens) and
  ours cold (batched, trimmed at the end-of-text token, no cache) and warm (disk cache);
- one image: the straightforward per-window, per-view inference (as the published code) and ours (batched);
and checks the two give the same probabilities and labels. With `--methods` (method names, each run with its VOC21
preset, or preset names) the image step of each method is compared with that method's straightforward per-window
route (`itaclip_core.methods.straightforward`: one window at a time, explicit attention maps, full-tensor PAMR,
a full canvas); ITACLIP and SCLIP use `itaclip_core.reference`. Random weights give meaningless segmentations but the
exact same amount of work as the real weights of that size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS = {"voc": "itaclip_voc21", "coco_stuff": "itaclip_coco_stuff"}
# --methods NAME: the preset it is measured with
METHOD_PRESETS = {"itaclip": "itaclip_voc21", "sclip": "sclip_voc21", "naclip": "naclip_voc21",
                  "clearclip": "clearclip_voc21", "resclip": "resclip_voc21", "scclip": "scclip_voc21",
                  "cliptrase": "cliptrase_voc21"}
# The 300x420 reference image in a source checkout; the shipped sample photo otherwise.
_CHECKOUT_IMAGE = Path(__file__).resolve().parent.parent / "tests" / "golden" / "synthetic_300x420.png"
DEFAULT_IMAGE = _CHECKOUT_IMAGE if _CHECKOUT_IMAGE.is_file() else Path(__file__).parent / "assets" / "sample_coffee.jpg"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak resident memory of this process while a step runs, sampled every 50 ms (Linux; more often, the
    sampling thread itself slows steps made of many small operations)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.start = _rss_mib()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def added_mib(self) -> float:
        """How far the step raised the resident memory above where it started."""
        return self.peak - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(spec: dict[str, Any]):
    from itaclip_core import load_clip
    from itaclip_core.presets import apply_overrides, get_preset

    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    device = torch.device(spec["device"])
    model = load_clip(f"random-{spec['model']}", device=device, dtype=spec["dtype"])
    config = apply_overrides(get_preset(SETTINGS.get(spec["setting"], spec["setting"])), spec.get("overrides") or [])
    return model, config, device


def _texts(config, background_aux: bool = True):
    from itaclip_core.segmentor import resolve_text_path
    from itaclip_core.text.classes import read_aux_file, read_class_file

    vocab = read_class_file(resolve_text_path(config.classes, "class file"))
    aux = [t for _, t in read_aux_file(resolve_text_path(config.aux_file, "aux file"))] if config.aux_file else None
    return vocab, aux


@torch.no_grad()
def _warm_up(model, config, device: torch.device) -> None:
    """One small pass through both towers, so that one-off start-up costs (kernel selection, allocator growth,
    CUDA context) are not counted in the first timed step of either algorithm."""
    from itaclip_core.attention.dense import dense_tokens
    from itaclip_core.text.tokenizer import tokenize

    side = config.crop or model.visual.input_resolution  # crop 0: whole image
    if config.readout == "tokens":
        dense_tokens(model.visual, torch.zeros(2, 3, side, side, device=device, dtype=model.dtype),
                     config.dense_config())
    model.encode_text(tokenize(["a photo of a warm-up."]).to(device))
    _sync(device)


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in its own process. spec["task"] in text_reference, text_ours, image_reference, image_ours."""
    from itaclip_core import reference
    from itaclip_core.text.classifier import build_classifier, load_templates

    model, config, device = _setup(spec)
    vocab, aux = _texts(config)
    templates = load_templates(config.templates)
    _warm_up(model, config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result: dict[str, Any] = {"texts": len(vocab.queries) + (len(aux) if aux else 0), "prompts_per_text": len(templates)}
    task = spec["task"]
    if task == "text_reference":
        limit = spec.get("text_limit")
        queries = vocab.queries[:limit] if limit else vocab.queries
        _sync(device)
        with RssSampler() as memory:
            start = time.perf_counter()
            reference.text_features(model, queries, templates)
            _sync(device)
            elapsed = time.perf_counter() - start
        result["step_rss_mib"] = memory.added_mib
        result["measured_texts"] = len(queries)
        result["seconds"] = elapsed * result["texts"] / len(queries)
        result["extrapolated"] = len(queries) < result["texts"]
    elif task == "text_ours":
        cache = Path(spec["cache_dir"])
        for key in ("cold", "warm"):
            _sync(device)
            with RssSampler() as memory:
                start = time.perf_counter()
                build_classifier(model, vocab, templates, aux, config.aux_coef, config.background,
                                 batch_size=config.text_batch_size, cache_dir=cache)
                _sync(device)
                result[f"seconds_{key}"] = time.perf_counter() - start
            if key == "cold":
                result["step_rss_mib"] = memory.added_mib
        result["seconds"] = result["seconds_cold"]
    else:
        from itaclip_core.presets import override_keys
        from itaclip_core.segmentor import Segmentor

        # Settings given with --set are kept on every backbone; the others are fitted to it.
        segmentor = Segmentor(model, config, cache_dir=Path(spec["cache_dir"]),
                              keep=override_keys(spec.get("overrides")))
        prepared = segmentor.prepare(spec["image"])  # the preset's protocol (CLIPtrase's: the centre crop)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        step_rss = 0.0
        for _ in range(spec["repeats"]):
            _sync(device)
            sampler = RssSampler().__enter__()
            start = time.perf_counter()
            if task == "image_reference":
                if config.method in ("itaclip", "sclip"):
                    route = reference.predict
                else:
                    from itaclip_core.methods.straightforward import predict as route
                probs, labels = route(model, prepared.tensor, prepared.original_size, segmentor.classifier,
                                      segmentor.config)
                probs = probs.cpu().numpy()
            else:
                prediction = segmentor.predict_prepared(prepared)
                probs, labels = prediction.probs, prediction.labels
            _sync(device)
            times.append(time.perf_counter() - start)
            sampler.__exit__()
            step_rss = max(step_rss, sampler.added_mib)
        result["step_rss_mib"] = step_rss
        result["seconds"] = float(np.median(times))
        result["all_seconds"] = times
        result["windows"] = len(segmentor.engine.windows(*prepared.tensor.shape[-2:]))
        result["views"] = segmentor.engine.num_views
        result["backbone"] = segmentor.backbone_fit.target.key
        result["batch_size"] = segmentor.engine.batch_size
        result["fitted"] = {"crop": segmentor.config.crop, "stride": segmentor.config.stride,
                            "fuse_blocks": list(segmentor.config.fuse_blocks)}
        np.savez_compressed(spec["output"], probs=probs, labels=labels)
    result["peak_rss_mib"] = _peak_rss_mib()
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _child(measure: Any, spec: dict[str, Any], queue: mp.Queue) -> None:
    try:
        queue.put(measure(spec))
    except BaseException as error:  # report, never hang the parent
        queue.put({"error": f"{type(error).__name__}: {error}"})


def in_fresh_process(measure: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(spec)` (a module-level function) in a fresh spawned process, so that peak memory belongs to that
    step alone: its result, or `{"error": "Type: message"}` when it raised."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(measure, spec, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh process and return its result."""
    result = in_fresh_process(_measure, spec)
    if "error" in result:
        raise RuntimeError(f"{spec['task']} ({spec['model']}, {spec['setting']}) failed: {result['error']}")
    return result


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="itaclip-bench-"))
    settings = args.settings
    if args.methods:
        from itaclip_core.presets import PRESETS

        settings = [METHOD_PRESETS.get(name, name) for name in args.methods.split(",") if name]
        unknown = [name for name in settings if name not in PRESETS]
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)}; methods: {', '.join(METHOD_PRESETS)} "
                             "(or any preset name)")
    for model in args.models:
        for setting in settings:
            base = {"model": model, "setting": setting, "device": args.device, "dtype": args.dtype,
                    "threads": args.threads, "image": str(args.image), "repeats": args.repeats,
                    "overrides": args.set}
            row: dict[str, Any] = {"model": model, "setting": setting, "device": args.device, "dtype": args.dtype}
            cache = work / f"cache-{model}-{setting}"
            print(f"[{model} / {setting}] text, ours ...", flush=True)
            row["text_ours"] = run_isolated({**base, "task": "text_ours", "cache_dir": str(cache)})
            if not args.skip_reference and not args.methods:  # the text side is the same for every method
                print(f"[{model} / {setting}] text, straightforward ...", flush=True)
                row["text_reference"] = run_isolated({**base, "task": "text_reference", "text_limit": args.text_limit})
            if "image" not in args.steps:
                rows.append(row)
                print_row(row)
                continue
            print(f"[{model} / {setting}] image, ours ...", flush=True)
            ours_out = work / f"ours-{model}-{setting}.npz"
            row["image_ours"] = run_isolated({**base, "task": "image_ours", "cache_dir": str(cache),
                                              "output": str(ours_out)})
            if not args.skip_reference:
                print(f"[{model} / {setting}] image, straightforward ...", flush=True)
                ref_out = work / f"ref-{model}-{setting}.npz"
                row["image_reference"] = run_isolated({**base, "task": "image_reference", "cache_dir": str(cache),
                                                       "output": str(ref_out), "repeats": args.reference_repeats})
                a, b = np.load(ours_out), np.load(ref_out)
                row["agreement"] = {"max_abs_prob_diff": float(np.abs(a["probs"] - b["probs"]).max()),
                                    "label_agreement": float((a["labels"] == b["labels"]).mean())}
            if args.dtype not in (None, "float32") and args.compare_float32:
                print(f"[{model} / {setting}] image, ours in float32 (for the agreement) ...", flush=True)
                fp32_out = work / f"fp32-{model}-{setting}.npz"
                row["image_ours_float32"] = run_isolated({**base, "dtype": "float32", "task": "image_ours",
                                                          "cache_dir": str(cache) + "-fp32", "output": str(fp32_out)})
                a, b = np.load(ours_out), np.load(fp32_out)
                row["agreement_vs_float32"] = {"max_abs_prob_diff": float(np.abs(a["probs"] - b["probs"]).max()),
                                               "label_agreement": float((a["labels"] == b["labels"]).mean())}
            rows.append(row)
            print_row(row)
    return {"rows": rows, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                      "cpu_threads": args.threads or torch.get_num_threads(),
                                      "processor": platform.processor() or platform.machine(),
                                      "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
            "image": str(args.image)}


def print_row(row: dict[str, Any]) -> None:
    def fmt(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:8.2f} s"

    text_ref = row.get("text_reference", {})
    img_ref = row.get("image_reference", {})
    ours, ours_img = row["text_ours"], row.get("image_ours")
    note = f" (extrapolated from {text_ref['measured_texts']} texts)" if text_ref.get("extrapolated") else ""
    print(f"  text classifier ({ours['texts']} texts x {ours['prompts_per_text']} prompts): "
          f"straightforward {fmt(text_ref.get('seconds'))}{note} | ours cold {fmt(ours['seconds_cold'])} "
          f"| warm {fmt(ours['seconds_warm'])}"
          + (f" | speed-up cold {text_ref['seconds'] / ours['seconds_cold']:.1f}x" if text_ref else ""))
    if ours_img is None:
        return
    gpu = "peak_gpu_mib" in ours_img

    def memory(step: dict[str, Any]) -> str:
        if not step:
            return "-"
        if gpu:
            return f"peak {step['peak_gpu_mib']:.0f} MiB on the GPU"
        return f"+{step['step_rss_mib']:.0f} MiB RSS, process peak {step['peak_rss_mib']:.0f} MiB"

    if "backbone" in ours_img:
        fitted = ours_img["fitted"]
        print(f"  backbone {ours_img['backbone']}: crop {fitted['crop']}, stride {fitted['stride']}, fused blocks "
              f"{tuple(fitted['fuse_blocks'])}, batch {ours_img['batch_size']}")
    print(f"  image ({ours_img['windows']} windows x {ours_img['views']} views): "
          f"straightforward {fmt(img_ref.get('seconds'))} ({memory(img_ref)}) | "
          f"ours {fmt(ours_img['seconds'])} ({memory(ours_img)}), {1 / ours_img['seconds']:.2f} images/s"
          + (f" | speed-up {img_ref['seconds'] / ours_img['seconds']:.2f}x" if img_ref else ""))
    for key, what in (("agreement", "with the straightforward algorithm"), ("agreement_vs_float32", "with float32")):
        if key in row:
            agreement = row[key]
            print(f"  agreement {what}: max |prob diff| {agreement['max_abs_prob_diff']:.2e}, "
                  f"labels equal on {100 * agreement['label_agreement']:.3f}% of pixels", flush=True)
    if "image_ours_float32" in row:
        fp32 = row["image_ours_float32"]["seconds"]
        print(f"  float32 image time {fp32:.2f} s: {row['dtype']} is {fp32 / ours_img['seconds']:.2f}x faster",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m itaclip_core.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit-b-16"],
                        help="random models, space- or comma-separated: sizes (tiny, tiny-l-14, vit-b-16, vit-l-14, "
                        "vit-h-14, ...) or open_clip:<model> (that config at tiny widths)")
    parser.add_argument("--settings", nargs="+", default=["voc", "coco_stuff"], choices=sorted(SETTINGS))
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods ({', '.join(METHOD_PRESETS)}) or preset names, each compared "
                             "with its straightforward per-window route (replaces --settings)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default per device)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of our image path (median)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="timed runs of the straightforward image path")
    parser.add_argument("--text-limit", type=int, default=None,
                        help="time the straightforward text classifier on this many texts and extrapolate")
    parser.add_argument("--steps", nargs="+", default=["text", "image"], choices=["text", "image"],
                        help="what to measure (the text classifier is always built)")
    parser.add_argument("--skip-reference", action="store_true", help="only time our pipeline")
    parser.add_argument("--compare-float32", action="store_true",
                        help="with a lower-precision --dtype, also run ours in float32 and report the agreement")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    args = parser.parse_args(argv)
    args.models = [name for item in args.models for name in item.split(",") if name]
    from itaclip_core.model.random import RANDOM_SIZES

    unknown = [m for m in args.models if m not in RANDOM_SIZES and not m.startswith("open_clip:")]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; use {', '.join(RANDOM_SIZES)} or open_clip:<model>")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if not args.device.startswith("cuda"):
        print("device: CPU" + ("" if torch.cuda.is_available() else " (no GPU available on this machine)"), flush=True)
    results = benchmark(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
