#!/usr/bin/env bash
# The peer's budget (docs/model_card.md, "Against the peer"): the small preset trained from scratch for
# 40 minutes on the 2 CPU cores (Cellpose 3 from scratch: 44 minutes) with the current recipe (median
# nucleus diameter rescaled to 20 px, then 0.5-2x; 90 % of the samples at sigma_max, 80 % without a
# context; bfloat16 autocast; batch 16 of 192 x 192; peak learning rate 1e-3, cosine decay by time).
# A check of the recipe at that budget, not the shipped weights. Run from the repository root.
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg train --preset small --images $D/images --labels $D/labels --split $D/split.json \
  --batch-size 16 --crop-size 192 --steps 100000 --time-budget-min 40 --val-every 0 --lr 1e-3 \
  --p-sigma-max 0.9 --p-no-context 0.8 --seed 40 --threads 2 --loader-workers 2 --device cpu --half \
  --target-diameter 20 --precision bf16 --checkpoint-every 500 -o runs/budget40.safetensors "$@"
