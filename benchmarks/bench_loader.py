"""Training-batch handover from DataLoader worker processes, packed and unpacked, side by side in one run.

Workers draw batches of real DSB crops (the shipped recipe: 192 x 192, median diameter 20 px, 80 % of the
samples without a context) and hand them to this process, which pins them (as the trainer does for a GPU)
and unpacks them. Packed batches (:meth:`~napari_ctxseg.core.train.data.Batch.packed`: float16, the
references of context samples only) against the plain float32 ones. Model steps are excluded: this is the
rate at which the loader can feed a GPU.

Usage: ``python benchmarks/bench_loader.py [--workers 2] [--batch-size 64] [--seconds 40] [--rounds 8]``
Prints MB per batch and crops/s per setting (the median of alternating rounds), and the ratios.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_ctxseg.core.train.data import AugmentConfig, BatchStream, CropSampler
from napari_ctxseg.services.training import load_folder_pairs, read_split

ROOT = Path(__file__).resolve().parents[1]


def _mb(batch) -> float:
    ts = (batch.image, batch.flow, batch.weight, batch.ref_image, batch.ref_flow, batch.ref_mask)
    return sum(t.numel() * t.element_size() for t in ts if t is not None) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--crop-size", type=int, default=192)
    ap.add_argument("--seconds", type=float, default=40.0, help="timed seconds per setting")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds the seconds are split into")
    ap.add_argument("--images", type=int, default=100, help="training images to crop from")
    args = ap.parse_args()
    torch.set_num_threads(1)

    names = read_split(args.data / "split.json", "train")[: args.images]
    images = load_folder_pairs(args.data / "images", args.data / "labels", names, workers=args.workers)
    sampler = CropSampler(images, args.crop_size, augment=AugmentConfig(target_diameter=20), p_no_context=0.8)
    print(
        f"{args.workers} workers, batch {args.batch_size} of {args.crop_size} x {args.crop_size}, "
        f"{len(images)} images, p_no_context 0.8, {args.seconds:.0f} s per setting in {args.rounds} rounds"
    )
    iters = {}
    for name, pack in (("float32", False), ("packed", True)):
        stream = BatchStream(sampler, args.batch_size, context=True, seed=(0,), pack=pack)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=args.workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4,
        )
        iters[name] = iter(loader)
        for _ in range(2 * args.workers):  # every worker started and warm
            next(iters[name])
    # alternate short rounds (the idle loader's workers wait on their full queues, which are drained
    # untimed first): a busy machine slows both settings alike instead of whichever ran then
    rates: dict[str, list[float]] = {name: [] for name in iters}
    sizes: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, it in iters.items():
            for _ in range(4 * args.workers):  # the batches queued while the other setting ran
                next(it)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds / args.rounds:
                batch = next(it)
                sizes[name] = _mb(batch)
                batch.unpacked()
                n += args.batch_size
            rates[name].append(n / (time.perf_counter() - t0))
    print(f"{'setting':<10} {'MB/batch':>9} {'crops/s (median of rounds)':>27}  rounds")
    med = {name: float(np.median(r)) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:<10} {sizes[name]:>9.1f} {med[name]:>27.1f}  {' '.join(f'{v:.0f}' for v in r)}")
    print(
        f"packed / float32: {sizes['packed'] / sizes['float32']:.2f}x the bytes, "
        f"{med['packed'] / med['float32']:.2f}x the crops/s"
    )


if __name__ == "__main__":
    main()
