"""Declare in a checkpoint the sampler settings its weights were validated with (or remove the declaration).

The segment widget and ``ctxseg segment``/``eval`` warn when a run asks for more steps, or another solver
with more than one step, than the checkpoint declares (``napari_ctxseg.core.io.checkpoint.sampling_advice``).
The tensors are kept bit for bit; the file is rewritten atomically. Used for the bundled default model
(docs/model_card.md, "Sampler steps").

Usage: ``python scripts/declare_sampling.py CK.safetensors --solvers euler,edf --max-steps 2 --evidence TEXT``
(``--clear`` removes the declaration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_ctxseg.core.diffusion.solvers import SOLVERS
from napari_ctxseg.core.errors import CheckpointError
from napari_ctxseg.core.io.checkpoint import file_sha256, read_info, set_sampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--solvers", default="euler,edf", help=f"comma-separated, of {', '.join(SOLVERS)}")
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--evidence", default="", help="where the limit comes from (shown in the warning)")
    ap.add_argument("--clear", action="store_true", help="remove the declaration instead")
    args = ap.parse_args()
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    sampling = {"solvers": solvers, "max_steps": args.max_steps, "evidence": args.evidence}
    try:
        set_sampling(args.checkpoint, None if args.clear else sampling)  # checks the solver names
    except CheckpointError as e:
        ap.error(str(e))
    info = read_info(args.checkpoint)
    print(f"{args.checkpoint}: sampling {info.sampling}; sha256 {file_sha256(args.checkpoint)}")


if __name__ == "__main__":
    main()
