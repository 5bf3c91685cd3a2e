"""Per-object measurements: scikit-image region properties plus what the diffusion samples say.

The table is a dict of equal-length numpy columns (what napari's ``Labels.features`` accepts and what
``pandas.DataFrame`` or a CSV writer take directly).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..core.flows.from_masks import flow_error
from ..core.metrics.overlap import best_partner, overlap

__all__ = [
    "PROPERTIES",
    "best_iou_per_object",
    "measure_objects",
    "measure_stack",
    "measure_volume",
    "merge_rows",
    "plane_rows",
]

PROPERTIES = (
    "label",
    "area",
    "centroid",
    "bbox",
    "intensity_mean",
    "intensity_max",
    "eccentricity",
    "solidity",
)


def _intensity(image: np.ndarray) -> np.ndarray:
    """Intensities as float32, or float64 where they exceed float32's range (they would become infinite)."""
    image = np.asarray(image)
    if (
        image.dtype.itemsize > 4
        and image.size
        and float(np.abs(image).max()) > float(np.finfo(np.float32).max)
    ):
        return image.astype(np.float64)
    return image.astype(np.float32, copy=False)


def best_iou_per_object(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each object 1..n of ``labels``, its best IoU with any object of ``other`` (0 if none).

    Parameters
    ----------
    labels, other : np.ndarray
        Label images of the same shape, 0 = background.

    Returns
    -------
    np.ndarray
        float64 ``(labels.max(),)``: entry ``k - 1`` is the best IoU of label ``k`` (0 for absent labels).

    Examples
    --------
    >>> best_iou_per_object(np.array([[1, 1, 0, 3]]), np.array([[1, 0, 0, 2]]))
    array([0.5, 0. , 1. ])
    """
    labels, other = np.asarray(labels).astype(np.int64), np.asarray(other).astype(np.int64)
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    ov = overlap(labels, other, ("labels", "other"))
    best, _ = best_partner(ov.pairs_a, ov.pairs_b, ov.pairs_iou, ov.a_ids.size)
    out = np.zeros(n)
    out[ov.a_ids - 1] = best
    return out


def measure_objects(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    *,
    sample_labels: np.ndarray | None = None,
    flows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Measure every object of ``labels`` (H, W).

    Parameters
    ----------
    labels
        Consecutive instance labels 1..n.
    image
        (H, W) or (H, W, C) intensities; colour images are measured on their channel mean.
    sample_labels
        (N, H, W) labels of the individual diffusion samples: adds ``agreement``, the mean over samples of
        each object's best IoU with that sample's objects (1 = every sample found the same object).
    flows
        (N, 2, H, W) flows: adds ``flow_error``, the mean squared difference between the mean predicted
        flow and the flow of the object's own shape (the original's ``max_flow_err`` criterion).

    Returns
    -------
    dict of str to np.ndarray
        Columns ``label, area, centroid-0, centroid-1, bbox-0..3, intensity_mean, intensity_max,
        eccentricity, solidity[, agreement][, flow_error]``.
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    props = list(PROPERTIES)
    intensity = None
    if image is not None:
        intensity = _intensity(image)
        if intensity.ndim == 3:
            intensity = intensity.mean(axis=-1)
        if intensity.shape != labels.shape:
            raise ValueError(f"image shape {intensity.shape} does not match labels {labels.shape}")
    else:
        props = [p for p in props if not p.startswith("intensity")]
    table = regionprops_table(labels.astype(np.int32), intensity_image=intensity, properties=props)
    table = {k: np.asarray(v) for k, v in table.items()}
    n = len(table["label"])
    if sample_labels is not None:
        ious = [
            best_iou_per_object(labels, s)[table["label"] - 1] if n else np.zeros(0) for s in sample_labels
        ]
        table["agreement"] = np.mean(ious, axis=0) if ious else np.ones(n)
    if flows is not None:
        err = flow_error(np.asarray(flows, dtype=np.float32).mean(axis=0), labels)
        table["flow_error"] = np.array(
            [err.get(int(lab), np.nan) for lab in table["label"]], dtype=np.float64
        )
    return table


def merge_rows(table: dict[str, np.ndarray], key: np.ndarray) -> dict[str, np.ndarray]:
    """One row per value of ``key`` (sorted): the per-plane rows of objects that span several planes.

    ``table`` holds one row per object and plane (an ``index`` column, ``plane``/``plane-k`` columns and
    :func:`measure_objects` columns); ``key`` gives each row's object. ``area`` is summed,
    ``intensity_max`` and the upper bounding-box columns take the maximum, the lower ones and the plane
    columns the minimum (the first plane), ``n_planes`` counts the rows, and every other column is the
    area-weighted mean.
    """
    ids, group = np.unique(key, return_inverse=True)
    area = table["area"].astype(np.float64)
    total = np.bincount(group, weights=area, minlength=len(ids))
    bbox = sorted(k for k in table if k.startswith("bbox-"))
    lows = set(bbox[: len(bbox) // 2])
    out: dict[str, np.ndarray] = {"index": ids, "n_planes": np.bincount(group, minlength=len(ids))}
    for name, col in table.items():
        if name == "index":
            continue
        if name == "label":
            out[name] = ids
        elif name == "area":
            out[name] = total.astype(col.dtype)
        elif name == "intensity_max" or (name in bbox and name not in lows):
            out[name] = np.full(len(ids), -np.inf)
            np.maximum.at(out[name], group, col)
            out[name] = out[name].astype(col.dtype)
        elif name in lows or name.startswith("plane"):
            out[name] = np.full(len(ids), np.inf)
            np.minimum.at(out[name], group, col)
            out[name] = out[name].astype(col.dtype)
        else:
            out[name] = np.bincount(group, weights=area * col, minlength=len(ids)) / total
    return out


def plane_rows(tables: Iterable[tuple[tuple[int, ...], dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The per-plane tables of a stack as one table, each row with ``index`` (its label) and its plane.

    ``tables`` holds ``(leading index, measure_objects table)`` per plane; the plane columns are
    ``plane`` for one leading axis, else ``plane-0``, ``plane-1``...
    """
    rows = []
    for idx, t in tables:
        names = ["plane"] if len(idx) == 1 else [f"plane-{k}" for k in range(len(idx))]
        n = len(t["label"])
        rows.append({"index": t["label"], **{nm: np.full(n, i) for nm, i in zip(names, idx)}, **t})
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def measure_stack(labels: np.ndarray, image: np.ndarray, leading: int) -> dict[str, np.ndarray]:
    """Measurements of a stack labelled slice by slice (labels unique over the stack, e.g. stitched).

    Every plane is measured in 2D (:func:`measure_objects`) and the planes of one object are merged into
    one row (:func:`merge_rows`): ``area`` in pixels over all its planes, ``n_planes``, its first
    plane in the plane columns. ``image`` has the stack's shape (plus a colour axis for RGB).
    """
    table = plane_rows(
        (idx, measure_objects(labels[idx], image[idx])) for idx in np.ndindex(*labels.shape[:leading])
    )
    merged = merge_rows(table, table["index"])
    del merged["index"]
    return merged


def measure_volume(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Measurements of objects labelled in 3D (Z, H, W).

    Columns ``label``, ``area`` (voxels), ``centroid-0..2`` (z, y, x), ``bbox-0..5``, ``intensity_mean``
    and ``intensity_max``; the 2D shape measures (eccentricity, solidity) are left out.
    """
    from skimage.measure import regionprops_table

    props = ["label", "area", "centroid", "bbox", "intensity_mean", "intensity_max"]
    table = regionprops_table(
        np.asarray(labels).astype(np.int32), intensity_image=_intensity(image), properties=props
    )
    return {k: np.asarray(v) for k, v in table.items()}
