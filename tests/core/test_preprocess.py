"""Image preparation: parity of pad_channel / center_crop with the original, and normalize_image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_ctxseg.core.errors import InputError
from napari_ctxseg.core.preprocess.normalize import (
    center_crop,
    intensity_limits,
    normalize_image,
    pad_channel,
)

METRICS_NPZ = Path(__file__).parents[2].parent / "shared" / "parity" / "metrics" / "metrics.npz"


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not METRICS_NPZ.exists():
        pytest.skip(f"parity fixtures not found at {METRICS_NPZ}")
    with np.load(METRICS_NPZ) as data:
        return {k: data[k] for k in data.files if k.startswith("utils.")}


@pytest.mark.parametrize("size", [32, 64])
def test_center_crop_parity(fx: dict[str, np.ndarray], size: int) -> None:
    image, mask = center_crop(
        fx["utils.center_crop.in_image"], fx["utils.center_crop.in_mask"], crop_size=size
    )
    np.testing.assert_array_equal(image, fx[f"utils.center_crop.crop{size}.image"])
    np.testing.assert_array_equal(mask, fx[f"utils.center_crop.crop{size}.mask"])


def test_center_crop_2d_image_parity(fx: dict[str, np.ndarray]) -> None:
    out = center_crop(fx["utils.center_crop.in_image"][..., 0], crop_size=96)
    np.testing.assert_array_equal(out, fx["utils.center_crop.crop96_2d"])
    assert out.shape == (96, 96, 1)


def test_pad_channel_parity(fx: dict[str, np.ndarray]) -> None:
    gray, two = fx["utils.pad_channel.in2d"], fx["utils.pad_channel.in_c2"]
    np.testing.assert_array_equal(pad_channel(gray), fx["utils.pad_channel.out2d"])
    np.testing.assert_array_equal(pad_channel(gray[..., None]), fx["utils.pad_channel.out_c1"])
    np.testing.assert_array_equal(pad_channel(two), fx["utils.pad_channel.out_c2"])
    np.testing.assert_array_equal(
        pad_channel(np.concatenate([two, gray[..., None]], -1)), fx["utils.pad_channel.out_c3"]
    )


def test_center_crop_and_pad_channel_reject_bad_shapes() -> None:
    with pytest.raises(InputError):
        pad_channel(np.zeros((4, 4, 4)))
    with pytest.raises(InputError):
        center_crop(np.zeros((4, 4, 3)), np.zeros((4, 5)), crop_size=2)
    with pytest.raises(InputError):
        center_crop(np.zeros(4), crop_size=2)
    with pytest.raises(InputError):
        center_crop(np.zeros((4, 4)), crop_size=0)


def test_normalize_image_percentiles() -> None:
    image = np.arange(1000, dtype=np.uint16).reshape(40, 25)
    out = normalize_image(image, 1, 99)
    assert out.dtype == np.float32 and out.shape == image.shape
    lo, hi = np.percentile(image, [1, 99])
    np.testing.assert_allclose(out, (image - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    assert out.min() < 0 < 1 < out.max()
    clipped = normalize_image(image, clip=True)
    assert clipped.min() == 0 and clipped.max() == 1


def test_given_limits_replace_the_percentiles_and_allow_a_constant_plane() -> None:
    """A plane of a stack is mapped with the stack's limits: a dim plane stays dim, a blank one is 0."""
    bright = np.arange(1000, dtype=np.uint16).reshape(40, 25)
    limits = intensity_limits(bright)
    assert limits == pytest.approx(tuple(np.percentile(bright, [1, 99.8])))
    dim = bright // 5
    np.testing.assert_allclose(
        normalize_image(dim, limits=limits), (dim - limits[0]) / np.ptp(limits), atol=1e-6
    )
    assert normalize_image(dim, limits=limits).max() < 0.25 < normalize_image(dim).max()
    np.testing.assert_array_equal(normalize_image(np.full((4, 4), 7), limits=(7, 8)), 0)
    with pytest.raises(InputError, match="constant"):
        intensity_limits(np.full((4, 4), 7))


def test_normalize_image_falls_back_to_min_max_for_sparse_images() -> None:
    image = np.zeros((50, 50), np.float32)
    image[3, 4] = 10  # 0.04 % of the pixels: both percentiles are 0
    out = normalize_image(image)
    assert out.max() == 1 and out.min() == 0


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.full((8, 8), 3.0), {}, "constant"),
        (np.array([[1.0, np.nan], [2.0, 3.0]]), {}, "NaN"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), {}, "NaN or infinite"),
        (np.zeros((0, 4)), {}, "empty"),
        (np.arange(16.0).reshape(4, 4), {"low": 50, "high": 10}, "percentiles"),
        (np.array([["a", "b"]]), {}, "dtype"),
        (np.arange(16.0).reshape(4, 4), {"limits": (5.0, 5.0)}, "limits"),
        (np.arange(16.0).reshape(4, 4), {"limits": (0.0, np.nan)}, "limits"),
        (np.array([[1.0, np.nan]]), {"limits": (0.0, 1.0)}, "NaN"),
    ],
)
def test_normalize_image_rejects(image: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        normalize_image(image, **kwargs)
