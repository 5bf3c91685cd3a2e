#!/usr/bin/env bash
# Phase 2 of the bundled default model: a second cosine cycle from the phase-1 weights (see docs/model_card.md).
# Run from the repository root after scripts/train_default.sh (copy runs/default.safetensors to runs/default_phase1.safetensors).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from runs/default_phase1.safetensors --images $D/images --labels $D/labels \
  --split $D/split.json --steps 3000 --batch-size 8 --crop-size 128 --lr 5e-4 --seed 1 --p-sigma-max 0.6 \
  --val-every 1000 --checkpoint-every 1000 --state runs/phase2.state.safetensors \
  --half -o runs/phase2.safetensors --device cpu "$@"
