#!/usr/bin/env bash
# Phase 9 of the bundled default model (docs/model_card.md): 115 minutes on 2 CPU cores from the phase-8
# weights, same recipe as phase 6 (median nucleus diameter rescaled to 20 px, then 0.5-2x) with bfloat16
# autocast (--precision bf16) and a peak learning rate of 1e-4. Run from the repository root.
# BASE: the phase-8 weights (scripts/train_default_phase8.sh).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase8.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 115 --val-every 0 \
  --lr 1e-4 --p-sigma-max 0.6 --seed 10 --threads 2 --loader-workers 2 --device cpu --half \
  --target-diameter 20 --precision bf16 --checkpoint-every 500 -o runs/phase9.safetensors "$@"
