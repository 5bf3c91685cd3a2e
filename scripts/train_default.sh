#!/usr/bin/env bash
# Phase 1 of the bundled default model (see docs/model_card.md). Run from the repository root.
D=${DATA:-../shared/data/dsb2018_train}
exec ctxseg train --images $D/images --labels $D/labels --split $D/split.json \
  --preset small --steps 5000 --batch-size 8 --crop-size 128 --lr 1e-3 --seed 0 --p-sigma-max 0.6 \
  --val-every 1000 --checkpoint-every 1000 --state runs/default.state.safetensors \
  --half -o runs/default.safetensors --device cpu "$@"
