"""Scale robustness of ``diameter="auto"``: DSB images resampled so that their nuclei are 0.5-4x as large.

For every image of a split subset (evenly spaced, ``--images N``) and every factor ``f``: take the central
square of side ``min(--crop, --max-side / f)`` (so the resampled image stays at most ``--max-side`` pixels),
resample image (bilinear) and labels (nearest) by ``f``, and segment it (1 step x 1 sample) with

- ``auto``: ``diameter="auto"`` as shipped (or as changed by ``--set``),
- ``none``: the model's own scale (``diameter=None``),
- ``oracle``: the true median diameter of the resampled labels.

Prints pooled AP@0.5 (one-to-one matching) per factor and method, and the measured/true diameter ratio of
``auto``. Rules are tuned on ``--subset train`` and reported on ``val``.

Usage: ``python experiments/eval_scale.py [--subset train] [--images 40] [--factors 0.5,1,2,3,4]
[--set AUTO_SCALE_RANGE=1,2 --set AUTO_COARSE_MIN=inf ...] [--methods auto,none,oracle] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from skimage.transform import rescale

import napari_ctxseg.services.segment as seg
from napari_ctxseg.core.flows.postprocess import median_diameter
from napari_ctxseg.services.evaluate import match_counts, modality
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.training import _find, read_array, read_split

ROOT = Path(__file__).resolve().parents[1]


def resampled(image: np.ndarray, labels: np.ndarray, f: float, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The central ``side`` square of an image and its labels, resampled by ``f``."""
    h, w = labels.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    image = image[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
    labels = labels[y0 : y0 + side, x0 : x0 + side]
    if f == 1:
        return image, labels
    axis = -1 if image.ndim == 3 else None
    image = rescale(image, f, order=1, anti_aliasing=f < 1, preserve_range=True, channel_axis=axis)
    labels = rescale(labels, f, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return image.astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--subset", default="train")
    ap.add_argument("--images", type=int, default=40, help="evenly spaced over the subset")
    ap.add_argument("--factors", default="0.5,1,2,3,4")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--methods", default="auto,none,oracle")
    ap.add_argument("--set", action="append", default=[], help="NAME=VALUE[,VALUE]: override a rule constant")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for item in args.set:
        name, value = item.split("=")
        if not name.startswith("AUTO_"):
            raise SystemExit(f"--set takes AUTO_* constants of services.segment, not {name}")
        values = tuple(float(v) for v in value.split(","))
        setattr(seg, name, values if len(values) > 1 else values[0])
    factors = [float(v) for v in args.factors.split(",")]
    methods = args.methods.split(",")
    names = read_split(args.data / "split.json", args.subset)
    names = names[:: max(1, len(names) // args.images)][: args.images]
    loaded = load_model(args.checkpoint, device="cpu")
    counts = {(f, m): np.zeros(3, int) for f in factors for m in methods}
    ratios: dict[float, list[float]] = {f: [] for f in factors}
    seconds = {m: 0.0 for m in methods}
    rows = []
    for i, name in enumerate(names):
        image0 = read_array(_find(args.data / "images", name))
        labels0 = read_array(_find(args.data / "labels", name))
        for f in factors:
            image, labels = resampled(image0, labels0, f, int(min(args.crop, args.max_side / f)))
            true = median_diameter(labels)
            if true == 0:
                continue
            row = {"name": name, "modality": modality(image0), "factor": f, "true": true}
            for m in methods:
                diameter = {"auto": "auto", "none": None, "oracle": true}[m]
                t0 = time.perf_counter()
                r = seg.segment(image, loaded=loaded, diameter=diameter)
                seconds[m] += time.perf_counter() - t0
                c = match_counts(r.labels, labels)
                counts[(f, m)] += c
                row[m] = c
                if m == "auto":
                    row["measured"] = r.metadata["measured_diameter"]
                    ratios[f].append(r.metadata["measured_diameter"] / true)
            rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}", flush=True)
    print(f"{args.subset}: {len(names)} images; overrides {args.set or 'none'}")
    print(f"{'factor':>6} " + " ".join(f"{m:>8}" for m in methods) + "   measured/true (auto) p10 p50 p90")
    for f in factors:
        aps = []
        for m in methods:
            tp, fp, fn = counts[(f, m)]
            aps.append(f"{tp / max(1, tp + fp + fn):8.3f}")
        q = np.percentile(ratios[f], [10, 50, 90]) if ratios[f] else [np.nan] * 3
        print(f"{f:>6g} " + " ".join(aps) + "   " + " ".join(f"{v:.2f}" for v in q))
    total = {m: sum(counts[(f, m)] for f in factors) for m in methods}
    print(" all   " + " ".join(f"{t[0] / max(1, t.sum()):8.3f}" for t in total.values()))
    print("s/image: " + ", ".join(f"{m} {seconds[m] / max(1, len(rows)):.2f}" for m in methods))
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.set, "rows": rows}, default=int, indent=1))


if __name__ == "__main__":
    main()
