"""Checkpoints: safetensors reading and writing, and conversion of original Flax checkpoints."""
