"""Per-object measurements of stacks (labelled slice by slice) and volumes (labelled in 3D)."""

from __future__ import annotations

import numpy as np

from napari_ctxseg.services.measure import measure_stack, measure_volume


def _two_objects() -> tuple[np.ndarray, np.ndarray]:
    """A (4, 20, 24) stack: a 5x6 box in planes 0-2 (label 1) and a 3x3 box in plane 3 only (label 7)."""
    labels = np.zeros((4, 20, 24), np.uint32)
    labels[0:3, 2:7, 3:9] = 1
    labels[3, 10:13, 15:18] = 7
    image = np.zeros(labels.shape, np.float32)
    image[0:3, 2:7, 3:9] = np.array([10.0, 20.0, 30.0])[:, None, None]
    image[3, 10:13, 15:18] = 5.0
    return labels, image


def test_stack_measurements_give_one_row_per_object_over_its_planes() -> None:
    labels, image = _two_objects()
    t = measure_stack(labels, image, leading=1)
    assert t["label"].tolist() == [1, 7] and "index" not in t
    assert t["area"].tolist() == [90, 9] and t["n_planes"].tolist() == [3, 1]
    assert t["plane"].tolist() == [0, 3]  # the first plane of each object
    np.testing.assert_allclose(t["intensity_mean"], [20.0, 5.0])  # equal areas per plane: plain mean
    np.testing.assert_allclose(t["intensity_max"], [30.0, 5.0])
    np.testing.assert_allclose(t["centroid-0"], [4.0, 11.0])  # in-plane (y, x) centroids
    assert t["bbox-0"].tolist() == [2, 10] and t["bbox-3"].tolist() == [9, 18]
    # two leading axes (T, Z): plane columns per axis
    t2 = measure_stack(labels.reshape(2, 2, 20, 24), image.reshape(2, 2, 20, 24), leading=2)
    assert t2["plane-0"].tolist() == [0, 1] and t2["plane-1"].tolist() == [0, 1]


def test_volume_measurements_are_3d() -> None:
    labels, image = _two_objects()
    t = measure_volume(labels, image)
    assert t["label"].tolist() == [1, 7] and t["area"].tolist() == [90, 9]
    np.testing.assert_allclose(t["centroid-0"], [1.0, 3.0])  # z
    np.testing.assert_allclose(t["intensity_mean"], [20.0, 5.0])
    assert t["bbox-0"].tolist() == [0, 3] and t["bbox-3"].tolist() == [3, 4]
    assert "eccentricity" not in t
