"""Instance segmentation metrics.

Two families:

- :class:`LabelMetrics`: the original ctxseg ``segmentation/metrics.py`` numbers (``shared/parity/README.md``
  item 23): every predicted object is scored against its best-overlapping ground-truth object, **without**
  one-to-one matching; ``f1`` is the geometric mean of precision and recall and ``ap = TP / (P + G - TP)``.
- :func:`matching_scores`, :func:`per_object_iou`, :class:`MatchScores`: the usual one-to-one matching
  (Hungarian assignment on IoU, as in the cellpose / StarDist evaluations) with
  ``f1 = 2TP / (2TP + FP + FN)`` and ``ap = TP / (TP + FP + FN)``; scores pool over images by adding counts.

Masks are integer label images of any dimension (2D or 3D), 0 = background; labels need not be consecutive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from ..errors import InputError
from .overlap import Overlap, best_partner, overlap

__all__ = ["LabelMetrics", "MatchScores", "ObjectMatches", "matching_scores", "per_object_iou", "pool_scores"]

#: How errors name the two label images.
_NAMES = ("pred", "gt")

# --------------------------------------------------------------------------------------------------
# the original's metrics
# --------------------------------------------------------------------------------------------------


@dataclass
class LabelMetrics:
    """Accumulates the original ctxseg instance metrics over (pred, gt) pairs.

    Per pair and per predicted object, the ground-truth object with the largest intersection (smallest
    label on ties; no one-to-one matching) gives the object's IoU and Dice; per ground-truth object, the
    best predicted object gives its Dice.

    Attributes
    ----------
    pred_areas, gt_areas, pred_scores, gt_scores, ious : list of np.ndarray
        Per update: object areas, per-object Dice of predictions / ground truths, per-prediction IoU (the
        original's attribute names and values).

    Notes
    -----
    Objects are numbered in increasing label order, as the original's ``clean_up_mask``; unlike it, a
    mask without background does not lose its smallest label.

    Examples
    --------
    >>> m = LabelMetrics()
    >>> m.update(np.array([[1, 1, 0, 2]]), np.array([[1, 1, 0, 0]]))
    >>> m.compute()["ap"]
    0.5
    """

    pred_areas: list[np.ndarray] = field(default_factory=list)
    gt_areas: list[np.ndarray] = field(default_factory=list)
    pred_scores: list[np.ndarray] = field(default_factory=list)
    gt_scores: list[np.ndarray] = field(default_factory=list)
    ious: list[np.ndarray] = field(default_factory=list)

    def update(self, pred_mask: np.ndarray, gt_mask: np.ndarray) -> None:
        """Add one (prediction, ground truth) pair of label images of the same shape.

        Raises
        ------
        InputError
            If the shapes differ or the labels are not non-negative integers.
        """
        ov = overlap(pred_mask, gt_mask, _NAMES)
        n_pred, n_gt = ov.a_areas.size, ov.b_areas.size
        pred_best, pred_match = best_partner(ov.pairs_a, ov.pairs_b, ov.pairs_inter, n_pred)
        gt_best, gt_match = best_partner(ov.pairs_b, ov.pairs_a, ov.pairs_inter, n_gt)
        if n_gt > 0:
            matched_gt = ov.b_areas[pred_match]
            pred_dice = pred_best * 2 / (ov.a_areas + matched_gt)
            pred_iou = pred_best / (ov.a_areas + matched_gt - pred_best)
        else:
            pred_dice, pred_iou = np.zeros(n_pred), np.zeros(n_pred)
        gt_dice = gt_best * 2 / (ov.b_areas + ov.a_areas[gt_match]) if n_pred > 0 else np.zeros(n_gt)
        self.pred_areas.append(ov.a_areas)
        self.gt_areas.append(ov.b_areas)
        self.pred_scores.append(pred_dice)
        self.gt_scores.append(gt_dice)
        self.ious.append(pred_iou)

    @staticmethod
    def _summary(
        gt_areas: np.ndarray,
        pred_areas: np.ndarray,
        gt_scores: np.ndarray,
        pred_scores: np.ndarray,
        ious: np.ndarray,
        iou_threshold: float,
    ) -> dict[str, float]:
        n_gts, n_preds = len(gt_areas), len(pred_areas)
        n_tps = int(np.count_nonzero(np.asarray(ious) >= iou_threshold))
        pred_dice = float((pred_areas / pred_areas.sum() * pred_scores).sum()) if n_preds else 0.0
        gt_dice = float((gt_areas / gt_areas.sum() * gt_scores).sum()) if n_gts else 0.0
        nan = float("nan")
        return {
            "n_preds": n_preds,
            "n_gts": n_gts,
            "n_tps": n_tps,
            "accuracy": n_tps / n_preds if n_preds > 0 else nan,
            "recall": n_tps / n_gts if n_gts > 0 else nan,
            "f1": n_tps / math.sqrt(n_preds * n_gts) if n_tps > 0 else 0,
            "instance_dice": (pred_dice + gt_dice) / 2,
            "ap": n_tps / (n_gts + n_preds - n_tps) if n_gts + n_preds > 0 else nan,
        }

    def compute(
        self, iou_threshold: float = 0.5, micros: bool = False
    ) -> dict[str, float] | tuple[dict[str, float], list[dict[str, float]]] | None:
        """Metrics over all pairs ("macro": objects pooled), and per pair ("micros") if asked.

        Parameters
        ----------
        iou_threshold : float
            A prediction is a true positive if its IoU with its best ground truth is ``>=`` this.
        micros : bool
            Also return the list of per-pair metrics.

        Returns
        -------
        dict or (dict, list of dict) or None
            Keys ``n_preds, n_gts, n_tps, accuracy`` (precision), ``recall``, ``f1``
            (``n_tps / sqrt(n_preds * n_gts)``, 0 if no TP), ``instance_dice`` (mean of the area-weighted
            Dice of predictions and of ground truths), ``ap`` (``n_tps / (n_gts + n_preds - n_tps)``).
            Undefined ratios are NaN, as in the original. ``None`` before any update.
        """
        if not self.pred_areas:
            return None
        fields = (self.gt_areas, self.pred_areas, self.gt_scores, self.pred_scores, self.ious)
        gt_areas, pred_areas, gt_scores, pred_scores, ious = (np.concatenate(f) for f in fields)
        macro = self._summary(gt_areas, pred_areas, gt_scores, pred_scores, ious, iou_threshold)
        if not micros:
            return macro
        return macro, [self._summary(*per_pair, iou_threshold) for per_pair in zip(*fields)]


# --------------------------------------------------------------------------------------------------
# one-to-one matching
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchScores:
    """Counts of a one-to-one matching at one IoU threshold; add them to pool images.

    Attributes
    ----------
    threshold : float
        IoU threshold of a match.
    tp, fp, fn : int
        Matched pairs, unmatched predictions, unmatched ground-truth objects.
    """

    threshold: float
    tp: int
    fp: int
    fn: int

    def __add__(self, other: MatchScores) -> MatchScores:
        if not isinstance(other, MatchScores):
            return NotImplemented
        if other.threshold != self.threshold:
            raise InputError(f"cannot pool scores at IoU {self.threshold} and {other.threshold}")
        return MatchScores(self.threshold, self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @staticmethod
    def _ratio(num: float, den: float) -> float:
        return num / den if den > 0 else float("nan")

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN without predictions."""
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN); NaN without ground truth."""
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); NaN if both masks are empty."""
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def ap(self) -> float:
        """TP / (TP + FP + FN) (the "average precision" of the DSB 2018 challenge); NaN if both are empty."""
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    def as_dict(self) -> dict[str, float]:
        """All counts and scores as a flat dict."""
        keys = ("threshold", "tp", "fp", "fn", "precision", "recall", "f1", "ap")
        return {k: getattr(self, k) for k in keys}


