"""Rebuild the bundled default model: nuclei and whole cells, with contexts from the same data set.

One command, fixed step count, fixed seeds, named data (see docs/model_card.md, *Recipe*)::

    python scripts/train_default.py train --data ../shared/data -o runs/default.safetensors

(``train`` is the default subcommand and may be left out). ``--stage shipped`` (the default) runs the whole
recipe: stage 1, then the uniform average of its start and its result in float16 (the average kept the
nuclei score that stage 1 alone lost: candidate M2 of docs/history/candidates.md), then the declaration of
the sampler settings measured on the shipped weights (model card, *Settings*). ``--stage 1`` stops after
stage 1 (candidate M1); ``--stage 2 --base STAGE1`` continues stage 1's weights with more nuclei (candidate
M3, not shipped).

Two helpers of the recipe are subcommands too:

    python scripts/train_default.py average A.safetensors B.safetensors [...] -o out.safetensors [--half]
    python scripts/train_default.py declare CK.safetensors --solvers euler,edf --max-steps 2 --evidence TEXT

``average`` writes the uniform average of the weights of checkpoints of one architecture (a "weight soup":
interpolating a model with its fine-tuned continuation often generalises better than either end, Wortsman
et al., "Robust fine-tuning of zero-shot models", CVPR 2022); every input must have the same model config
and sigma_data, and the output records their SHA-256 and provenance. ``declare`` writes into a checkpoint
the sampler settings its weights were validated with (``--clear`` removes them): the segment widget and
``ctxseg segment``/``eval`` warn when a run asks for more steps, or another solver with more than one step,
than the checkpoint declares (``napari_ctxseg.core.io.checkpoint.sampling_advice``); the tensors are kept
bit for bit and the file is rewritten atomically.

The recipe continues from the nuclei-only weights of release 226fe68 (read from git, SHA-256 a8c84923...,
itself the end of a chain of DSB-only runs; docs/history/) and trains 1400 steps of batch 16 on 192 x 192
crops on the folders that may train the shipped model (licences: ../shared/data/README.md):

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


# The sampler settings measured on the shipped weights (docs/model_card.md, *Settings*), declared in the file
SHIPPED_SAMPLING = {
    "solvers": ["euler", "edf"],
    "max_steps": 2,
    "evidence": "AP@0.5 on 10 grey DSB val images, 1 sample: 1 step 0.75; 2 steps edf 0.77, euler 0.75, "
    "heun 0.00; 4 steps edf 0.04, euler 0.70, heun 0.01; docs/model_card.md",
}


def average(checkpoints: list[Path], output: Path, *, half: bool = False) -> Path:
    """The uniform average of the weights of ``checkpoints`` (one model config and sigma_data), written to
    ``output`` (float16 with ``half``) with each input's SHA-256 and provenance."""
    import torch

    from napari_ctxseg.core.errors import CheckpointError
    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.load import load_checkpoint

    if len(checkpoints) < 2:
        raise CheckpointError(f"give at least two checkpoints to average, got {len(checkpoints)}")
    loaded = [load_checkpoint(p) for p in checkpoints]
    model, first = loaded[0]
    for path, (_, info) in zip(checkpoints[1:], loaded[1:]):
        if info.config != first.config or info.sigma_data != first.sigma_data:
            raise CheckpointError(f"{path} has another model config or sigma_data than {checkpoints[0]}")
    states = [m.state_dict() for m, _ in loaded]
    averaged = {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    model.load_state_dict(averaged)
    provenance = {
        "average_of": [
            {"checkpoint": p.name, "sha256": info.sha256, "provenance": info.provenance}
            for p, (_, info) in zip(checkpoints, loaded)
        ]
    }
    save_checkpoint(
        output,
        model,
        sigma_data=first.sigma_data,
        provenance=provenance,
        dtype=torch.float16 if half else None,
    )
    print(f"wrote {output} (average of {len(loaded)} checkpoints)", flush=True)
    return output


def declare(checkpoint: Path, sampling: dict | None) -> None:
    """Declare the validated sampler settings in ``checkpoint`` (``None``: remove them), in place."""
    from napari_ctxseg.core.io.checkpoint import file_sha256, read_info, set_sampling

    set_sampling(checkpoint, sampling)  # checks the solver names (CheckpointError)
    info = read_info(checkpoint)
    print(f"{checkpoint}: sampling {info.sampling}; sha256 {file_sha256(checkpoint)}", flush=True)


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


def rebuild(args: argparse.Namespace) -> Path:
    """The ``train`` subcommand: the shipped recipe (stage 1, average, declaration) or one stage."""
    if args.stage == "2" and args.base is None:
        raise SystemExit("--stage 2 continues stage 1: give its weights with --base")
    with tempfile.TemporaryDirectory() as tmp:
        start = args.base or base_weights(Path(tmp) / "base.safetensors")
        if args.stage != "shipped":
            return train_stage(STAGES[int(args.stage)], start, args.output, args)
        stage1 = args.output.with_name(f"{args.output.stem}.stage1.safetensors")
        train_stage(STAGES[1], start, stage1, args)
        average([start, stage1], args.output, half=True)
    declare(args.output, SHIPPED_SAMPLING)
    return args.output


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("train", "average", "declare")
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]  # the recipe is the default subcommand
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="rebuild the bundled weights (the default subcommand)")
    tr.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder"
    )
    tr.add_argument("-o", "--output", type=Path, default=Path("runs/default.safetensors"))
    tr.add_argument(
        "--stage",
        choices=["shipped", *map(str, STAGES)],
        default="shipped",
        help="'shipped': stage 1, the average with its start and the sampling declaration (the bundled "
        "weights); '1' or '2': that stage alone",
    )
    tr.add_argument(
        "--base",
        type=Path,
        help=f"weights the stage starts from (default: those of {BASE_COMMIT}; stage 2: stage 1's, required)",
    )
    tr.add_argument("--checkpoint-every", type=int, default=250, help="also write the weights every N steps")
    tr.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    tr.add_argument("--loader-workers", type=int, default=2, help="batch-drawing processes (%(default)s)")
    tr.add_argument("--device", default="cpu")

    av = sub.add_parser("average", help="the uniform average of checkpoints of one architecture")
    av.add_argument("checkpoints", nargs="+", type=Path)
    av.add_argument("-o", "--output", type=Path, required=True)
    av.add_argument("--half", action="store_true", help="store weights as float16")

    de = sub.add_parser("declare", help="declare the sampler settings a checkpoint was validated with")
    de.add_argument("checkpoint", type=Path)
    de.add_argument("--solvers", default="euler,edf", help="comma-separated solver names")
    de.add_argument("--max-steps", type=int, default=2)
    de.add_argument("--evidence", default="", help="where the limit comes from (shown in the warning)")
    de.add_argument("--clear", action="store_true", help="remove the declaration instead")

    args = ap.parse_args(argv)
    from napari_ctxseg.core.errors import CheckpointError

    try:
        if args.command == "train":
            rebuild(args)
        elif args.command == "average":
            average(args.checkpoints, args.output, half=args.half)
        else:
            solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
            sampling = {"solvers": solvers, "max_steps": args.max_steps, "evidence": args.evidence}
            declare(args.checkpoint, None if args.clear else sampling)
    except CheckpointError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
