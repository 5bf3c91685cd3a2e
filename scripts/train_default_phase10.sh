#!/usr/bin/env bash
# Phase 10 of the bundled default model (docs/model_card.md): 110 minutes on 2 CPU cores from the phase-9
# weights, same recipe as phase 6 (median nucleus diameter rescaled to 20 px, then 0.5-2x) with bfloat16
# autocast (--precision bf16) and a peak learning rate of 1e-4, but images drawn in proportion to their
# rescaled area (--image-sampling area: every nucleus about equally likely to be in a crop) instead of the
# square root of their area. Run from the repository root.
# BASE: the phase-9 weights (scripts/train_default_phase9.sh).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-runs/phase9.safetensors} --images $D/images --labels $D/labels \
  --split $D/split.json --batch-size 8 --crop-size 192 --steps 100000 --time-budget-min 110 --val-every 0 \
  --lr 1e-4 --p-sigma-max 0.6 --seed 11 --threads 2 --loader-workers 2 --device cpu --half \
  --target-diameter 20 --precision bf16 --checkpoint-every 500 --image-sampling area -o runs/phase10.safetensors "$@"
