#!/usr/bin/env bash
# Phase 3 of the bundled default model: a third, shorter cosine cycle from the phase-2 weights (see docs/model_card.md).
# Run from the repository root after scripts/train_default_phase2.sh (copy runs/phase2.safetensors to runs/default_phase2.safetensors).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from runs/default_phase2.safetensors --images $D/images --labels $D/labels \
  --split $D/split.json --steps 3000 --batch-size 8 --crop-size 128 --lr 3e-4 --seed 2 --p-sigma-max 0.6 \
  --val-every 1000 --checkpoint-every 1000 --state runs/phase3.state.safetensors \
  --half -o runs/phase3.safetensors --device cpu "$@"
