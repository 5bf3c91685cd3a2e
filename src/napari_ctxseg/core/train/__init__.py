"""Training: annotated data, crops and contexts, the EDM loss and the training loop."""
