"""3D handling on a real z-stack: ``../shared/data/cells3d_nuclei`` (60 x 256 x 256, 20 annotated nuclei).

Segments the stack in 3D mode and slice by slice (stitched), each with per-plane and stack-wide intensity
normalisation, and prints objects, matched nuclei (3D IoU >= 0.5, one-to-one) and seconds per mode. The
3D rows also give the labels of the same flows followed the original's way (every voxel, no minimum
size), the rule before ``volume_labels`` applied the 2D foreground rule in 3D; the last two rows drop
objects fainter than 3 noise sigmas (``min_contrast``). The annotation is
semi-automatic and leaves out the out-of-focus ends of the nuclei: a fixture, not a benchmark of quality,
so read the false objects loosely.

Usage: ``python benchmarks/eval_cells3d.py [--checkpoint default] [--device cpu]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_ctxseg.core.metrics.scores import matching_scores
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.progress import run_to_end
from napari_ctxseg.services.segment import FlowParams
from napari_ctxseg.services.stack import segment_stack_steps
from napari_ctxseg.services.volume import segment_volume_steps, volume_labels

ROOT = Path(__file__).resolve().parents[1]


def row(name: str, labels: np.ndarray, gt: np.ndarray, seconds: float | None) -> None:
    m = matching_scores(labels, gt, (0.5,))[0.5]
    took = "" if seconds is None else f"{seconds:.1f}"
    print(f"| {name} | {int(labels.max())} | {m.tp} | {m.fp} | {m.fn} | {took} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cells3d_nuclei")
    args = ap.parse_args()
    volume = tifffile.imread(args.data / "image.tif")
    gt = tifffile.imread(args.data / "labels.tif")
    loaded = load_model(args.checkpoint, device=args.device)
    print(f"{volume.shape} volume, {len(np.unique(gt)) - 1} annotated nuclei, checkpoint {args.checkpoint}\n")
    print("| mode | objects | TP | FP | FN | seconds |\n|---|---|---|---|---|---|")
    for normalize in ("plane", "stack"):
        t0 = time.perf_counter()
        labels, flows = run_to_end(segment_volume_steps(volume, normalize=normalize, loaded=loaded))
        seconds = time.perf_counter() - t0
        original = volume_labels(flows, FlowParams(flow_threshold=0.0, min_size=0))
        row(f"3D, every voxel followed (the original's rule), {normalize}", original, gt, None)
        row(f"3D, {normalize}", labels, gt, seconds)
    for normalize in ("plane", "stack"):
        t0 = time.perf_counter()
        labels = run_to_end(segment_stack_steps(volume, normalize=normalize, loaded=loaded)).labels
        row(f"slice by slice, stitched, {normalize}", labels, gt, time.perf_counter() - t0)
    faint = FlowParams(min_contrast=3.0)
    labels, _ = run_to_end(segment_volume_steps(volume, loaded=loaded, flow=faint))
    row("3D, plane, min_contrast 3", labels, gt, None)
    labels = run_to_end(segment_stack_steps(volume, loaded=loaded, flow=faint)).labels
    row("slice by slice, stitched, plane, min_contrast 3", labels, gt, None)


if __name__ == "__main__":
    main()
