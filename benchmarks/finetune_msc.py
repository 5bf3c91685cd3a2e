"""Fine-tuning vs in-context use on a new domain: CTC Fluo-C2DL-MSC sequence 01 (whole cells).

The first ``--train-frames`` complete frames (3) are the user's annotations; the other complete frames are
scored (pooled AP@0.5 / F1@0.5, one-to-one matching):

1. the bundled model as it is (no context);
2. in context: the same training frames given as context (no training);
3. after fine-tuning on the training frames for at most ``--budget-min`` minutes of CPU time.

MSC cells are ~75 px across, the model's training scale is 20 px: the frames are rescaled by 20 / 75
for fine-tuning (so the model sees objects of the size it knows) and every inference uses
``diameter=75``, which applies the same rescaling.

Usage: ``python benchmarks/finetune_msc.py [--budget-min 10] [--threads 2] [--out finetuned_msc.safetensors]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from eval_msc import load_frames, score

from napari_ctxseg.services.finetune import FinetuneSettings, finetune_request_from_arrays, run_finetune
from napari_ctxseg.services.progress import run_to_end
from napari_ctxseg.services.segment import MODEL_DIAMETER, FlowParams, segment

ROOT = Path(__file__).resolve().parents[1]


def rescale(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    size = (round(labels.shape[0] * factor), round(labels.shape[1] * factor))
    img = F.interpolate(
        torch.from_numpy(image.astype(np.float32))[None, None],
        size=size,
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0, 0].numpy()
    lab = (
        F.interpolate(
            torch.from_numpy(labels.astype(np.float32))[None, None], size=size, mode="nearest-exact"
        )[0, 0]
        .numpy()
        .astype(np.int32)
    )
    return img, lab


def finetune(args: argparse.Namespace, train: list) -> tuple[Path, int, float]:
    """Fine-tune the base model on the training frames (rescaled to the model's scale) within the budget."""
    factor = MODEL_DIAMETER / args.diameter
    pairs = [(*rescale(image, labels, factor), None, name) for name, image, labels in train]
    settings = FinetuneSettings(
        steps=args.steps,
        lr=3e-4,
        batch_size=4,
        crop_size=128,
        val_fraction=0.0,
        device="cpu",
        threads=args.threads,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    req = finetune_request_from_arrays(pairs, base=args.checkpoint, output=args.out, settings=settings)
    gen = run_finetune(req, time_budget_s=args.budget_min * 60, threads=args.threads)
    t0 = time.perf_counter()

    def report(p) -> None:
        if p.step % 50 == 0:
            print(
                f"  fine-tune step {p.step} loss {p.loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True
            )

    result = run_to_end(gen, report)
    return result.path, result.steps_done, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "msc_seq01")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--diameter", type=float, default=75.0)
    ap.add_argument("--train-frames", type=int, default=3)
    ap.add_argument("--budget-min", type=float, default=10.0)
    ap.add_argument(
        "--steps", type=int, default=2000, help="upper bound; the time budget usually stops first"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-size", type=int, default=200)
    # runs/ is git-ignored: the fine-tuned weights are a by-product, not something to commit
    ap.add_argument("--out", type=Path, default=Path("runs/finetuned_msc.safetensors"))
    ap.add_argument("--finetuned", type=Path, help="score this fine-tuned checkpoint instead of training one")
    args = ap.parse_args()
    frames = load_frames(args.data)
    train, test = frames[: args.train_frames], frames[args.train_frames :]
    flow = FlowParams(min_size=args.min_size)
    opts = dict(device="cpu", diameter=args.diameter, flow=flow)
    gts = [f[2] for f in test]

    def run(**kw) -> tuple[dict, float]:
        t0 = time.perf_counter()
        preds = [segment(image, **opts, **kw).labels for _, image, _ in test]
        return score(preds, gts), (time.perf_counter() - t0) / len(test)

    rows = {"bundled model, no context": run(checkpoint=args.checkpoint)}
    rows[f"in context ({len(train)} frames)"] = run(
        checkpoint=args.checkpoint, context_image=[f[1] for f in train], context_labels=[f[2] for f in train]
    )
    if args.finetuned is None:
        path, steps, train_s = finetune(args, train)
    else:
        from napari_ctxseg.core.io.checkpoint import read_info

        prov = read_info(args.finetuned).provenance
        path, steps, train_s = args.finetuned, prov.get("steps_done"), prov.get("train_seconds", float("nan"))
    rows[f"fine-tuned ({steps} steps, {train_s / 60:.1f} min)"] = run(checkpoint=str(path))
    print(
        f"MSC seq01: train on {[f[0] for f in train]}, score {len(test)} other complete frames; "
        f"diameter {args.diameter}; 1 step x 1 sample; CPU {torch.get_num_threads()} threads"
    )
    print(f"{'setting':<36} {'TP':>4} {'FP':>4} {'FN':>4} {'AP@0.5':>7} {'F1@0.5':>7} {'s/frame':>8}")
    for name, (s, sec) in rows.items():
        print(
            f"{name:<36} {s['tp']:>4} {s['fp']:>4} {s['fn']:>4} {s['ap50']:>7.3f} {s['f1_50']:>7.3f} "
            f"{sec:>8.2f}"
        )


if __name__ == "__main__":
    main()
