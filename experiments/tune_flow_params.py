"""Grid over flow-following settings on *training* images, from flows computed once per image.

Segments N evenly spaced train images once (1 step x 1 sample, ``diameter="auto"``), keeps the model-scale
flows, then re-runs only the flow following for every setting and prints pooled AP@0.5 (one-to-one matching)
per setting, best first. Used to choose :class:`~napari_ctxseg.services.segment.FlowParams` defaults.

Usage: ``python experiments/tune_flow_params.py [--checkpoint default] [--images 60]
[--grid max_flow_err=0,0.4 min_size=15,30]`` (``--grid`` replaces the default grid below; any
:class:`FlowParams` field, comma-separated values).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

from napari_ctxseg.core.metrics.scores import matching_scores
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.segment import FlowParams, labels_from_flows, segment
from napari_ctxseg.services.training import _find, read_array, read_split

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "flow_threshold": (0.3, 0.4, 0.5),
    "min_seed_cnts": (10, 20, 30, 60),
    "niter": (200, 400),
}


def parse_grid(items: list[str]) -> dict[str, tuple]:
    """``["max_flow_err=0,0.4", "niter=200"]`` to ``{"max_flow_err": (0.0, 0.4), "niter": (200,)}``.

    Each value is cast to the type of the field's default in :class:`FlowParams`.
    """
    defaults = FlowParams()
    grid = {}
    for item in items:
        field, sep, values = item.partition("=")
        if not sep or not hasattr(defaults, field):
            raise SystemExit(f"error: --grid takes FIELD=V1,V2 with a FlowParams field, not {item!r}")
        kind = type(getattr(defaults, field))
        cast = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
        grid[field] = tuple(cast(v) for v in values.split(","))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--images", type=int, default=60, help="train images, evenly spaced over the split")
    ap.add_argument("--grid", nargs="+", metavar="FIELD=V1,V2", help="FlowParams fields and their values")
    args = ap.parse_args()
    grid = parse_grid(args.grid) if args.grid else GRID
    names = read_split(args.data / "split.json", "train")
    names = names[:: max(1, len(names) // args.images)][: args.images]
    loaded = load_model(args.checkpoint, device="cpu")
    cached = []
    for name in names:
        image = read_array(_find(args.data / "images", name))
        gt = read_array(_find(args.data / "labels", name))
        r = segment(image, loaded=loaded)
        cached.append((r.flows_model_scale, gt))
    results = []
    for values in itertools.product(*grid.values()):
        params = replace(FlowParams(), **dict(zip(grid, values)))
        tp = fp = fn = 0
        for flows, gt in cached:
            labels, _ = labels_from_flows(flows, params, out_shape=gt.shape)
            m = matching_scores(labels, gt, (0.5,))[0.5]
            tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
        results.append((tp / max(1, tp + fp + fn), dict(zip(grid, values)), (tp, fp, fn)))
        print(f"{results[-1][0]:.4f} {results[-1][1]} TP/FP/FN {results[-1][2]}", flush=True)
    default = {k: getattr(FlowParams(), k) for k in grid}
    print(f"\n{len(names)} train images, checkpoint {args.checkpoint}; best first (default {default}):")
    for ap50, params, counts in sorted(results, key=lambda r: -r[0])[:8]:
        print(f"  AP@0.5 {ap50:.4f}  {params}  TP/FP/FN {counts}")


if __name__ == "__main__":
    main()
