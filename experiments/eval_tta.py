"""Test-time augmentation, measured: flows averaged over dihedral views of each image.

Each image is segmented (1 step x 1 sample, ``diameter`` measured once with the automatic rule) in its 8
flips/transposes; the flows are mapped back to the image's frame, averaged over 1, 2 (identity and the
180-degree rotation), 4 (the flips) or 8 views, and followed. Pooled AP@0.5 per modality, side by side in
one run, including the transposes. The package offers the 4 flips as an option, off by default
(``segment(..., tta=True)``, ``--tta``; docs/history/model_card_nuclei.md, *Test-time flips*).

Usage: ``python experiments/eval_tta.py [--subset val] [--limit N] [--checkpoint default]``
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_ctxseg.services.evaluate import match_counts, modality, pooled_scores
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.progress import run_to_end
from napari_ctxseg.services.segment import (
    FlowParams,
    SegmentRequest,
    labels_from_flows,
    resolve_diameter,
    segment_steps,
)
from napari_ctxseg.services.training import _find, read_array, read_split

ROOT = Path(__file__).resolve().parents[1]
VIEW_SETS = {"1 view": [0], "2 views": [0, 3], "4 views (flips)": [0, 1, 2, 3], "8 views": list(range(8))}


def to_view(image: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` (bit 4: transpose, then bit 1: flip columns, bit 2: flip rows) of an (H, W[, C]) image."""
    if k & 4:
        image = np.swapaxes(image, 0, 1)
    if k & 1:
        image = image[:, ::-1]
    if k & 2:
        image = image[::-1]
    return np.ascontiguousarray(image)


def from_view(flows: np.ndarray, k: int) -> np.ndarray:
    """Flows (N, 2 = (dy, dx), h, w) predicted on view ``k``, in the original image's frame."""
    f = flows.copy()
    if k & 2:
        f = f[..., ::-1, :]
        f[:, 0] *= -1
    if k & 1:
        f = f[..., ::-1]
        f[:, 1] *= -1
    if k & 4:
        f = np.swapaxes(f, -1, -2)[:, ::-1]  # transpose the grid and swap (dy, dx)
    return np.ascontiguousarray(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--subset", default="val")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    names = read_split(args.data / "split.json", args.subset)
    names = names[: args.limit] if args.limit else names
    loaded = load_model(args.checkpoint, device="cpu")
    counts: dict[str, dict[str, np.ndarray]] = {s: {} for s in VIEW_SETS}
    for i, name in enumerate(names):
        image = read_array(_find(args.data / "images", name))
        gt = read_array(_find(args.data / "labels", name))
        keys = (modality(image), "all")
        req = SegmentRequest(image=image, checkpoint=args.checkpoint, device="cpu")
        diameter = run_to_end(resolve_diameter(req, loaded=loaded))
        flows = []
        for k in range(8):
            view = replace(req, image=to_view(image, k), diameter=diameter, follow_flows=False)
            flows.append(from_view(run_to_end(segment_steps(view, loaded=loaded)).flows_model_scale, k))
        for s, views in VIEW_SETS.items():
            mean = np.mean([flows[k] for k in views], axis=0)
            labels, _ = labels_from_flows(mean, FlowParams(), out_shape=image.shape[:2])
            c = np.array(match_counts(labels, gt))
            for key in keys:
                counts[s][key] = counts[s].get(key, 0) + c
        print(f"[{i + 1}/{len(names)}] {name}", flush=True)
    print(f"\npooled AP@0.5 on {args.subset} ({len(names)} images), {args.checkpoint}")
    for s, by_mod in counts.items():
        cells = ", ".join(f"{m} {pooled_scores(*c)['ap50']:.3f}" for m, c in sorted(by_mod.items()))
        print(f"{s:>16}: {cells}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
