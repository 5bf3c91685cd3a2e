#!/usr/bin/env bash
# Phase 21 (docs/model_card.md): 100 minutes on 2 CPU cores from the phase-17 weights with the phase-17 recipe
# (batch 32 of 192 x 192, a cycle from 2e-4; median nucleus diameter rescaled to 20 px, then 0.5-2x; 90 % of
# the samples at sigma_max, 80 % without a context; bfloat16 autocast) plus one new augmentation: in 30 % of
# the crops about half of the objects are dimmed to 10-50 % of their contrast (--dim-prob 0.3). The phases
# since 17 (more minutes, another learning rate or batch, 8 GPU minutes) moved nothing; the fluorescence
# errors include faint nuclei next to bright ones with not a single predicted pixel, which no global
# gamma or contrast change in the current augmentation shows the model.
# Ship rule, fixed before the run: the result replaces phase 17 only if it scores above 0.797 on the
# fluorescence images of DSB val (1 step x 1 sample) and is no more than 0.005 worse than phase 17 on val
# overall (0.736), on 150 training images (fluorescence 0.854) and on the resampled check (0.804).
# Run from the repository root. BASE: the phase-17 weights (shipped, SHA-256 3b1e2fc6...).
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg finetune --from ${BASE:-src/napari_ctxseg/models/default.safetensors} --images $D/images \
  --labels $D/labels --split $D/split.json --batch-size 32 --crop-size 192 --steps 100000 \
  --time-budget-min 100 --val-every 0 --lr 2e-4 --p-sigma-max 0.9 --p-no-context 0.8 --dim-prob 0.3 \
  --seed 21 --threads 2 --loader-workers 2 --device cpu --half --target-diameter 20 --precision bf16 \
  --checkpoint-every 250 -o runs/phase21.safetensors "$@"
