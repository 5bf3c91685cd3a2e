#!/usr/bin/env bash
# Phase 17 (docs/model_card.md): 105 minutes on 2 CPU cores from the phase-16 weights, the phase-13 recipe
# (median nucleus diameter rescaled to 20 px, then 0.5-2x; 90 % of the samples at sigma_max, 80 % without a
# context; bfloat16 autocast) with a larger batch, as in phase 14 on the GPU (batch 64, the largest gain of
# the recent phases): batch 32 of 192 x 192 (phases 15-16: 8) and a peak learning rate of 2e-4, cosine decay
# by time. The run that produced the shipped weights: 4684 steps (149,900 crops, 23.8 crops/s; a niced
# flow-following sweep shared its first 10 minutes).
# Run from the repository root. BASE: the phase-16 weights (scripts/train_default_phase16.sh).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase16.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 32 --crop-size 192 --steps 100000 --time-budget-min 105 --val-every 0 \
  --lr 2e-4 --p-sigma-max 0.9 --p-no-context 0.8 --seed 17 --threads 2 --loader-workers 2 --device cpu \
  --half --target-diameter 20 --precision bf16 --checkpoint-every 250 -o runs/phase17.safetensors "$@"
