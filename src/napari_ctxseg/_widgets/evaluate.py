"""The Evaluate dock widget: AP, F1 and instance Dice of a prediction against ground truth; TP/FP/FN layers.

The user's layers are never changed: the per-object classes and IoUs go to two new labels layers
(see :func:`._evaluate_io.evaluation_layer_data`), shown in napari's features table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, FloatSpinBox, Label, PushButton
from napari.layers import Labels

from ..core.errors import CtxSegError
from ._dock import show_features_table, tidy
from ._evaluate_io import Evaluation, evaluate_labels, evaluation_layer_data
from ._run import Dock

if TYPE_CHECKING:
    import napari

__all__ = ["EvaluateWidget", "format_scores"]


def format_scores(ev: Evaluation) -> str:
    """The scores as a small HTML table (what the widget shows)."""
    rows = [
        (f"AP@{ev.threshold:.2f}", f"{ev.ap:.3f}"),
        (f"F1@{ev.threshold:.2f}", f"{ev.f1:.3f}"),
        ("instance Dice", f"{ev.dice:.3f}"),
        ("TP / FP / FN", f"{ev.tp} / {ev.fp} / {ev.fn}"),
    ]
    cells = "".join(f"<tr><td>{k}</td><td align='right'>&nbsp;&nbsp;{v}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


class EvaluateWidget(Dock):
    """Pick a prediction and a ground-truth labels layer; scores appear here, classes as new layers.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari when the widget is opened from the plugin menu).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)

        def labels_layers(_widget: Any) -> list[tuple[str, Any]]:
            return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Labels)]

        self.prediction = ComboBox(label="prediction", choices=labels_layers)
        self.ground_truth = ComboBox(label="ground truth", choices=labels_layers)
        self.threshold = FloatSpinBox(
            label="IoU threshold",
            value=0.5,
            min=0.05,
            max=0.95,
            step=0.05,
            tooltip="Objects match one-to-one when their IoU is at least this",
        )
        self.evaluate_button = PushButton(text="Evaluate")
        self.scores = Label(value="")
        self.extend(
            [
                self.prediction,
                self.ground_truth,
                self.threshold,
                self.evaluate_button,
                self.scores,
                self.error,
            ]
        )
        self.evaluation: Evaluation | None = None
        self.evaluate_button.changed.connect(self._on_evaluate)
        tidy(self)

    def _on_evaluate(self) -> None:
        """Score at once (a quick, synchronous computation) and add the class layers."""
        self.clear_error()
        pred, gt = self.prediction.value, self.ground_truth.value
        try:
            if pred is None or gt is None:
                raise CtxSegError("choose a prediction and a ground-truth labels layer")
            if pred is gt:
                raise CtxSegError("the prediction and the ground truth are the same layer")
            ev = evaluate_labels(pred.data, gt.data, self.threshold.value)
        except CtxSegError as exc:
            self.show_error(exc)
            return
        self.evaluation = ev
        self.scores.value = format_scores(ev)
        place = {"scale": tuple(pred.scale), "translate": tuple(pred.translate)}
        gt_place = {"scale": tuple(gt.scale), "translate": tuple(gt.translate)}
        layers = [
            self._viewer.add_labels(data, **kwargs)
            for data, kwargs, _ in evaluation_layer_data(
                ev, pred.data, gt.data, names=(pred.name, gt.name), pred_place=place, gt_place=gt_place
            )
        ]
        self._viewer.layers.selection.active = layers[0]
        show_features_table(self._viewer)
