"""Benchmark of the mask stage: per source, masks per image and seconds per image for generation; per mask use,
the seconds it adds to a dense run, against the straightforward algorithm in the same run.

    python -m itaclip_core.masks.benchmark [--image PATH] [--weights random-vit-b-16] [--sources ...] [--full-size]

- Generation: each source on the image (uncached), reporting masks per image and seconds. `--full-size` adds SAM
  ViT-B and SAM 2.1 Hiera-T with random weights at their real size (the speed of the real models; random weights
  propose few masks, so the mask counts of those rows mean nothing).
- Vote: the dense ITACLIP run (preset `open_vocab`) is timed once; then the vote (partition + region labels) on
  its output with the first source's masks, vectorised (`voting.partition` + `vote_mode` / `vote_probs`) and
  straightforward (one boolean mask at a time: painted, then its labels counted with `np.bincount`), and the share
  of the dense run each adds. The labels of the two must be identical.
- Attention / proxy: the same dense run with `mask_use=attention` (CLIP correlation) against the plain readout,
  and `mask_use=proxy` (the proxy model with random weights) against the same settings without it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from itaclip_core.resources import asset_path


def _straightforward_vote(labels: np.ndarray, masks: np.ndarray, order: str) -> np.ndarray:
    """The obvious algorithm: paint each mask in order, then relabel each painted region by its most frequent label."""
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    sequence = np.argsort(-areas if order == "small_on_top" else areas, kind="stable")
    regions = np.zeros(labels.shape, dtype=np.int64)
    for index in sequence:
        if areas[index]:
            regions[masks[index]] = index + 1
    out = labels.copy()
    for region in range(1, len(masks) + 1):
        inside = regions == region
        if inside.any():
            out[inside] = np.bincount(labels[inside]).argmax()
    return out


def _timed(function: Any, repeats: int = 3) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=None, help="image (default: the shipped sample_cat.jpg)")
    parser.add_argument("--weights", default="random-vit-b-16", help="CLIP weights (default random-vit-b-16)")
    parser.add_argument("--classes", default="cat, blanket, wall, floor, sofa")
    parser.add_argument("--sources", default="superpixels,superpixels:felzenszwalb,sam:random-tiny,"
                        "sam2:random-tiny", help="comma-separated SOURCE[:GENERATOR or CHECKPOINT] entries")
    parser.add_argument("--full-size", action="store_true", help="also SAM ViT-B and SAM 2.1 Hiera-T, random "
                        "weights at full size (slow on CPUs)")
    parser.add_argument("--points-per-side", type=int, default=8, help="SAM / SAM 2 prompt grid (default 8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the dense run (open_vocab), e.g. --set stride=56")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from itaclip_core.inference.preprocess import read_image_bgr
    from itaclip_core.masks import build_mask_source
    from itaclip_core.masks.voting import partition, vote_mode, vote_probs
    from itaclip_core.model.weights import load_clip
    from itaclip_core.presets import apply_overrides, get_preset
    from itaclip_core.segmentor import Segmentor

    torch.set_grad_enabled(False)
    image_path = args.image or asset_path("sample_cat.jpg")
    rgb = np.ascontiguousarray(read_image_bgr(image_path)[:, :, ::-1])
    results: dict[str, Any] = {"image": str(image_path), "size": list(rgb.shape[:2]), "threads":
                               torch.get_num_threads(), "generation": [], "uses": []}
    print(f"image {image_path} {rgb.shape[1]}x{rgb.shape[0]}, torch threads {torch.get_num_threads()}")

    entries = [e for e in args.sources.split(",") if e]
    if args.full_size:
        entries += ["sam:random", "sam2:random"]
    sam_args = [f"points_per_side={args.points_per_side}"]
    first_masks = None
    print(f"\n{'source':32s} {'masks':>6s} {'seconds':>8s}")
    for entry in entries:
        name, _, extra = entry.partition(":")
        kwargs: dict[str, Any] = {"device": args.device}
        if name in ("sam", "sam2"):
            kwargs.update(checkpoint=extra or None, generator_args=sam_args)
        elif extra:
            kwargs["generator"] = extra
        source = build_mask_source(name, **kwargs)
        if name in ("sam", "sam2"):
            source.mask_generator()  # model construction is not generation time
        start = time.perf_counter()
        masks = source.generate(rgb, image_path.name)
        seconds = time.perf_counter() - start
        results["generation"].append({"source": entry, "masks": len(masks), "seconds": seconds})
        print(f"{entry:32s} {len(masks):6d} {seconds:8.2f}")
        if first_masks is None and len(masks):
            first_masks = masks

    model = load_clip(args.weights, device=args.device, progress=False)
    base = apply_overrides(get_preset("open_vocab"), args.overrides)
    segmentor = Segmentor(model, base, classes=args.classes, cache_dir=None)
    dense_seconds, dense = _timed(lambda: segmentor.predict(rgb), repeats=1)
    print(f"\ndense ITACLIP run ({args.weights}, open_vocab {' '.join(args.overrides)}): {dense_seconds:.2f} s")
    results["dense_seconds"] = dense_seconds
    assert first_masks is not None, "no source produced masks"
    labels, probs = dense.labels, torch.from_numpy(dense.probs)
    for order in ("small_on_top", "large_on_top"):
        fast_s, fast = _timed(lambda: vote_mode(labels, partition(first_masks, order), num_classes=probs.shape[0]))
        slow_s, slow = _timed(lambda: _straightforward_vote(labels, first_masks.masks, order))
        same = bool(np.array_equal(fast, slow))
        row = {"use": f"vote mode ({order})", "seconds": fast_s, "straightforward_seconds": slow_s,
               "share_of_dense": fast_s / dense_seconds, "identical": same}
        results["uses"].append(row)
        print(f"vote mode {order:13s}: {fast_s * 1e3:8.1f} ms ({100 * fast_s / dense_seconds:.2f}% of the dense run)"
              f"; straightforward {slow_s * 1e3:8.1f} ms; identical labels: {same}")
    probs_s, _ = _timed(lambda: vote_probs(labels, partition(first_masks), probs))
    results["uses"].append({"use": "vote probs", "seconds": probs_s, "share_of_dense": probs_s / dense_seconds})
    print(f"vote probs             : {probs_s * 1e3:8.1f} ms ({100 * probs_s / dense_seconds:.2f}% of the dense run)")

    attention = Segmentor(model, base.replace(mask_use="attention", mask_final_vote=False), classes=args.classes,
                          cache_dir=None)
    att_s, _ = _timed(lambda: attention.predict(rgb, masks=first_masks), repeats=1)
    results["uses"].append({"use": "mask attention (clip)", "seconds": att_s, "dense_seconds": dense_seconds,
                            "added_share": att_s / dense_seconds - 1})
    print(f"mask attention (CLIP q+k, spatial + class tokens): {att_s:.2f} s, "
          f"{100 * (att_s / dense_seconds - 1):+.1f}% against the dense run")
    proxy_base = base.replace(image_engineering=False, stride=112, pamr_steps=0)
    plain_s, _ = _timed(lambda: Segmentor(model, proxy_base, classes=args.classes, cache_dir=None).predict(rgb),
                        repeats=1)
    proxy = Segmentor(model, proxy_base.replace(mask_use="proxy", proxy_checkpoint="random"), classes=args.classes,
                      cache_dir=None)
    proxy.predict(rgb)  # builds the proxy model
    proxy_s, _ = _timed(lambda: proxy.predict(rgb), repeats=1)
    results["uses"].append({"use": "proxy (dino_vitb8, random)", "seconds": proxy_s, "plain_seconds": plain_s,
                            "added_share": proxy_s / plain_s - 1})
    print(f"proxy attention (DINO ViT-B/8, stride 112, one view): {proxy_s:.2f} s against {plain_s:.2f} s without "
          f"({100 * (proxy_s / plain_s - 1):+.1f}%)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
