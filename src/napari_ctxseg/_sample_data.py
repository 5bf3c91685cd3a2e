"""napari sample data: a CC0 DSB 2018 nuclei image, and a context pair (image + labels)."""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np

__all__ = ["context_pair", "nuclei", "read_sample"]


def read_sample(name: str) -> np.ndarray:
    """Read a bundled sample TIFF: ``nuclei``, ``nuclei_labels``, ``context`` or ``context_labels``."""
    import tifffile

    with resources.as_file(resources.files("napari_ctxseg") / "sample_data" / f"{name}.tif") as path:
        return tifffile.imread(path)


def nuclei() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """The image to segment (no labels: that is the plugin's job)."""
    return [(read_sample("nuclei"), {"name": "nuclei"}, "image")]


def context_pair() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """A similar image with its complete annotation, to use as context, plus the image to segment."""
    return [
        (read_sample("context"), {"name": "context image"}, "image"),
        (read_sample("context_labels"), {"name": "context labels"}, "labels"),
        (read_sample("nuclei"), {"name": "nuclei"}, "image"),
    ]
