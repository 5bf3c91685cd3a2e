"""Object contrast in noise units (``core.postprocess.object_contrast``): what ``min_contrast`` would remove.

Prints the contrast of
1. the objects the model finds on DSB *training* fluorescence images, split into those that match an
   annotated nucleus (IoU >= 0.5) and those that do not;
2. the annotated objects of every DSB training image (per modality) and of the complete MSC frames
   (whole cells, low SNR; no model involved);
3. the objects the model finds on fields of pure noise (no cells at all);
and how many of each a threshold of 1-3 would remove.

Usage: ``python experiments/eval_contrast.py [--checkpoint default] [--start 400] [--stop 598]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile

from napari_ctxseg.core.flows.postprocess import object_contrast, relabel_sequential
from napari_ctxseg.core.metrics.scores import per_object_iou
from napari_ctxseg.services.evaluate import modality
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.segment import segment
from napari_ctxseg.services.training import _find, read_array, read_split

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (1.0, 1.5, 2.0, 3.0)


def summary(name: str, values: list[float] | np.ndarray) -> None:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        print(f"{name}: none")
        return
    # inf: images without measurable noise (a flat background: the median pixel difference is 0)
    q = np.quantile(v[np.isfinite(v)], [0.001, 0.01, 0.5, 0.99]) if np.isfinite(v).any() else []
    below = ", ".join(f"<{t:g}: {(v < t).sum()}" for t in THRESHOLDS)
    print(
        f"{name}: {v.size} objects ({np.isinf(v).sum()} in images without measurable noise); "
        f"quantiles 0.1/1/50/99 % of the others {np.round(q, 2).tolist()}; {below}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--start", type=int, default=400, help="first train-split position segmented")
    ap.add_argument("--stop", type=int, default=598)
    args = ap.parse_args()
    dsb = args.data / "dsb2018_train"
    loaded = load_model(args.checkpoint, device="cpu")
    names = read_split(dsb / "split.json", "train")
    matched, unmatched, annotated = [], [], {}
    for i, name in enumerate(names):
        image = read_array(_find(dsb / "images", name))
        gt = relabel_sequential(read_array(_find(dsb / "labels", name)).astype(np.int64))
        mod = modality(image)
        annotated.setdefault(mod, []).extend(object_contrast(gt, image))
        if mod != "fluorescence" or not args.start <= i < args.stop:
            continue
        pred = segment(image, loaded=loaded).labels
        if pred.max() == 0:
            continue
        c = object_contrast(pred, image)
        hit = per_object_iou(pred, gt).is_tp  # pred is labelled 1..n, as the contrasts
        matched.extend(c[hit])
        unmatched.extend(c[~hit])
    print(f"checkpoint {args.checkpoint}; model on train positions {args.start}-{args.stop - 1}\n")
    summary("model, fluorescence, matched", matched)
    summary("model, fluorescence, unmatched", unmatched)
    for mod, values in sorted(annotated.items()):
        summary(f"annotated DSB train, {mod}", values)
    msc = args.data / "msc_seq01"
    if msc.is_dir():
        frames = [f for f in json.loads((msc / "frames.json").read_text()) if f["complete"]]
        values = []
        for f in frames:
            image = tifffile.imread(msc / "images" / f"{f['name']}.tif")
            gt = relabel_sequential(tifffile.imread(msc / "labels" / f"{f['name']}.tif").astype(np.int64))
            values.extend(object_contrast(gt, image))
        summary("annotated MSC whole cells", values)
    rng = np.random.default_rng(0)
    fields = {
        "Gaussian noise (mean 100, sd 10)": rng.normal(100, 10, (512, 512)),
        "Poisson noise (mean 3)": rng.poisson(3, (512, 512)).astype(np.float64),
    }
    for name, field in fields.items():
        pred = segment(field.astype(np.float32), loaded=loaded).labels
        summary(f"model on {name}", object_contrast(pred, field) if pred.max() else [])


if __name__ == "__main__":
    main()
