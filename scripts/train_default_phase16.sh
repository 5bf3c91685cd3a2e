#!/usr/bin/env bash
# Phase 16 (docs/model_card.md): 110 minutes on 2 CPU cores from the phase-15 weights, the phase-13 recipe
# (median nucleus diameter rescaled to 20 px, then 0.5-2x; 90 % of the samples at sigma_max, 80 % without a
# context; bfloat16 autocast; batch 8 of 192 x 192; peak learning rate 1e-4, cosine decay by time).
# Run from the repository root. BASE: the phase-15 weights (scripts/train_default_phase15.sh).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase15.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 110 --val-every 0 \
  --lr 1e-4 --p-sigma-max 0.9 --p-no-context 0.8 --seed 16 --threads 2 --loader-workers 2 --device cpu \
  --half --target-diameter 20 --precision bf16 --checkpoint-every 500 -o runs/phase16.safetensors "$@"
