"""Neural networks: layers, ConvNeXt, U-Net, attention, the four ctxseg models and their configs."""
