"""Scores of a prediction against ground truth, and new layers that colour objects as TP, FP or FN.

Pure functions (no Qt). Matching is one-to-one at IoU > ``threshold`` (>= 0.5, so each object can match
at most one other and no assignment problem needs solving), as in :mod:`napari_ctxseg.services.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..services.measure import best_iou_per_object

__all__ = ["CLASS_COLORS", "Evaluation", "evaluate_labels", "evaluation_layer_data"]

#: Colours of the classes in the new layers.
CLASS_COLORS = {"TP": "#33cc55", "FP": "#ee3333", "FN": "#ffaa00"}


@dataclass(frozen=True)
class Evaluation:
    """Counts, scores and per-object IoUs (best IoU of each object with any object of the other image).

    ``ap`` = TP / (TP + FP + FN), ``f1`` = 2 TP / (2 TP + FP + FN), ``dice`` = mean over ground-truth objects
    of the Dice coefficient 2 IoU / (1 + IoU) with their best-overlapping predicted object (0 if none).
    ``pred_ids``/``gt_ids`` are the label values the IoU arrays refer to.
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    ap: float
    f1: float
    dice: float
    pred_ids: np.ndarray
    pred_iou: np.ndarray
    gt_ids: np.ndarray
    gt_iou: np.ndarray


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..n and the original value of each new label."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        ids, inverse = np.concatenate([[0], ids]), inverse + 1
    return inverse.reshape(labels.shape), ids[1:]


def evaluate_labels(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> Evaluation:
    """Match ``pred`` to ``gt`` (instance labels of the same shape) at IoU > ``threshold``.

    Raises
    ------
    InputError
        Different shapes, non-integer labels or a threshold below 0.5.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}")
    for what, a in (("prediction", pred), ("ground truth", gt)):
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"{what} must hold integer instance labels, got dtype {a.dtype}")
    if not 0.5 <= threshold < 1:
        raise InputError(f"the IoU threshold must be in [0.5, 1) for one-to-one matching, got {threshold}")
    p, pred_ids = _compact(pred)
    g, gt_ids = _compact(gt)
    pred_iou = best_iou_per_object(p, g) if len(pred_ids) else np.zeros(0)
    gt_iou = best_iou_per_object(g, p) if len(gt_ids) else np.zeros(0)
    tp = int((pred_iou > threshold).sum())
    fp, fn = len(pred_ids) - tp, len(gt_ids) - tp
    denom = tp + fp + fn
    dice = float(np.mean(2 * gt_iou / (1 + gt_iou))) if len(gt_ids) else float("nan")
    return Evaluation(threshold, tp, fp, fn, tp / denom if denom else float("nan"),
                      2 * tp / (2 * tp + fp + fn) if denom else float("nan"), dice,
                      pred_ids, pred_iou, gt_ids, gt_iou)


def _class_layer(labels: np.ndarray, ids: np.ndarray, iou: np.ndarray, classes: np.ndarray,
                 keep: np.ndarray, kwargs: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], str]:
    from napari.utils.colormaps import DirectLabelColormap

    data = np.where(np.isin(labels, ids[keep]), labels, 0)
    colors: dict[Any, Any] = {None: "transparent", 0: "transparent"}
    colors.update({int(i): CLASS_COLORS[c] for i, c in zip(ids[keep], classes[keep])})
    features = {"index": ids[keep], "iou": iou[keep], "class": classes[keep]}
    kwargs = {**kwargs, "features": features, "colormap": DirectLabelColormap(color_dict=colors)}
    return data, kwargs, "labels"


def evaluation_layer_data(ev: Evaluation, pred: np.ndarray, gt: np.ndarray, *, names: tuple[str, str],
                          pred_place: dict[str, Any], gt_place: dict[str, Any]
                          ) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """Two new labels layers: predicted objects coloured TP/FP, and the missed ground-truth objects (FN).

    Each keeps its objects' own label values; ``features`` hold ``index``, ``iou`` (best IoU with the other
    image) and ``class``. ``*_place`` are the ``scale``/``translate`` of the source layers.
    """
    pred_cls = np.where(ev.pred_iou > ev.threshold, "TP", "FP")
    gt_cls = np.where(ev.gt_iou > ev.threshold, "TP", "FN")
    meta = {"ctxseg_evaluation": {"threshold": ev.threshold, "tp": ev.tp, "fp": ev.fp, "fn": ev.fn,
                                  "ap": ev.ap, "f1": ev.f1, "instance_dice": ev.dice,
                                  "prediction": names[0], "ground_truth": names[1]}}
    return [
        _class_layer(np.asarray(pred), ev.pred_ids, ev.pred_iou, pred_cls, np.ones(len(pred_cls), bool),
                     {"name": f"{names[0]} TP/FP", "metadata": meta, **pred_place}),
        _class_layer(np.asarray(gt), ev.gt_ids, ev.gt_iou, gt_cls, gt_cls == "FN",
                     {"name": f"{names[1]} FN", "metadata": meta, **gt_place}),
    ]
