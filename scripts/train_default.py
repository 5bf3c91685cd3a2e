"""Rebuild the bundled default model: nuclei and whole cells, with contexts from the same data set.

One command, fixed step count, fixed seed, named data (see docs/model_card.md, *Recipe*):

    python scripts/train_default.py --data ../shared/data -o runs/default.safetensors

then ``scripts/declare_sampling.py`` records the sampler settings measured on the result (model card).
The shipped weights are the uniform average of the start weights and the stage-1 result (candidate M2 of
docs/history/candidates.md): the average kept the nuclei score that stage 1 alone lost.

It continues from the nuclei-only weights of release 226fe68 (read from git, SHA-256 a8c84923..., itself the
end of a chain of DSB-only runs; docs/history/) and trains 1400 steps of batch 16 on 192 x 192 crops on the
folders that may train the shipped model (licences: ../shared/data/README.md):

- ``dsb2018_train`` (CC0) ``train`` split: fluorescence, H&E and bright-field nuclei, half of the crops;
- ``usiigaci_3t3_phase`` (MIT) and ``bbbc030_cho_dic`` (BBBC) ``train`` splits: phase-contrast and DIC whole
  cells, a quarter of the crops each.

What makes the context necessary:

- half of the samples get a context (the rest train the no-context use), and 80 % of those contexts come
  from *another* image of the same data set (DSB: same size and modality), so that the context says what
  an object is in this data set rather than offering pixels to copy;
- a quarter of the samples with a context are *subset tasks*: only the larger (or only the smaller) objects
  are annotated, in the sample and in its context alike, so only the context says which are wanted.

Everything else is the DSB recipe: median object diameter rescaled to 20 px, random rescaling 0.35-2x, 90 %
of the samples at sigma_max (one-step inference), a cosine cycle from 2e-4, bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads sleep instead of spinning while they wait: on a shared 2-core machine a spinning thread
# starves its partner (only speed, never results, depends on this)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
BASE_COMMIT = "226fe68"  # the last nuclei-only release; its weights are the starting point
MODEL_PATH = "src/napari_ctxseg/models/default.safetensors"


@dataclass(frozen=True)
class Stage:
    """One training run of the recipe: steps, learning rate (a cosine cycle), seed, and the data mixture."""

    steps: int
    lr: float
    seed: int
    mixture: dict[str, float]  # data set folder -> share of the training crops


STAGES = {
    1: Stage(1400, 2e-4, 25, {"dsb2018_train": 0.5, "usiigaci_3t3_phase": 0.25, "bbbc030_cho_dic": 0.25}),
    # candidate M3, not shipped (docs/history/candidates.md): stage 1 continued with more nuclei
    2: Stage(800, 1e-4, 26, {"dsb2018_train": 0.6, "usiigaci_3t3_phase": 0.2, "bbbc030_cho_dic": 0.2}),
}


def average(start: Path, trained: Path, output: Path) -> Path:
    """The uniform average of two checkpoints' weights, written (float16) to ``output``."""
    import torch

    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.load import load_checkpoint

    (model, info), (other, _) = load_checkpoint(start), load_checkpoint(trained)
    states = [model.state_dict(), other.state_dict()]
    model.load_state_dict(
        {k: (v.double() + states[1][k].double()).div(2).to(v.dtype) for k, v in states[0].items()}
    )
    provenance = {"recipe": "scripts/train_default.py", "average_of": [info.sha256, str(trained)]}
    save_checkpoint(output, model, sigma_data=info.sigma_data, provenance=provenance, dtype=torch.float16)
    print(f"wrote {output} (average of the start and stage 1)", flush=True)
    return output


def train_names(folder: Path) -> list[str]:
    """Names of the ``train`` split of a data set folder (split.json or meta.json)."""
    split = folder / "split.json"
    if split.is_file():
        return [str(n) for n in json.loads(split.read_text())["train"]]
    return [str(n) for n in json.loads((folder / "meta.json").read_text())["split"]["train"]]


def base_weights(out: Path) -> Path:
    """Write the weights of ``BASE_COMMIT`` to ``out`` (from git) and return the path."""
    blob = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BASE_COMMIT}:{MODEL_PATH}"], check=True, capture_output=True
    ).stdout
    out.write_bytes(blob)
    return out


def train_stage(stage: Stage, base: Path, output: Path, args: argparse.Namespace) -> Path:
    """Run one stage from ``base``; returns the written checkpoint."""
    import torch

    from napari_ctxseg.core.train.data import AugmentConfig, acquisition_key
    from napari_ctxseg.core.train.trainer import TrainConfig
    from napari_ctxseg.services.training import TrainRequest, load_folder_pairs, run_training

    torch.set_num_threads(args.threads)
    images, groups, weights = [], [], []
    for name, share in stage.mixture.items():
        folder = args.data / name
        pairs = load_folder_pairs(
            folder / "images", folder / "labels", train_names(folder), workers=args.loader_workers
        )
        area = sum(float(p.labels.size) ** 0.5 for p in pairs)  # the sampler's sqrt-area weights
        for p in pairs:
            images.append(p)
            # DSB mixes modalities and sizes: its acquisition key; the other folders: one kind each
            groups.append((name, *acquisition_key(p)) if name == "dsb2018_train" else (name,))
            weights.append(share / area)
        print(f"{name}: {len(pairs)} training images, {share:.0%} of the crops", flush=True)
    cfg = TrainConfig(
        steps=stage.steps,
        batch_size=16,
        crop_size=192,
        lr=stage.lr,
        warmup=100,
        seed=stage.seed,
        val_every=0,
        p_sigma_max=0.9,
        p_no_context=0.5,
        p_other_reference=0.8,
        p_subset=0.25,
        augment=AugmentConfig(scale_range=(0.35, 2.0), target_diameter=20.0),
        precision="bf16",
    )
    req = TrainRequest(
        output=output,
        train_images=images,
        base=str(base),
        config=cfg,
        device=args.device,
        half=True,
        checkpoint_every=args.checkpoint_every,
        workers=args.loader_workers,
        groups=groups,
        image_weights=weights,
        provenance={
            "recipe": "scripts/train_default.py",
            "stage": stage.__dict__,
            "base_commit": BASE_COMMIT,
        },
    )
    gen = run_training(req)
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            print(f"wrote {stop.value}", flush=True)
            return Path(stop.value)
        if p.step == 1 or p.step % 25 == 0:
            print(
                f"step {p.step}/{p.total} loss {p.loss:.4f} {p.samples_per_s:.1f} samples/s "
                f"ETA {p.eta_s / 60:.1f} min",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder"
    )
    ap.add_argument("-o", "--output", type=Path, default=Path("runs/default.safetensors"))
    ap.add_argument(
        "--stage",
        choices=["shipped", *map(str, STAGES)],
        default="shipped",
        help="'shipped': stage 1 and the average with its start (the bundled weights); or one stage",
    )
    ap.add_argument(
        "--base", type=Path, help=f"weights the first stage run starts from (default: those of {BASE_COMMIT})"
    )
    ap.add_argument("--checkpoint-every", type=int, default=250, help="also write the weights every N steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    ap.add_argument("--loader-workers", type=int, default=2, help="batch-drawing processes (%(default)s)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    stages = list(STAGES) if args.stage == "all" else [int(args.stage)]
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.base or base_weights(Path(tmp) / "base.safetensors")
        for k in stages:
            out = (
                args.output
                if k == stages[-1]
                else args.output.with_name(f"{args.output.stem}.stage{k}.safetensors")
            )
            weights = train_stage(STAGES[k], weights, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
