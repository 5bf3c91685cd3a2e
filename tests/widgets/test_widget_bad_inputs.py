"""The bad-input matrix of the Segment widget (issue 27): layers of hostile dtypes and shapes, bad contexts.

One row per input that can reach the widget through napari layers: the expected outcome is a labels layer
or one clear message in the dock (never a traceback, never a changed layer). Float or NaN labels cannot
reach it as a labels layer (napari refuses them), so they are checked at the widget's context boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from napari.layers import Labels

from napari_ctxseg._widgets._layer_io import context_from_layers
from napari_ctxseg.core.errors import InputError
from tests.conftest import blobs

from .conftest import run_and_wait

IMG, LAB = blobs((64, 64), seed=0)
IMG2, LAB2 = blobs((64, 64), seed=1)


@dataclass
class Row:
    """A layer (data, add_image kwargs), an optional context (image, labels[, region labels]), the outcome.

    ``words`` empty: a labels layer must be added; otherwise the dock's error must contain every word.
    """

    id: str
    data: np.ndarray
    words: tuple[str, ...] = ()
    kwargs: dict[str, Any] | None = None
    context: tuple[np.ndarray, ...] | None = None


ROWS = [
    Row("nan-image", np.where(LAB > 0, np.nan, IMG), ("NaN or infinite",)),
    Row("inf-image", np.where(LAB > 0, np.inf, IMG), ("NaN or infinite",)),
    Row("constant-image", np.full((64, 64), 7.0, np.float32), ("constant",)),
    Row("tiny-image", IMG[:4, :4], ("too small",)),
    Row("hw2-image-is-a-stack-of-thin-planes", np.stack([IMG, IMG2], -1), ("too small", "(64, 2)")),
    Row("stack-with-a-nan-plane", np.stack([IMG, np.full((64, 64), np.nan)]), ("NaN",)),
    Row("huge-finite-floats", IMG.astype(np.float64) * 1e298),
    Row("bool-image", LAB > 0),
    Row("int64-image", (IMG * 1e12).astype(np.int64)),
    Row("float16-image", IMG.astype(np.float16)),
    Row("uint16-image", (IMG * 100).astype(np.uint16)),
    Row(
        "rgba-image",
        np.dstack([IMG, IMG, IMG, np.full_like(IMG, 255)]).clip(0, 255).astype(np.uint8),
        kwargs={"rgb": True},
    ),
    Row("one-plane-stack", IMG[None]),
    Row("context-image-nan", IMG, ("NaN or infinite",), context=(np.where(LAB2 > 0, np.nan, IMG2), LAB2)),
    Row("context-image-constant", IMG, ("constant",), context=(np.ones((64, 64), np.float32), LAB2)),
    Row("context-labels-empty", IMG, ("no annotated object",), context=(IMG2, np.zeros_like(LAB2))),
    Row("context-labels-wrong-shape", IMG, ("must cover",), context=(IMG2, LAB2[:32])),
    Row("context-region-empty", IMG, ("region is empty",), context=(IMG2, LAB2, np.zeros_like(LAB2))),
    Row("context-good", IMG, context=(IMG2, LAB2)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_segment_widget_bad_input(row: Row, qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, layer = segment_widget(row.data, **(row.kwargs or {}))
    before = np.array(layer.data, copy=True)
    widget.steps.value, widget.diameter.value = 1, 20.0  # one network call per plane
    if row.context is not None:
        ctx = viewer.add_image(row.context[0], name="ctx")
        lab = viewer.add_labels(row.context[1], name="ctx labels")
        for combo in (widget.ctx_image, widget.ctx_labels, widget.ctx_region):
            combo.reset_choices()
        widget.ctx_image.value, widget.ctx_labels.value = ctx, lab
        if len(row.context) > 2:
            widget.ctx_region.value = viewer.add_labels(row.context[2], name="region")
        widget.image.value = layer
    n_labels = sum(isinstance(lay, Labels) for lay in viewer.layers)
    run_and_wait(qtbot, widget)
    added = sum(isinstance(lay, Labels) for lay in viewer.layers) - n_labels
    if row.words:
        assert added == 0
        for word in row.words:
            assert word in widget.error.value, widget.error.value
        assert "Traceback" not in widget.error.value and "\n" not in widget.error.value
    else:
        assert widget.error.value == "" and added == 1
    np.testing.assert_array_equal(np.asarray(layer.data), before)  # the user's layer is never modified


def test_napari_refuses_float_labels_layers() -> None:
    """Float or NaN labels cannot reach the widget as a labels layer: napari refuses them."""
    for data in (LAB2.astype(np.float32), np.where(LAB2 > 0, LAB2, np.nan)):
        with pytest.raises(TypeError, match="integer"):
            Labels(data)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (LAB2.astype(np.float32) + 0.5, ("integer instance labels", "float32")),
        (np.where(LAB2 > 0, LAB2, np.nan), ("NaN", "integer instance labels")),
    ],
    ids=["float", "nan"],
)
def test_widget_context_boundary_refuses_float_or_nan_labels(
    labels: np.ndarray, words: tuple[str, ...]
) -> None:
    """Any layer-like object (a plugin's own layer type, say) with float labels is refused, not truncated."""
    image = SimpleNamespace(data=IMG2, rgb=False, name="ctx", translate=(0.0, 0.0), scale=(1.0, 1.0))
    lab = SimpleNamespace(data=labels, rgb=False, name="float labels", metadata={})
    with pytest.raises(InputError) as exc:
        context_from_layers(image, lab)
    for word in words:
        assert word in str(exc.value)
