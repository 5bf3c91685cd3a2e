#!/usr/bin/env bash
# Phase 6 of the bundled default model (the shipped weights; docs/model_card.md): 60 minutes on 2 CPU cores from the phase-4 weights with
# every training image first rescaled so its median nucleus diameter is 20 px (the size diameter="auto"
# brings objects to at inference), then the usual random 0.5-2x rescaling. Run from the repository root.
# BASE: the phase-4 weights (scripts/train_default_phase4_gpu.sh; SHA-256 3db98592..., shipped before).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase4.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 60 --val-every 0 \
  --lr 2e-4 --p-sigma-max 0.6 --seed 7 --threads 2 --loader-workers 2 --device cpu --half \
  --target-diameter 20 --checkpoint-every 500 -o runs/phase6.safetensors "$@"
