"""The Evaluate dock widget in a real viewer: scores equal the library's, classes go to new layers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from napari.layers import Labels

from napari_ctxseg._widgets._evaluate_io import CLASS_COLORS, evaluate_labels
from napari_ctxseg.core.errors import InputError
from napari_ctxseg.core.metrics.scores import LabelMetrics, matching_scores, per_object_iou


def core_numbers(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[Any, ...]:
    """(tp, fp, fn, ap, f1, instance dice) straight from core.metrics."""
    s = matching_scores(pred, gt, (threshold,))[threshold]
    m = LabelMetrics()
    m.update(pred, gt)
    return s.tp, s.fp, s.fn, s.ap, s.f1, m.compute(threshold)["instance_dice"]


def literal_pair() -> tuple[np.ndarray, np.ndarray]:
    """gt: three 4x4 squares; pred: one exact (TP), one shifted by 2 (IoU 1/3: FP + FN), one extra (FP)."""
    gt = np.zeros((20, 20), np.uint16)
    gt[0:4, 0:4], gt[10:14, 10:14], gt[0:4, 15:19] = 1, 2, 3
    pred = np.zeros((20, 20), np.int32)
    pred[0:4, 0:4], pred[10:14, 12:16], pred[16:20, 0:4] = 5, 9, 12
    return pred, gt


def test_literal_scores() -> None:
    pred, gt = literal_pair()
    ev = evaluate_labels(pred, gt)
    assert (ev.tp, ev.fp, ev.fn) == (1, 2, 2)
    assert ev.ap == pytest.approx(1 / 5) and ev.f1 == pytest.approx(1 / 3)
    assert ev.dice == pytest.approx(0.5)  # area-weighted Dice (1 + 1/2 + 0) / 3 for both sides
    assert ev.matches.pred_labels.tolist() == [5, 9, 12] and ev.matches.fn_labels.tolist() == [2, 3]
    np.testing.assert_allclose(ev.matches.best_iou, [1, 1 / 3, 0])
    assert ev.gt_ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(ev.gt_iou, [1, 1 / 3, 0])
    with pytest.raises(InputError, match=r"\(20, 20\).*\(20, 21\)"):
        evaluate_labels(pred, np.zeros((20, 21), int))
    with pytest.raises(InputError, match="threshold"):
        evaluate_labels(pred, gt, threshold=1.5)


def test_widget_shows_library_scores_and_adds_class_layers(make_napari_viewer: Any) -> None:
    viewer = make_napari_viewer()
    pred, gt = literal_pair()
    p = viewer.add_labels(pred, name="pred", scale=(2.0, 2.0), translate=(1.0, 1.0))
    g = viewer.add_labels(gt, name="gt", scale=(2.0, 2.0), translate=(1.0, 1.0))
    _, widget = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Evaluate")
    widget.prediction.value, widget.ground_truth.value = p, g
    widget.evaluate_button.native.click()

    assert widget.error.value == ""
    ev = widget.evaluation
    assert (ev.tp, ev.fp, ev.fn, ev.ap, ev.f1, ev.dice) == core_numbers(pred, gt, 0.5)
    for text in ("0.200", "0.333", "0.500", "1 / 2 / 2"):
        assert text in widget.scores.value
    classes = viewer.layers["pred TP/FP"]
    missed = viewer.layers["gt FN"]
    assert isinstance(classes, Labels) and isinstance(missed, Labels)
    assert dict(zip(classes.features["index"], classes.features["class"])) == {5: "TP", 9: "FP", 12: "FP"}
    assert sorted(np.unique(missed.data)) == [0, 2, 3] and set(missed.features["class"]) == {"FN"}
    np.testing.assert_allclose(classes.features["iou"], [1, 1 / 3, 0])
    assert classes.features["matched_gt"].tolist() == [1, 0, 0]
    assert classes.features["best_gt"].tolist() == [1, 2, 0]
    np.testing.assert_allclose(
        classes.colormap.map(np.array([5, 9])),
        [
            np.r_[int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16), 255] / 255
            for c in (CLASS_COLORS["TP"], CLASS_COLORS["FP"])
        ],
        atol=1e-6,
    )
    np.testing.assert_allclose(classes.scale, (2.0, 2.0))
    np.testing.assert_array_equal(p.data, literal_pair()[0])  # the user's layers are untouched
    np.testing.assert_array_equal(g.data, literal_pair()[1])
    assert "Features table widget (napari)" in viewer.window.dock_widgets


def test_real_crop_equals_core_metrics(make_napari_viewer: Any) -> None:
    from skimage.morphology import disk, erosion

    from napari_ctxseg._sample_data import read_sample

    gt = read_sample("nuclei_labels")[:128, :128].astype(np.int32)
    pred = np.where(erosion(gt > 0, disk(2)), gt, 0)  # shrunk objects: small ones fall below IoU 0.5
    pred[pred % 5 == 0] = 0  # and some are missed
    viewer = make_napari_viewer()
    viewer.add_labels(pred, name="pred")
    viewer.add_labels(gt, name="gt")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Evaluate")
    widget.prediction.value, widget.ground_truth.value = viewer.layers["pred"], viewer.layers["gt"]
    for threshold in (0.3, 0.5, 0.75):
        widget.threshold.value = threshold
        widget.evaluate_button.native.click()
        ev = widget.evaluation
        assert (ev.tp, ev.fp, ev.fn, ev.ap, ev.f1, ev.dice) == core_numbers(pred, gt, threshold)
        assert ev.fn > 0 and f"{ev.ap:.3f}" in widget.scores.value and f"{ev.dice:.3f}" in widget.scores.value
        m = per_object_iou(pred, gt, threshold)
        table = viewer.layers[-2].features  # "pred TP/FP" (napari appends a number after the first time)
        assert table["class"].tolist() == np.where(m.is_tp, "TP", "FP").tolist()
        assert sorted(np.unique(viewer.layers[-1].data))[1:] == m.fn_labels.tolist()


def test_shape_mismatch_is_an_error_in_the_dock(make_napari_viewer: Any) -> None:
    viewer = make_napari_viewer()
    viewer.add_labels(np.ones((10, 10), np.uint8), name="a")
    viewer.add_labels(np.ones((12, 10), np.uint8), name="b")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Evaluate")
    widget.prediction.value, widget.ground_truth.value = viewer.layers["a"], viewer.layers["b"]
    widget.evaluate_button.native.click()
    assert "(10, 10)" in widget.error.value and "(12, 10)" in widget.error.value
    assert len(viewer.layers) == 2
