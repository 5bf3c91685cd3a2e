#!/usr/bin/env bash
# Phase 22 (docs/model_card.md): 90 minutes on 2 CPU cores from the phase-17 weights with the phase-17 recipe
# (batch 32 of 192 x 192, a cycle from 2e-4; median nucleus diameter rescaled to 20 px; 90 % of the samples at
# sigma_max, 80 % without a context; bfloat16 autocast) and one change: the random rescaling reaches down to
# 0.35x instead of 0.5x (--scale-range 0.35 2), so more nuclei of 5-10 px are seen. Why: on 198 DSB *training*
# images (train split, positions 400-597) the shipped weights miss 351 fluorescence nuclei with no predicted
# object on them, and 274 of those are under 8 px across at the model's scale (median 5.5 px), where only
# 418 of the 7054 annotated nuclei are.
# Ship rule, fixed before the run: the result replaces phase 17 only if it scores above 0.797 on the
# fluorescence images of DSB val (1 step x 1 sample) and is no more than 0.005 worse than phase 17 on val
# overall (0.736), on 150 training images (fluorescence 0.854) and on the resampled check (0.804).
# Run from the repository root. BASE: the phase-17 weights (shipped, SHA-256 3b1e2fc6...).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-src/napari_ctxseg/models/default.safetensors} --images $D/images \
  --labels $D/labels --split $D/split.json --batch-size 32 --crop-size 192 --steps 100000 \
  --time-budget-min 90 --val-every 0 --lr 2e-4 --p-sigma-max 0.9 --p-no-context 0.8 --scale-range 0.35 2 \
  --seed 22 --threads 2 --loader-workers 2 --device cpu --half --target-diameter 20 --precision bf16 \
  --checkpoint-every 250 -o runs/phase22.safetensors "$@"
