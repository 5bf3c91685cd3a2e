"""Metrics: parity of LabelMetrics with the original (``shared/parity/metrics``); one-to-one matching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_ctxseg.core.errors import InputError
from napari_ctxseg.core.metrics.scores import (
    LabelMetrics,
    MatchScores,
    matching_scores,
    per_object_iou,
    pool_scores,
)

METRICS_DIR = Path(__file__).parents[2].parent / "shared" / "parity" / "metrics"
PER_OBJECT = ["pred_areas", "gt_areas", "pred_scores", "gt_scores", "ious"]


@pytest.fixture(scope="module")
def fx() -> tuple[dict[str, np.ndarray], dict]:
    if not (METRICS_DIR / "metrics.npz").exists():
        pytest.skip(f"parity fixtures not found at {METRICS_DIR}")
    with np.load(METRICS_DIR / "metrics.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads((METRICS_DIR / "metrics.json").read_text())


def assert_same(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for key, value in ref.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key


PAIRS = ["typical", "partial", "pred_empty", "both_empty", "gt_empty"]


@pytest.mark.parametrize("name", PAIRS)
def test_label_metrics_per_pair(fx: tuple, name: str) -> None:
    arrays, ref = fx
    metrics = LabelMetrics()
    metrics.update(arrays[f"pair.{name}.pred"], arrays[f"pair.{name}.gt"])
    for key in PER_OBJECT:
        np.testing.assert_allclose(getattr(metrics, key)[0], arrays[f"pair.{name}.{key}"], rtol=1e-12, atol=0)
    assert_same(metrics.compute(), ref["per_pair"][name]["compute"])
    assert_same(metrics.compute(iou_threshold=0.75), ref["per_pair"][name]["compute_iou75"])


def test_label_metrics_macro_and_micros(fx: tuple) -> None:
    arrays, ref = fx
    metrics = LabelMetrics()
    assert metrics.compute() is None
    for name in ref["all_pairs"]["order"]:
        metrics.update(arrays[f"pair.{name}.pred"], arrays[f"pair.{name}.gt"])
    macro, micros = metrics.compute(micros=True)
    assert_same(macro, ref["all_pairs"]["macro"])
    assert len(micros) == len(ref["all_pairs"]["micros"])
    for got, want in zip(micros, ref["all_pairs"]["micros"]):
        assert_same(got, want)


def test_multi_label_metrics_equivalent(fx: tuple) -> None:
    """MultiLabelMetrics(2).update([pred, zeros], gt) is one LabelMetrics per prediction."""
    arrays, ref = fx
    gt, pred = arrays["pair.typical.gt"], arrays["pair.typical.pred"]
    for candidate, want in zip([pred, np.zeros_like(pred)], ref["multi_label_metrics"]["per_metric_compute"]):
        metrics = LabelMetrics()
        metrics.update(candidate, gt)
        assert_same(metrics.compute(), want)


def test_label_metrics_is_label_value_invariant(fx: tuple) -> None:
    arrays, _ = fx
    pred, gt = arrays["pair.typical.pred"], arrays["pair.typical.gt"]
    a, b = LabelMetrics(), LabelMetrics()
    a.update(pred, gt)
    b.update(np.where(pred > 0, pred * 7 + 1000, 0), gt)
    assert a.compute() == b.compute()


def test_matching_closed_form() -> None:
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2
    gt[0:2, 8:10] = 3  # missed
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 5  # IoU 12/16 = 0.75 with gt 1
    pred[6:10, 6:10] = 9  # IoU 1 with gt 2
    pred[5, 0:3] = 4  # spurious
    scores = matching_scores(pred, gt, thresholds=(0.5, 0.75, 0.9))
    assert (scores[0.5].tp, scores[0.5].fp, scores[0.5].fn) == (2, 1, 1)
    assert scores[0.75].tp == 2 and scores[0.9].tp == 1
    assert scores[0.5].precision == pytest.approx(2 / 3) and scores[0.5].recall == pytest.approx(2 / 3)
    assert scores[0.5].f1 == pytest.approx(4 / 6) and scores[0.5].ap == pytest.approx(2 / 4)
    assert scores[0.9].ap == pytest.approx(1 / 5)


def test_matching_counts_an_exact_tie() -> None:
    """IoU == threshold is a match (the ``>=`` rule), also when two pairs tie at 0.5."""
    half = matching_scores(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]]), thresholds=(0.5, 0.6))
    assert (half[0.5].tp, half[0.5].fp, half[0.5].fn) == (1, 0, 0)
    assert half[0.6].tp == 0
    quarter = matching_scores(np.array([[1, 1, 1, 0]]), np.array([[1, 1, 1, 1]]), thresholds=(0.75,))
    assert quarter[0.75].tp == 1
    two = matching_scores(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]]), thresholds=(0.5,))
    assert (two[0.5].tp, two[0.5].fp, two[0.5].fn) == (1, 1, 0)


def test_matching_is_one_to_one_at_low_threshold() -> None:
    """Pred 2 overlaps gts 1 and 2 equally (IoU 0.375), pred 1 only gt 1 (0.4): the best-overlap rule sends
    both predictions to gt 1, the one-to-one matching gives pred 2 to gt 2."""
    gt = np.zeros((1, 20), int)
    gt[0, 0:10] = 1
    gt[0, 10:20] = 2
    pred = np.zeros_like(gt)
    pred[0, 0:4] = 1  # IoU 0.4 with gt 1
    pred[0, 4:16] = 2  # IoU 6/16 with gt 1 (its best), 6/16 with gt 2
    scores = matching_scores(pred, gt, thresholds=(0.3,))[0.3]
    assert scores.tp == 2 and scores.fp == 0 and scores.fn == 0
    per_object = per_object_iou(pred, gt, threshold=0.3)
    np.testing.assert_array_equal(per_object.best_gt, [1, 1])
    np.testing.assert_array_equal(per_object.matched_gt, [1, 2])


def test_matching_empty_and_3d() -> None:
    empty = np.zeros((4, 5, 6), int)
    one = empty.copy()
    one[1:3, 1:3, 1:3] = 8
    assert math.isnan(matching_scores(empty, empty)[0.5].f1)
    s = matching_scores(one, empty)[0.5]
    assert (s.tp, s.fp, s.fn, s.precision, s.ap) == (0, 1, 0, 0.0, 0.0) and math.isnan(s.recall)
    s = matching_scores(one, one)[0.9]
    assert s.tp == 1 and s.f1 == 1.0


def test_pooling_adds_counts() -> None:
    a = {0.5: MatchScores(0.5, 3, 1, 2)}
    b = {0.5: MatchScores(0.5, 1, 0, 4)}
    pooled = pool_scores([a, b])[0.5]
    assert (pooled.tp, pooled.fp, pooled.fn) == (4, 1, 6)
    assert pooled.ap == pytest.approx(4 / 11)
    assert pooled.as_dict()["f1"] == pytest.approx(8 / 15)
    with pytest.raises(InputError):
        _ = MatchScores(0.5, 1, 0, 0) + MatchScores(0.75, 1, 0, 0)
    assert pool_scores([]) == {}


def test_per_object_iou(fx: tuple) -> None:
    arrays, _ = fx
    pred, gt = arrays["pair.typical.pred"], arrays["pair.typical.gt"]
    result = per_object_iou(pred, gt, threshold=0.5)
    np.testing.assert_array_equal(result.pred_labels, np.unique(pred)[1:])
    # the best IoU per prediction is the original's per-object IoU (same best-overlap rule)
    np.testing.assert_allclose(result.best_iou, arrays["pair.typical.ious"], rtol=1e-12)
    scores = matching_scores(pred, gt, thresholds=(0.5,))[0.5]
    assert result.is_tp.sum() == scores.tp and result.fp_labels.size == scores.fp
    assert result.fn_labels.size == scores.fn
    assert np.all(result.best_iou[result.is_tp] >= 0.5)
    for label, matched in zip(result.pred_labels[result.is_tp], result.matched_gt[result.is_tp]):
        inter = np.sum((pred == label) & (gt == matched))
        assert inter / np.sum((pred == label) | (gt == matched)) >= 0.5
    assert set(result.fn_labels).isdisjoint(result.matched_gt[result.is_tp])


@pytest.mark.parametrize(
    ("pred", "gt"),
    [
        (np.zeros((3, 3), int), np.zeros((3, 4), int)),
        (np.zeros((3, 3)), np.zeros((3, 3), int)),
        (-np.ones((3, 3), int), np.zeros((3, 3), int)),
    ],
)
def test_bad_inputs(pred: np.ndarray, gt: np.ndarray) -> None:
    for fn in (matching_scores, per_object_iou, lambda p, g: LabelMetrics().update(p, g)):
        with pytest.raises(InputError):
            fn(pred, gt)
