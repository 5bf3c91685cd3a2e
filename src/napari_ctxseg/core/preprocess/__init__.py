"""Image preparation: intensity normalisation, channels and the model's input."""
