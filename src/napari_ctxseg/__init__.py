"""napari-ctxseg: in-context cell segmentation with diffusion models (a PyTorch port of ctxseg).

Importing the package is cheap (no torch, no Qt): the public API below is loaded on first use.

>>> import numpy as np
>>> import napari_ctxseg as ncs
>>> yy, xx = np.mgrid[:128, :128]
>>> image = np.zeros((128, 128), np.float32)
>>> for cy, cx in [(30, 30), (30, 90), (90, 60)]:
...     image[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 1.0  # three bright nuclei, 20 px across
>>> loaded = ncs.load_model("default")  # the bundled model, loaded once for many images
>>> result = ncs.segment(image, loaded=loaded)
>>> result.labels.shape, int(result.labels.max())
((128, 128), 3)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "napari_ctxseg.services.models",
    "segment": "napari_ctxseg.services.segment",
    "adapt": "napari_ctxseg.services.adapt",
    "SegmentRequest": "napari_ctxseg.services.segment",
    "mask_to_flow": "napari_ctxseg.core.flows.from_masks",
    "flow_to_mask": "napari_ctxseg.core.flows.following",
    "LabelMetrics": "napari_ctxseg.core.metrics.scores",
    "matching_scores": "napari_ctxseg.core.metrics.scores",
    "CtxSegError": "napari_ctxseg.core.errors",
    "InputError": "napari_ctxseg.core.errors",
    "CheckpointError": "napari_ctxseg.core.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_ctxseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
