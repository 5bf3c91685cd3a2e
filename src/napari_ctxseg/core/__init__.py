"""Pure compute: models, EDM diffusion, flows, metrics, checkpoints (no Qt, no napari)."""
