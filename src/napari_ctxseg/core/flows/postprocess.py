"""Clean-up of instance label images: small objects, border objects, relabelling, holes.

``remove_small_instances``, ``clean_up_mask`` and ``remove_border_instances`` follow the original ctxseg
``segmentation/utils.py`` (``shared/parity/README.md`` item 25), except for one fixed bug: the original
``clean_up_mask`` maps the smallest label of a mask that has no 0 pixel to background; here 0 always stays
0 and every object keeps a label.

Layouts: integer label images ``(H, W)`` or ``(D, H, W)``, 0 = background (numpy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

from ..errors import InputError

__all__ = [
    "as_labels",
    "clean_up_mask",
    "fill_holes",
    "median_diameter",
    "noise_sigma",
    "object_contrast",
    "relabel_sequential",
    "remove_border_instances",
    "remove_low_contrast_instances",
    "remove_small_instances",
]


def as_labels(mask: np.ndarray, ndims: Sequence[int] | None = (2, 3), what: str = "mask") -> np.ndarray:
    """Validate an integer label image and return it as a numpy array (bool becomes uint8).

    Parameters
    ----------
    mask : np.ndarray
        Candidate label image.
    ndims : sequence of int, optional
        Allowed numbers of dimensions (None: any).
    what : str
        Name used in error messages.

    Returns
    -------
    np.ndarray
        The labels (not copied when already integer).

    Raises
    ------
    InputError
        For another number of dimensions, a non-integer dtype or a negative label.
    """
    mask = np.asarray(mask)
    if ndims is not None and mask.ndim not in ndims:
        dims = " or ".join(map(str, ndims))
        raise InputError(f"{what} must have {dims} dimensions, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise InputError(f"{what} must hold integer labels, got dtype {mask.dtype}")
    if mask.size and np.issubdtype(mask.dtype, np.signedinteger) and mask.min() < 0:
        raise InputError(f"{what} labels must be >= 0 (0 = background), got minimum {mask.min()}")
    return mask


def remove_small_instances(mask: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Set to 0 every object with fewer than ``min_area`` pixels (voxels); other labels are kept as they are.

    Parameters
    ----------
    mask : np.ndarray
        Integer labels ``(H, W)`` or ``(D, H, W)``.
    min_area : int
        Objects with ``area < min_area`` are removed (0 removes nothing).

    Returns
    -------
    np.ndarray
        A new mask of the same dtype.

    Examples
    --------
    >>> remove_small_instances(np.array([[1, 1, 2], [0, 3, 3]]), 2)
    array([[1, 1, 0],
           [0, 3, 3]])
    """
    mask = as_labels(mask)
    ids, inverse, counts = np.unique(mask, return_inverse=True, return_counts=True)
    small = (counts < min_area) & (ids != 0)
    return np.where(small[inverse.reshape(mask.shape)], 0, mask).astype(mask.dtype, copy=False)


def noise_sigma(image: np.ndarray) -> float:
    """Robust standard deviation of the pixel noise of a grey image (any number of dimensions).

    From the differences of neighbouring pixels along the last axis (which cancel the smooth signal):
    ``1.4826 * MAD / sqrt(2)``. Signal edges are few, so the median ignores them; noise correlated between
    neighbouring pixels (binning, deconvolution) is underestimated.

    Examples
    --------
    >>> round(noise_sigma(np.random.default_rng(0).normal(5.0, 2.0, (256, 256))), 1)
    2.0
    """
    d = np.diff(np.asarray(image, dtype=np.float32), axis=-1).ravel()
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def object_contrast(mask: np.ndarray, image: np.ndarray, ring: int = 4) -> np.ndarray:
    """Contrast of each object 1..n of ``mask`` in units of the image's pixel noise.

    ``|mean inside - mean of the ring 2..ring px around it| / noise_sigma(image)``, on the grey image
    (colour images: the channel mean, channels last). A ring pixel near several objects counts for the
    one with the largest label; an object without ring pixels (it fills its surroundings) is compared
    with the median of all background. NaN for labels that do not occur; inf where the image has no
    measurable noise.
    """
    mask = as_labels(mask, ndims=None)
    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim == mask.ndim + 1:
        grey = grey.mean(axis=-1)
    if grey.shape != mask.shape:
        raise InputError(f"image shape {grey.shape} does not match the labels {mask.shape}")
    n = int(mask.max())
    if n == 0:
        return np.zeros(0)
    ids = np.arange(1, n + 1)
    fg = mask > 0
    near = ndi.binary_dilation(fg)
    owner = ndi.maximum_filter(mask, size=2 * ring + 1)
    ring_owner = np.where(~near & (owner > 0), owner, 0)
    with np.errstate(invalid="ignore"):
        inside = np.asarray(ndi.mean(grey, mask, ids))
        around = np.asarray(ndi.mean(grey, ring_owner, ids))
    background = float(np.median(grey[~fg])) if (~fg).any() else 0.0
    around = np.where(np.isnan(around), background, around)
    sigma = noise_sigma(grey)
    diff = np.abs(inside - around)
    return diff / sigma if sigma > 0 else np.where(np.isnan(inside), np.nan, np.inf)


