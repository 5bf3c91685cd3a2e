"""Per-object measurements: scikit-image region properties plus what the diffusion samples say.

The table is a dict of equal-length numpy columns (what napari's ``Labels.features`` accepts and what
``pandas.DataFrame`` or a CSV writer take directly).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from ..core.flows import flow_error

__all__ = ["PROPERTIES", "best_iou_per_object", "measure_objects"]

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


def best_iou_per_object(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each object 1..n of ``labels``, its best IoU with any object of ``other`` (0 if none)."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    a = labels.ravel().astype(np.int64)
    b = other.ravel().astype(np.int64)
    m = int(b.max()) + 1
    inter = sparse.coo_matrix((np.ones_like(a), (a, b)), shape=(n + 1, m)).tocsr()
    inter = inter[1:, 1:].toarray() if m > 1 else np.zeros((n, 0))
    area_a = np.bincount(a, minlength=n + 1)[1:]
    area_b = np.bincount(b, minlength=m)[1:]
    if inter.shape[1] == 0:
        return np.zeros(n)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return iou.max(axis=1)


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
        intensity = np.asarray(image, dtype=np.float32)
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
