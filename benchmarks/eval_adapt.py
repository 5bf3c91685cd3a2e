"""One annotated frame of a new kind of cell: no context, the learned context, and adaptation to it.

On ``msc_seq01`` (whole MSC cells, a domain the bundled model never trained on), one complete frame and its
labels are the context, and every other complete frame is scored (pooled AP@0.5):

- without a context;
- with the frame as context (the learned context alone);
- with the frame as context and calibration on it (``calibrate=True``);
- after adapting a copy of the model to the frame for ``--seconds`` (``services.adapt``, the default
  90 s), then segmenting with that copy and the frame as context, without and with calibration (the
  Segment widget's default with a context).

The wall time of the adaptation (setup included) and of segmenting the other frames are printed: the target
is the whole adapted run within 3 CPU minutes. ``--context`` picks the context frame (default: the first
complete one); ``--repeat K`` repeats the adaptation with K context frames (the first K) for a spread.

Usage: ``python benchmarks/eval_adapt.py [--checkpoint default] [--seconds 90] [--repeat 1]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_ctxseg.services.adapt import adapt
from napari_ctxseg.services.evaluate import match_counts
from napari_ctxseg.services.segment import segment

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msc_seq01"


def pooled(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, int, int, int]:
    """Pooled AP@0.5 and the (TP, FP, FN) counts."""
    tp = fp = fn = 0
    for p, g in zip(preds, gts):
        a, b, c = match_counts(p, g)
        tp, fp, fn = tp + a, fp + b, fn + c
    return tp / max(1, tp + fp + fn), tp, fp, fn


def run(context: int, frames: list, checkpoint: str, seconds: float) -> dict[str, tuple]:
    """Scores of each mode with frame ``context`` as the context; the adapted run's wall times."""
    _, ref_image, ref_labels = frames[context]
    targets = [f for i, f in enumerate(frames) if i != context]
    gts = [f[2] for f in targets]
    ctx = dict(context_image=ref_image, context_labels=ref_labels)
    out: dict[str, tuple] = {}
    for mode, kw in (
        ("no context", {}),
        ("learned context", ctx),
        ("learned context + calibration", {**ctx, "calibrate": True}),
    ):
        t0 = time.perf_counter()
        preds = [segment(f[1], checkpoint=checkpoint, device="cpu", **kw).labels for f in targets]
        out[mode] = (*pooled(preds, gts), time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = adapt(
            ref_image, ref_labels, checkpoint=checkpoint, seconds=seconds, output=Path(tmp) / "a.safetensors"
        )
        t_adapt = time.perf_counter() - t0
        preds = [segment(f[1], checkpoint=str(path), device="cpu", **ctx).labels for f in targets]
        out[f"adapted {seconds:g} s + context"] = (*pooled(preds, gts), time.perf_counter() - t0)
        # the widget's default with a context and 'adapt' ticked: calibration on, with the adapted copy
        t1 = time.perf_counter()
        preds = [
            segment(f[1], checkpoint=str(path), device="cpu", calibrate=True, **ctx).labels for f in targets
        ]
        out[f"adapted {seconds:g} s + context + calibration"] = (
            *pooled(preds, gts),
            t_adapt + time.perf_counter() - t1,
        )
    out["_adapt_seconds_wall"] = (t_adapt,)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seconds", type=float, default=90.0, help="adaptation time budget (default 90)")
    ap.add_argument("--repeat", type=int, default=1, help="context frames tried (the first K complete ones)")
    args = ap.parse_args(argv)
    from eval_msc import load_frames

    frames = load_frames(args.data)
    print(f"msc_seq01: {len(frames)} complete frames; checkpoint {args.checkpoint}; 1 step x 1 sample")
    print("| context frame | mode | AP@0.5 | TP / FP / FN | wall s |")
    print("|---|---|---|---|---|")
    for k in range(args.repeat):
        res = run(k, frames, args.checkpoint, args.seconds)
        t_adapt = res.pop("_adapt_seconds_wall")[0]
        for mode, (ap50, tp, fp, fn, wall) in res.items():
            print(f"| {frames[k][0]} | {mode} | {ap50:.3f} | {tp} / {fp} / {fn} | {wall:.0f} |", flush=True)
        print(f"| {frames[k][0]} | (adaptation alone, setup included) | | | {t_adapt:.0f} |", flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
