"""Shared fixtures: a tiny random checkpoint and small real images from ``../shared/data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CtxSegP checkpoint (fast; segments nothing meaningful)."""
    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.models import build_model
    from napari_ctxseg.services.models import PRESETS

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model(PRESETS["tiny"]).eval(), sigma_data=1.0, provenance={"test": True})
    return path


def dsb_pair(name: str = "00071198d059ba7f", crop: int | None = 128) -> tuple[np.ndarray, np.ndarray]:
    """A DSB 2018 training image and its labels (cropped), or skip when the data is absent."""
    import tifffile

    img_path = DATA / "dsb2018_train" / "images" / f"{name}.tif"
    if not img_path.is_file():
        pytest.skip(f"shared data not found at {img_path}")
    image = tifffile.imread(img_path)
    labels = tifffile.imread(DATA / "dsb2018_train" / "labels" / f"{name}.tif")
    if crop:
        image, labels = image[:crop, :crop], labels[:crop, :crop]
    return image, labels


def blobs(shape: tuple[int, int] = (96, 96), n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic fluorescence image of bright discs and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i in range(n):
        cy, cx = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        r = rng.integers(5, 9)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = i + 1
    image = (labels > 0) * 200.0 + rng.normal(20, 5, shape)
    return image.astype(np.float32), labels
