"""In-context segmentation on a domain the model never saw: CTC Fluo-C2DL-MSC sequence 01 (whole cells).

Every complete frame is segmented (a) without context and (b) with one *other* complete frame and its
annotation as context (the nearest complete frame in time). Pooled AP@0.5 / F1@0.5 over the frames.

Usage: ``python benchmarks/eval_msc.py [--checkpoint default] [--diameter 75|auto] [--steps 1] [--samples 1]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_ctxseg.cli_segment import parse_diameter
from napari_ctxseg.services.evaluate import match_counts
from napari_ctxseg.services.segment import segment

ROOT = Path(__file__).resolve().parents[1]


def load_frames(data: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    frames = json.loads((data / "frames.json").read_text())
    return [
        (
            f["name"],
            tifffile.imread(data / "images" / f"{f['name']}.tif"),
            tifffile.imread(data / "labels" / f"{f['name']}.tif"),
        )
        for f in frames
        if f["complete"]
    ]


def score(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, float]:
    tp = fp = fn = 0
    for p, g in zip(preds, gts):
        a, b, c = match_counts(p, g)
        tp, fp, fn = tp + a, fp + b, fn + c
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "ap50": tp / max(1, tp + fp + fn),
        "f1_50": 2 * tp / max(1, 2 * tp + fp + fn),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msc_seq01")
    ap.add_argument(
        "--diameter",
        type=parse_diameter,
        default=75.0,
        help="median cell diameter of MSC frames: ~75 px; 'auto' measures it (from the context, if any)",
    )
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--min-size", type=int, default=200)
    args = ap.parse_args()
    frames = load_frames(args.data)
    from napari_ctxseg.services.segment import FlowParams

    opts = dict(
        checkpoint=args.checkpoint,
        device="cpu",
        diameter=args.diameter,
        steps=args.steps,
        num_samples=args.samples,
        flow=FlowParams(min_size=args.min_size),
    )
    results = {}
    for mode in ("no context", "one other frame as context"):
        preds, t0 = [], time.perf_counter()
        for i, (_name, image, _gt) in enumerate(frames):
            kw = dict(opts)
            if mode != "no context":
                j = i - 1 if i > 0 else 1
                kw.update(context_image=frames[j][1], context_labels=frames[j][2])
            preds.append(segment(image, **kw).labels)
        results[mode] = {
            **score(preds, [f[2] for f in frames]),
            "s_per_frame": (time.perf_counter() - t0) / len(frames),
        }
    print(
        f"MSC seq01, {len(frames)} complete frames, checkpoint {args.checkpoint}, diameter {args.diameter}, "
        f"{args.steps} step(s) x {args.samples} sample(s)"
    )
    print(f"{'setting':<28} {'TP':>4} {'FP':>4} {'FN':>4} {'AP@0.5':>7} {'F1@0.5':>7} {'s/frame':>8}")
    for mode, s in results.items():
        print(
            f"{mode:<28} {s['tp']:>4} {s['fp']:>4} {s['fn']:>4} {s['ap50']:>7.3f} {s['f1_50']:>7.3f} "
            f"{s['s_per_frame']:>8.2f}"
        )


if __name__ == "__main__":
    main()
