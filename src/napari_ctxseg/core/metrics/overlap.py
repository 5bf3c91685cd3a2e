"""Overlap of two label images: object ids, areas, intersections and IoU (the one IoU of the package).

Masks are integer label images of any dimension (2D or 3D), 0 = background; labels need not be
consecutive. Objects are numbered in increasing label order: object ``i`` of ``a`` is label ``a_ids[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..flows.postprocess import as_labels

__all__ = ["Overlap", "best_partner", "iou_matrix", "overlap"]


@dataclass(frozen=True)
class Overlap:
    """Objects of a pair of label images ``(a, b)`` and their non-zero intersections (sparse).

    Attributes
    ----------
    a_ids, b_ids : np.ndarray
        The labels of the objects of ``a`` and ``b`` (increasing, 0 left out).
    a_areas, b_areas : np.ndarray
        float64 pixels per object, in the order of the ids.
    pairs_a, pairs_b : np.ndarray
        int64, per intersecting pair, the index of its objects into ``a_ids`` and ``b_ids``.
    pairs_inter : np.ndarray
        float64 intersection (pixels) of each pair.
    """

    a_ids: np.ndarray
    b_ids: np.ndarray
    a_areas: np.ndarray
    b_areas: np.ndarray
    pairs_a: np.ndarray
    pairs_b: np.ndarray
    pairs_inter: np.ndarray

    @property
    def pairs_iou(self) -> np.ndarray:
        """IoU of each intersecting pair: ``inter / (area_a + area_b - inter)``."""
        union = self.a_areas[self.pairs_a] + self.b_areas[self.pairs_b] - self.pairs_inter
        return self.pairs_inter / union

    def iou(self) -> np.ndarray:
        """The dense ``(len(a_ids), len(b_ids))`` IoU matrix (0 where objects do not intersect)."""
        out = np.zeros((self.a_ids.size, self.b_ids.size))
        out[self.pairs_a, self.pairs_b] = self.pairs_iou
        return out


def overlap(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> Overlap:
    """Areas and intersections of every pair of objects of two label images of the same shape.

    Parameters
    ----------
    a, b : np.ndarray
        Integer (or bool) label images of the same shape, 0 = background.
    names : tuple of str
        What to call ``a`` and ``b`` in error messages (e.g. ``("pred", "gt")``).

    Returns
    -------
    Overlap
        The objects of both images and their intersecting pairs (sparse: only pairs that touch).

    Raises
    ------
    InputError
        If the shapes differ or the labels are not non-negative integers.

    Examples
    --------
    >>> ov = overlap(np.array([[1, 1, 0, 5]]), np.array([[2, 0, 0, 2]]))
    >>> ov.a_ids, ov.b_ids, ov.pairs_iou
    (array([1, 5]), array([2]), array([0.33333333, 0.5       ]))
    """
    a, b = as_labels(a, None, names[0]), as_labels(b, None, names[1])
    if a.shape != b.shape:
        raise InputError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    a_ids, a_idx = np.unique(a.ravel(), return_inverse=True)
    b_ids, b_idx = np.unique(b.ravel(), return_inverse=True)
    a_fg, b_fg = a_ids != 0, b_ids != 0
    # shift indices so that 0 (background) becomes -1 and objects 0..n-1
    a_idx = a_idx.ravel() - int(not a_fg.all())
    b_idx = b_idx.ravel() - int(not b_fg.all())
    n_a, n_b = int(a_fg.sum()), int(b_fg.sum())
    a_areas = np.bincount(a_idx[a_idx >= 0], minlength=n_a).astype(np.float64)
    b_areas = np.bincount(b_idx[b_idx >= 0], minlength=n_b).astype(np.float64)
    both = (a_idx >= 0) & (b_idx >= 0)
    key = a_idx[both].astype(np.int64) * max(n_b, 1) + b_idx[both]
    keys, inter = np.unique(key, return_counts=True)
    return Overlap(
        a_ids=a_ids[a_fg],
        b_ids=b_ids[b_fg],
        a_areas=a_areas,
        b_areas=b_areas,
        pairs_a=keys // max(n_b, 1),
        pairs_b=keys % max(n_b, 1),
        pairs_inter=inter.astype(np.float64),
    )


def iou_matrix(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense IoU matrix between the objects of two label images, with their labels.

    Parameters
    ----------
    a, b : np.ndarray
        Integer (or bool) label images of the same shape, 0 = background.

    Returns
    -------
    iou : np.ndarray
        float64 ``(len(a_ids), len(b_ids))``: ``iou[i, j]`` is the IoU of label ``a_ids[i]`` of ``a`` and
        label ``b_ids[j]`` of ``b`` (0 if they do not intersect).
    a_ids, b_ids : np.ndarray
        The labels present in ``a`` and ``b`` (increasing, 0 left out).

    Raises
    ------
    InputError
        If the shapes differ or the labels are not non-negative integers.

    See Also
    --------
    overlap : the same, sparse (only the intersecting pairs), with areas.

    Examples
    --------
    >>> iou, a_ids, b_ids = iou_matrix(np.array([[1, 1, 0, 3]]), np.array([[1, 0, 0, 2]]))
    >>> iou
    array([[0.5, 0. ],
           [0. , 1. ]])
    >>> a_ids, b_ids
    (array([1, 3]), array([1, 2]))
    """
    ov = overlap(a, b)
    return ov.iou(), ov.a_ids, ov.b_ids


def best_partner(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a sparse matrix: its largest value and that value's column.

    Parameters
    ----------
    rows, cols, values : np.ndarray
        The non-zero entries (e.g. ``Overlap.pairs_a, Overlap.pairs_b, Overlap.pairs_iou``).
    n_rows : int
        Number of rows.

    Returns
    -------
    best : np.ndarray
        float64 ``(n_rows,)`` largest value per row (0 for a row without entries).
    column : np.ndarray
        int64 ``(n_rows,)`` its column: the smallest one on ties, 0 for a row without entries.

    Examples
    --------
    >>> best_partner(np.array([0, 0, 2]), np.array([1, 0, 0]), np.array([0.5, 0.5, 0.2]), 3)
    (array([0.5, 0. , 0.2]), array([0, 0, 0]))
    """
    best = np.zeros(n_rows)
    match = np.zeros(n_rows, dtype=np.int64)
    if rows.size:
        order = np.lexsort((cols, -values, rows))  # by row, then value descending, then column
        first = np.ones(order.size, dtype=bool)
        first[1:] = rows[order][1:] != rows[order][:-1]
        chosen = order[first]
        best[rows[chosen]] = values[chosen]
        match[rows[chosen]] = cols[chosen]
    return best, match
