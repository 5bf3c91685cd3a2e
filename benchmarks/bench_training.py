"""Training-step throughput of the bundled model on real DSB crops, side by side in one run.

Compares, on the same pre-drawn batches (data loading excluded):

- ``fp32, all references``: every sample's reference crop encoded and attended to (the cost of a batch
  whose samples all use context, and of every batch before no-context samples skipped their reference);
- ``fp32, mixed``: half the samples without context (``p_no_context`` 0.5, the training default), whose
  references are skipped;
- ``bf16, mixed``: the same under ``torch.autocast(dtype=torch.bfloat16)`` (``--precision bf16``).

Usage: ``python benchmarks/bench_training.py [--threads 2] [--batch-size 8] [--crop-size 192] [--steps 8]``
Prints crops/s per setting and the ratios to the first.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from napari_ctxseg.core.train.data import CropSampler
from napari_ctxseg.core.train.trainer import mixed_max_schedule, weighted_edm_loss
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.training import load_folder_pairs, read_split

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop-size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setting (after 2 warm-up steps)")
    ap.add_argument("--images", type=int, default=24, help="training images to crop from")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    names = read_split(args.data / "split.json", "train")[: args.images]
    images = load_folder_pairs(args.data / "images", args.data / "labels", names)  # flows computed here
    sampler = CropSampler(images, args.crop_size, p_no_context=0.5, seed=0)
    batches = [sampler.sample(args.batch_size, context=True) for _ in range(args.steps + 2)]
    base = load_model("default", device="cpu").model
    schedule = mixed_max_schedule("edm", 0.6, 80.0)

    def run(precision: str, all_context: bool) -> float:
        model = copy.deepcopy(base).float().train().requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        times = []
        for b in batches:
            if all_context:
                b = copy.copy(b)
                b.context_weight = torch.ones_like(b.context_weight)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = weighted_edm_loss(model, b, schedule=schedule, sigma_data=1.0, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return args.batch_size * args.steps / sum(times[2:])

    mixed = sum(float(b.context_weight.mean()) for b in batches) / len(batches)
    print(
        f"bundled CtxSegP (small), batch {args.batch_size} of {args.crop_size}^2 real DSB crops, "
        f"{args.threads} threads, torch {torch.__version__}; {mixed:.0%} of samples with context in 'mixed'"
    )
    rows = [
        ("fp32, all references", "fp32", True),
        ("fp32, mixed", "fp32", False),
        ("bf16, mixed", "bf16", False),
    ]
    first = None
    for name, precision, all_context in rows:
        rate = run(precision, all_context)
        first = first or rate
        print(f"{name:<22} {rate:6.1f} crops/s   x{rate / first:.2f}")


if __name__ == "__main__":
    main()
