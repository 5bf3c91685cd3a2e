#!/usr/bin/env bash
# Phase 12 (docs/model_card.md): 110 minutes on 2 CPU cores from the once-shipped phase-9/10 average, the phase-9
# recipe (median nucleus diameter rescaled to 20 px, then 0.5-2x; images drawn by the square root of their
# area; bfloat16 autocast; peak learning rate 1e-4) plus a Gaussian blur of 0.5-2 px on 30 % of the crops
# (--blur-prob 0.3): the nuclei missed on DSB images are mostly small, dim and soft-edged. Run from the
# repository root. BASE: the phase-9/10 average (scripts/average_weights.py; docs/model_card.md).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase9_10_avg.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 110 --val-every 0 \
  --lr 1e-4 --p-sigma-max 0.6 --seed 12 --threads 2 --loader-workers 2 --device cpu --half \
  --target-diameter 20 --precision bf16 --checkpoint-every 500 --blur-prob 0.3 -o runs/phase12.safetensors "$@"