def remove_low_contrast_instances(mask: np.ndarray, image: np.ndarray, min_contrast: float) -> np.ndarray:
    """Set to 0 every object whose :func:`object_contrast` is below ``min_contrast`` (0 removes nothing).

    Objects found in pure noise (the network's output on a field without cells, after per-image
    normalisation stretched its noise) have a contrast of about one noise sigma; see docs/model_card.md
    for the measured ranges. Returns a new mask of the same dtype; kept labels are unchanged.
    """
    mask = as_labels(mask, ndims=None)
    if min_contrast <= 0 or mask.max() == 0:
        return mask.copy()
    low = np.concatenate([[False], object_contrast(mask, image) < min_contrast])
    return np.where(low[mask], 0, mask).astype(mask.dtype, copy=False)


def relabel_sequential(mask: np.ndarray) -> np.ndarray:
    """Relabel objects to 1..n in increasing order of their old labels; 0 stays 0.

    Parameters
    ----------
    mask : np.ndarray
        Integer labels of any dimension (e.g. the non-consecutive output of ``flow_to_mask``).

    Returns
    -------
    np.ndarray
        Labels 0..n, same shape and dtype.

    Notes
    -----
    Unlike the original ``clean_up_mask``, a mask without any 0 pixel keeps all its objects (the
    original turned its smallest label into background, ``known_issues.json``).
    """
    mask = as_labels(mask, None)
    ids, inverse = np.unique(mask, return_inverse=True)
    # n distinct non-zero labels always fit in the dtype that holds them
    new = np.arange(ids.size, dtype=np.int64) + int(ids.size > 0 and ids[0] != 0)
    return new.astype(mask.dtype)[inverse.reshape(mask.shape)]


def clean_up_mask(mask: np.ndarray) -> np.ndarray:
    """The original's name for :func:`relabel_sequential` (with its no-background bug fixed).

    Parameters
    ----------
    mask : np.ndarray
        Integer labels.

    Returns
    -------
    np.ndarray
        Labels 0..n, same shape and dtype.
    """
    return relabel_sequential(mask)


def remove_border_instances(mask: np.ndarray) -> np.ndarray:
    """Set to 0 every object that touches the border of the image (any face of a 3D volume).

    Parameters
    ----------
    mask : np.ndarray
        Integer labels ``(H, W)`` or ``(D, H, W)``.

    Returns
    -------
    np.ndarray
        A new mask of the same dtype; the other labels are unchanged.
    """
    mask = as_labels(mask)
    faces = [np.take(mask, index, axis=axis).ravel() for axis in range(mask.ndim) for index in (0, -1)]
    border = np.unique(np.concatenate(faces))
    border = border[border != 0]
    return np.where(np.isin(mask, border), 0, mask).astype(mask.dtype, copy=False)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every object: background pixels enclosed by a single object take its label.

    Parameters
    ----------
    mask : np.ndarray
        Integer labels ``(H, W)`` or ``(D, H, W)``.

    Returns
    -------
    np.ndarray
        A new mask of the same dtype. Pixels of other objects inside a hole are left untouched.
    """
    mask = as_labels(mask)
    out = mask.copy()
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if ids.size == 0:
        return out
    # bounding boxes on consecutive labels (find_objects wants small label values)
    consecutive = np.searchsorted(ids, mask) + 1
    consecutive[mask == 0] = 0
    for index, box in enumerate(ndi.find_objects(consecutive)):
        if box is None:
            continue
        obj = consecutive[box] == index + 1
        hole = ndi.binary_fill_holes(obj) & ~obj & (mask[box] == 0)
        out[box][hole] = ids[index]
    return out


def median_diameter(mask: np.ndarray) -> float:
    """Median equivalent-circle diameter ``2 sqrt(area / pi)`` of the objects of a label image.

    Parameters
    ----------
    mask : np.ndarray
        Integer labels (2D), 0 = background; labels need not be consecutive.

    Returns
    -------
    float
        The diameter in pixels, or 0.0 when there is no object.
    """
    counts = np.bincount(np.asarray(mask).ravel().astype(np.int64, copy=False))[1:]
    areas = counts[counts > 0]
    return float(2.0 * np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0