def _assign(ov: Overlap, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching maximising the number of pairs with IoU >= threshold (then their total IoU).

    Returns the matched (pred index, gt index) arrays. Solved per connected component of the graph of
    admissible pairs with ``scipy.optimize.linear_sum_assignment``; for thresholds > 0.5 every object has
    at most one admissible partner and the matching is immediate.
    """
    iou = ov.pairs_iou
    ok = iou >= threshold if threshold > 0 else iou > 0
    rows, cols, vals = ov.pairs_a[ok], ov.pairs_b[ok], iou[ok]
    n_pred, n_gt = ov.a_areas.size, ov.b_areas.size
    if rows.size == 0:
        return rows, cols
    graph = sp.coo_matrix((np.ones(rows.size), (rows, cols + n_pred)), shape=(n_pred + n_gt,) * 2)
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[rows]
    single = np.bincount(pair_comp, minlength=comp.max() + 1)[pair_comp] == 1
    out_r, out_c = [rows[single]], [cols[single]]
    for c in np.unique(pair_comp[~single]):
        sel = pair_comp == c
        r_ids, r = np.unique(rows[sel], return_inverse=True)
        c_ids, k = np.unique(cols[sel], return_inverse=True)
        weight = np.zeros((r_ids.size, c_ids.size))
        # 1 per admissible pair first (maximum cardinality), then IoU as the tie-break (sum < 1)
        weight[r, k] = 1 + vals[sel] / (2 * max(r_ids.size, c_ids.size))
        a, b = linear_sum_assignment(weight, maximize=True)
        keep = weight[a, b] > 0
        out_r.append(r_ids[a[keep]])
        out_c.append(c_ids[b[keep]])
    return np.concatenate(out_r), np.concatenate(out_c)


def matching_scores(
    pred: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] = (0.5, 0.75, 0.9)
) -> dict[float, MatchScores]:
    """One-to-one matching of predicted and ground-truth objects at several IoU thresholds.

    Parameters
    ----------
    pred, gt : np.ndarray
        Integer label images of the same shape (2D or 3D), 0 = background.
    thresholds : sequence of float
        IoU thresholds; a pair matches if its IoU is ``>=`` the threshold.

    Returns
    -------
    dict of float to MatchScores
        Per threshold: ``tp, fp, fn`` and the properties ``precision, recall, f1 = 2TP/(2TP+FP+FN),
        ap = TP/(TP+FP+FN)``. Pool several images with :func:`pool_scores`.

    Notes
    -----
    The match rule is IoU ``>=`` threshold (an exact tie matches), the convention of the cellpose and
    StarDist evaluations and of the original's ``LabelMetrics``, so scores compare with theirs. At 0.5 two
    pairs can tie (an object covering exactly two halves); the one-to-one assignment still counts one.

    Raises
    ------
    InputError
        If the shapes differ or the labels are not non-negative integers.

    Examples
    --------
    >>> s = matching_scores(np.array([[1, 1, 0, 2]]), np.array([[1, 1, 0, 0]]), thresholds=(0.5,))
    >>> s[0.5].tp, s[0.5].fp, s[0.5].fn, s[0.5].f1
    (1, 1, 0, 0.6666666666666666)
    """
    ov = overlap(pred, gt, _NAMES)
    out = {}
    for t in thresholds:
        rows, _ = _assign(ov, float(t))
        tp = int(rows.size)
        out[float(t)] = MatchScores(float(t), tp, ov.a_areas.size - tp, ov.b_areas.size - tp)
    return out


def pool_scores(per_image: Iterable[dict[float, MatchScores]]) -> dict[float, MatchScores]:
    """Add the counts of :func:`matching_scores` results over many images (per threshold).

    Parameters
    ----------
    per_image : iterable of dict
        Results of :func:`matching_scores` with the same thresholds.

    Returns
    -------
    dict of float to MatchScores
        Pooled counts; empty if nothing was given.
    """
    pooled: dict[float, MatchScores] = {}
    for scores in per_image:
        for t, s in scores.items():
            pooled[t] = pooled[t] + s if t in pooled else s
    return pooled


@dataclass(frozen=True)
class ObjectMatches:
    """Per-object result of a one-to-one matching, e.g. to colour objects by TP / FP / FN.

    Attributes
    ----------
    threshold : float
        IoU threshold of a match.
    pred_labels : np.ndarray
        Labels of the predicted objects (increasing).
    best_iou : np.ndarray
        Per predicted object, its largest IoU with any ground-truth object (0 if none overlaps).
    best_gt : np.ndarray
        Label of that ground-truth object (0 if none overlaps).
    matched_gt : np.ndarray
        Label of the ground-truth object it is matched to one-to-one, 0 if unmatched.
    is_tp : np.ndarray
        bool, matched (true positive); the others are false positives.
    fn_labels : np.ndarray
        Labels of the unmatched ground-truth objects (false negatives).
    """

    threshold: float
    pred_labels: np.ndarray
    best_iou: np.ndarray
    best_gt: np.ndarray
    matched_gt: np.ndarray
    is_tp: np.ndarray
    fn_labels: np.ndarray

    @property
    def fp_labels(self) -> np.ndarray:
        """Labels of the unmatched predicted objects."""
        return self.pred_labels[~self.is_tp]


def per_object_iou(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> ObjectMatches:
    """Best IoU of every predicted object, and the TP / FP / FN split of a one-to-one matching.

    Parameters
    ----------
    pred, gt : np.ndarray
        Integer label images of the same shape, 0 = background.
    threshold : float
        IoU threshold of a match (as in :func:`matching_scores`).

    Returns
    -------
    ObjectMatches
        Per predicted object: best IoU and its ground-truth label, one-to-one match and TP flag; and the
        ground-truth labels left unmatched.

    Raises
    ------
    InputError
        If the shapes differ or the labels are not non-negative integers.
    """
    ov = overlap(pred, gt, _NAMES)
    n_pred = ov.a_areas.size
    iou = ov.pairs_iou
    best, best_idx = best_partner(ov.pairs_a, ov.pairs_b, iou, n_pred)
    gt_ids = np.concatenate([ov.b_ids, [0]]).astype(ov.b_ids.dtype if ov.b_ids.size else np.int64)
    best_idx = np.where(best > 0, best_idx, -1)
    rows, cols = _assign(ov, float(threshold))
    matched = np.full(n_pred, -1, dtype=np.int64)
    matched[rows] = cols
    unmatched_gt = np.ones(ov.b_areas.size, dtype=bool)
    unmatched_gt[cols] = False
    return ObjectMatches(
        threshold=float(threshold),
        pred_labels=ov.a_ids,
        best_iou=best,
        best_gt=gt_ids[best_idx],
        matched_gt=gt_ids[matched],
        is_tp=matched >= 0,
        fn_labels=ov.b_ids[unmatched_gt],
    )
