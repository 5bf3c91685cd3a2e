#!/usr/bin/env bash
# Phase 7 of the bundled default model (docs/model_card.md): 85 minutes on 2 CPU cores from the phase-6
# weights, same recipe as phase 6 (median nucleus diameter rescaled to 20 px, then 0.5-2x) with bfloat16
# autocast (--precision bf16) and a lower peak learning rate. Run from the repository root.
# BASE: the phase-6 weights (scripts/train_default_phase6.sh; SHA-256 8087590e..., shipped before).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase6.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 85 --val-every 0 \
  --lr 1.5e-4 --p-sigma-max 0.6 --seed 8 --threads 2 --loader-workers 2 --device cpu --half \
  --target-diameter 20 --precision bf16 --checkpoint-every 500 -o runs/phase7.safetensors "$@"
