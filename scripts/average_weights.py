"""Average the weights of checkpoints of one architecture (a uniform "weight soup").

Used for the bundled default model (docs/model_card.md): the phase-9 weights and their continuation,
phase 10, averaged. Interpolating a model with its own fine-tuned continuation often generalises better
than either end (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022). Every input must
have the same model config and sigma_data; the output records their SHA-256 and provenance.

Usage: ``python scripts/average_weights.py A.safetensors B.safetensors [...] -o out.safetensors [--half]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from napari_ctxseg.core.io.checkpoint import save_checkpoint
from napari_ctxseg.core.nn.load import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--half", action="store_true", help="store weights as float16")
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        ap.error("give at least two checkpoints")
    loaded = [load_checkpoint(p) for p in args.checkpoints]
    model, first = loaded[0]
    for path, (_, info) in zip(args.checkpoints[1:], loaded[1:]):
        if info.config != first.config or info.sigma_data != first.sigma_data:
            ap.error(f"{path} has another model config or sigma_data than {args.checkpoints[0]}")
    states = [m.state_dict() for m, _ in loaded]
    averaged = {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    model.load_state_dict(averaged)
    provenance = {
        "average_of": [
            {"checkpoint": p.name, "sha256": info.sha256, "provenance": info.provenance}
            for p, (_, info) in zip(args.checkpoints, loaded)
        ]
    }
    save_checkpoint(
        args.output,
        model,
        sigma_data=first.sigma_data,
        provenance=provenance,
        dtype=torch.float16 if args.half else None,
    )
    print(f"wrote {args.output} (average of {len(loaded)} checkpoints)")


if __name__ == "__main__":
    main()
