"""Scores of a prediction against ground truth, and new layers that colour objects as TP, FP or FN.

Pure functions (no Qt) over :mod:`napari_ctxseg.core.metrics.scores`: AP and F1 of a one-to-one matching
(:func:`~napari_ctxseg.core.metrics.scores.matching_scores`), the original ctxseg's instance Dice
(:class:`~napari_ctxseg.core.metrics.scores.LabelMetrics`) and per-object IoUs
(:func:`~napari_ctxseg.core.metrics.scores.per_object_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.metrics.scores import LabelMetrics, ObjectMatches, matching_scores, per_object_iou

__all__ = ["CLASS_COLORS", "Evaluation", "evaluate_labels", "evaluation_layer_data"]

#: Colours of the classes in the new layers.
CLASS_COLORS = {"TP": "#33cc55", "FP": "#ee3333", "FN": "#ffaa00"}


@dataclass(frozen=True)
class Evaluation:
    """Scores at one IoU threshold and the per-object matches.

    ``ap`` = TP / (TP + FP + FN) and ``f1`` = 2 TP / (2 TP + FP + FN) of a one-to-one matching (IoU >=
    ``threshold``); ``dice`` is the original ctxseg's instance Dice (mean of the area-weighted Dice of
    predicted objects and of ground-truth objects with their best-overlapping partner). ``gt_ids``/``gt_iou``
    hold every ground-truth object's best IoU with any predicted object.
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    ap: float
    f1: float
    dice: float
    matches: ObjectMatches
    gt_ids: np.ndarray
    gt_iou: np.ndarray


def evaluate_labels(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> Evaluation:
    """Score ``pred`` against ``gt`` (integer instance labels of the same shape, any label values).

    Raises
    ------
    InputError
        Different shapes, labels that are not non-negative integers, or a threshold outside (0, 1).
    """
    if not 0 < threshold < 1:
        raise InputError(f"the IoU threshold must be between 0 and 1, got {threshold}")
    scores = matching_scores(pred, gt, (threshold,))[float(threshold)]
    matches = per_object_iou(pred, gt, threshold)
    original = LabelMetrics()
    original.update(pred, gt)
    summary = original.compute(threshold)
    assert isinstance(summary, dict)  # a dict once updated, without micros
    dice = float(summary["instance_dice"])
    reverse = per_object_iou(gt, pred, threshold)  # every ground-truth object's best IoU
    return Evaluation(
        float(threshold),
        scores.tp,
        scores.fp,
        scores.fn,
        scores.ap,
        scores.f1,
        dice,
        matches,
        reverse.pred_labels,
        reverse.best_iou,
    )


def _class_layer(
    labels: np.ndarray,
    ids: np.ndarray,
    iou: np.ndarray,
    classes: np.ndarray,
    keep: np.ndarray,
    kwargs: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    from napari.utils.colormaps import DirectLabelColormap

    data = np.where(np.isin(labels, ids[keep]), labels, 0)
    colors: dict[Any, Any] = {None: "transparent", 0: "transparent"}
    colors.update({int(i): CLASS_COLORS[c] for i, c in zip(ids[keep], classes[keep])})
    features = {
        "index": ids[keep],
        "iou": iou[keep],
        "class": classes[keep],
        **{k: v[keep] for k, v in (extra or {}).items()},
    }
    kwargs = {**kwargs, "features": features, "colormap": DirectLabelColormap(color_dict=colors)}
    return data, kwargs, "labels"


def evaluation_layer_data(
    ev: Evaluation,
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    names: tuple[str, str],
    pred_place: dict[str, Any],
    gt_place: dict[str, Any],
) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """Two new labels layers: predicted objects coloured TP/FP, and the missed ground-truth objects (FN).

    Each keeps its objects' own label values; ``features`` hold ``index``, ``iou`` (best IoU with the other
    image) and ``class`` (and for predictions ``best_gt``, ``matched_gt``). ``*_place`` are the
    ``scale``/``translate`` of the source layers.
    """
    m = ev.matches
    pred_cls = np.where(m.is_tp, "TP", "FP")
    gt_cls = np.where(np.isin(ev.gt_ids, m.fn_labels), "FN", "TP")
    meta = {
        "ctxseg_evaluation": {
            "threshold": ev.threshold,
            "tp": ev.tp,
            "fp": ev.fp,
            "fn": ev.fn,
            "ap": ev.ap,
            "f1": ev.f1,
            "instance_dice": ev.dice,
            "prediction": names[0],
            "ground_truth": names[1],
        }
    }
    extra = {"best_gt": m.best_gt, "matched_gt": m.matched_gt}
    return [
        _class_layer(
            np.asarray(pred),
            m.pred_labels,
            m.best_iou,
            pred_cls,
            np.ones(len(pred_cls), bool),
            {"name": f"{names[0]} TP/FP", "metadata": meta, **pred_place},
            extra,
        ),
        _class_layer(
            np.asarray(gt),
            ev.gt_ids,
            ev.gt_iou,
            gt_cls,
            gt_cls == "FN",
            {"name": f"{names[1]} FN", "metadata": meta, **gt_place},
        ),
    ]
