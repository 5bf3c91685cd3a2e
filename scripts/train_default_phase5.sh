#!/usr/bin/env bash
# Phase 5 of the bundled default model: 65 minutes on one CPU thread from the phase-4 (GPU) weights,
# batch 8 of 192 x 192 crops (see docs/model_card.md). Run from the repository root.
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase4.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 65 --val-every 0 \
  --lr 2e-4 --p-sigma-max 0.6 --seed 6 --threads 1 --device cpu --half --checkpoint-every 500 \
  -o runs/phase5.safetensors "$@"
