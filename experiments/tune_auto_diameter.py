"""Fit the automatic object-size rule on *training* images (never on val).

For each image: segment at native scale (1 step), estimate the median object diameter from those labels,
then segment again at several rescale factors and record TP/FP/FN at IoU 0.5. Prints pooled AP@0.5 of
candidate rules ``scale = clip(target / estimate, lo, hi)`` so the rule's constants come from train data.

Usage: ``python experiments/tune_auto_diameter.py [--checkpoint default] [--images 80] [--json out.json]``
(``--report out.json`` reprints the report without segmenting again)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_ctxseg.core.flows.postprocess import median_diameter
from napari_ctxseg.core.metrics.scores import matching_scores
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.segment import MODEL_DIAMETER, auto_scale, segment
from napari_ctxseg.services.training import _find, read_array, read_split

ROOT = Path(__file__).resolve().parents[1]
SCALES = (0.6, 0.8, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--images", type=int, default=80, help="train images, evenly spaced over the split")
    ap.add_argument("--json", type=Path, help="write the per-image counts here")
    ap.add_argument("--report", type=Path, help="only print the report of an earlier --json file")
    args = ap.parse_args()
    if args.report:
        return _from_json(args.report)
    names = read_split(args.data / "split.json", "train")
    names = names[:: max(1, len(names) // args.images)][: args.images]
    loaded = load_model(args.checkpoint, device="cpu")
    rows = []
    for i, name in enumerate(names):
        image = read_array(_find(args.data / "images", name))
        gt = read_array(_find(args.data / "labels", name))
        est = median_diameter(segment(image, loaded=loaded).labels)
        counts = {}
        for s in SCALES:
            labels = segment(image, loaded=loaded, diameter=MODEL_DIAMETER / s).labels
            m = matching_scores(labels, gt, (0.5,))[0.5]
            counts[s] = (m.tp, m.fp, m.fn)
        rows.append({"name": name, "estimate": est, "counts": {str(k): v for k, v in counts.items()}})
        print(
            f"[{i + 1}/{len(names)}] {name[:12]} est {est:.1f} "
            + " ".join(f"{s}:{c[0] / max(1, sum(c)):.2f}" for s, c in counts.items()),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    report(rows)


def _from_json(path: Path) -> None:
    report(json.loads(Path(path).read_text()))


def _nearest(scale: float) -> str:
    return str(min(SCALES, key=lambda s: abs(np.log(s / scale))))


def report(rows: list[dict]) -> None:
    def pooled(rule, subset=None) -> float:
        tp = fp = fn = 0
        for r in subset if subset is not None else rows:
            c = r["counts"][_nearest(rule(r["estimate"]))]
            tp, fp, fn = tp + c[0], fp + c[1], fn + c[2]
        return tp / max(1, tp + fp + fn)

    print(f"native scale: pooled AP@0.5 {pooled(lambda e: 1.0):.3f}")
    print(f"oracle (best scale per image): {_oracle(rows):.3f}")
    print(f"shipped rule (services.segment.auto_scale): {pooled(auto_scale):.3f}")
    for lo in (1.0, 0.5):
        for target in (16, 20, 22, 24, 26, 28):
            line = [f"target {target} px, scale in [{lo}, 2], applied when >= m (or <= 1/m):"]
            for m in (1.0, 1.15, 1.3, 1.5, 1.7):
                line.append(f"m {m} {pooled(_rule(target, lo, 2.0, m)):.3f}")
            print(" ".join(line))
    print("by measured size (pooled AP@0.5 at each fixed scale):")
    for lo, hi in ((0, 12), (12, 14), (14, 17), (17, 21), (21, 28), (28, 1e9)):
        sub = [r for r in rows if lo <= r["estimate"] < hi]
        if sub:
            cells = " ".join(f"{s}:{pooled(lambda e, s=s: s, sub):.3f}" for s in SCALES)
            print(f"  {lo}-{hi if hi < 1e9 else 'inf'} px ({len(sub)} images): {cells}")


def _rule(target: float, lo: float, hi: float, min_rescale: float = 1.0):
    def rule(e: float) -> float:
        s = float(np.clip(target / e, lo, hi)) if e else 1.0
        return s if max(s, 1.0 / s) >= min_rescale else 1.0

    return rule


def _oracle(rows: list[dict]) -> float:
    tp = fp = fn = 0
    for r in rows:
        c = max(r["counts"].values(), key=lambda c: c[0] / max(1, sum(c)))
        tp, fp, fn = tp + c[0], fp + c[1], fn + c[2]
    return tp / max(1, tp + fp + fn)


if __name__ == "__main__":
    main()
