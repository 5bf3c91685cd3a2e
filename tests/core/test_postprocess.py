"""Post-processing of label images: parity with the original utilities (``shared/parity/metrics``), fixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_ctxseg.core.errors import InputError
from napari_ctxseg.core.flows.postprocess import (
    clean_up_mask,
    fill_holes,
    noise_sigma,
    object_contrast,
    relabel_sequential,
    remove_border_instances,
    remove_low_contrast_instances,
    remove_small_instances,
)

METRICS_NPZ = Path(__file__).parents[2].parent / "shared" / "parity" / "metrics" / "metrics.npz"


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not METRICS_NPZ.exists():
        pytest.skip(f"parity fixtures not found at {METRICS_NPZ}")
    with np.load(METRICS_NPZ) as data:
        return {k: data[k] for k in data.files if k.startswith("utils.")}


def test_clean_up_mask_parity(fx: dict[str, np.ndarray]) -> None:
    out = clean_up_mask(fx["utils.lab"])
    np.testing.assert_array_equal(out, fx["utils.clean_up_mask"])
    assert out.dtype == fx["utils.lab"].dtype


@pytest.mark.parametrize("min_area", [0, 2, 3, 4])
def test_remove_small_instances_parity(fx: dict[str, np.ndarray], min_area: int) -> None:
    out = remove_small_instances(fx["utils.lab"], min_area)
    np.testing.assert_array_equal(out, fx[f"utils.remove_small_instances.min{min_area}"])
    assert out.dtype == fx["utils.lab"].dtype


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_remove_border_instances_parity(fx: dict[str, np.ndarray], dim: str) -> None:
    mask = fx[f"utils.remove_border_instances.in{dim}"]
    out = remove_border_instances(mask)
    np.testing.assert_array_equal(out, fx[f"utils.remove_border_instances.{dim}"])
    assert not np.array_equal(out, mask)  # the fixture does have border objects


def test_relabel_without_background_keeps_every_object() -> None:
    """Known issue of the original: clean_up_mask([[1, 1], [2, 3]]) gave [[0, 0], [1, 2]]."""
    mask = np.array([[1, 1], [2, 3]])
    np.testing.assert_array_equal(clean_up_mask(mask), [[1, 1], [2, 3]])
    np.testing.assert_array_equal(relabel_sequential(np.array([[5, 5], [9, 7]])), [[1, 1], [3, 2]])


def test_relabel_sequential_orders_by_old_label() -> None:
    mask = np.array([[0, 40, 40], [7, 0, 1000]], dtype=np.uint32)
    out = relabel_sequential(mask)
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 3]])
    assert out.dtype == np.uint32
    assert relabel_sequential(np.zeros((3, 3), np.uint8)).max() == 0


def test_relabel_sequential_fills_a_full_dtype() -> None:
    mask = (np.arange(255, dtype=np.int64).reshape(15, 17) + 1).astype(np.uint8)  # 1..255, no background
    out = relabel_sequential(mask[::-1])
    np.testing.assert_array_equal(out, mask[::-1])
    assert out.dtype == np.uint8


def test_fill_holes() -> None:
    mask = np.zeros((9, 9), np.int32)
    mask[1:8, 1:8] = 4
    mask[3:6, 3:6] = 0  # a hole
    mask[4, 4] = 9  # another object inside it stays
    mask[0, 0] = 2
    out = fill_holes(mask)
    expected = mask.copy()
    expected[3:6, 3:6] = 4
    expected[4, 4] = 9
    np.testing.assert_array_equal(out, expected)
    notch = np.zeros((5, 5), np.int32)
    notch[1:4, 1:4] = 1
    notch[2, 3:] = 0  # open to the outside: not a hole
    np.testing.assert_array_equal(fill_holes(notch), notch)


@pytest.mark.parametrize(
    "bad", [np.zeros(4, int), np.zeros((2, 2, 2, 2), int), np.zeros((3, 3), float), -np.ones((3, 3), int)]
)
def test_bad_masks_raise(bad: np.ndarray) -> None:
    for fn in (remove_border_instances, fill_holes, lambda m: remove_small_instances(m, 3)):
        with pytest.raises(InputError):
            fn(bad)


def test_low_contrast_objects_are_removed_in_units_of_the_noise() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    mask = np.zeros((128, 128), np.int32)
    mask[(yy - 30) ** 2 + (xx - 30) ** 2 <= 15**2] = 1  # bright: 10 sigma
    mask[(yy - 90) ** 2 + (xx - 90) ** 2 <= 15**2] = 2  # faint: 1 sigma, as objects found in noise
    mask[(yy - 30) ** 2 + (xx - 95) ** 2 <= 10**2] = 5  # 4 sigma, darker than its surroundings
    level = np.select([mask == 1, mask == 2, mask == 5], [10.0, 1.0, -4.0], 0.0)
    image = 100.0 + 2.0 * (level + rng.normal(0, 1, mask.shape))  # noise sigma 2
    assert noise_sigma(image) == pytest.approx(2.0, rel=0.05)
    c = object_contrast(mask, image)
    assert c[0] == pytest.approx(10, rel=0.1) and c[1] == pytest.approx(1, abs=0.2)
    assert c[4] == pytest.approx(4, rel=0.1) and np.isnan(c[2:4]).all()  # labels 3, 4 do not occur
    out = remove_low_contrast_instances(mask, image, 3.0)
    assert sorted(np.unique(out)) == [0, 1, 5] and out.dtype == mask.dtype
    np.testing.assert_array_equal(remove_low_contrast_instances(mask, image, 0.0), mask)
    rgb = np.repeat(image[..., None], 3, axis=-1)  # colour: the channel mean
    np.testing.assert_allclose(object_contrast(mask, rgb), c, rtol=1e-4)
    with pytest.raises(InputError, match="does not match"):
        object_contrast(mask, image[:64])
