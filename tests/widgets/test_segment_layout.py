"""The Segment dock's compact layout: docked in a 1600 x 1000 window, it leaves the canvas half the width."""

from __future__ import annotations

from typing import Any

from .conftest import nuclei_crop


def test_docked_segment_widget_leaves_half_the_window_to_the_canvas(
    make_napari_viewer: Any, qtbot: Any
) -> None:
    viewer = make_napari_viewer(show=True)
    viewer.add_image(nuclei_crop(), name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Segment")
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    qtbot.waitUntil(lambda: window.width() == 1600, timeout=5_000)
    qtbot.wait(300)  # the docks settle, the deferred label alignment of the dock runs
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 800, f"canvas {canvas.width()} px of a {window.width()} px window"
    # what stays in view without unfolding anything: image, model, diameter, context and Run
    for control in (widget.image, widget.checkpoint, widget.diameter, widget.ctx_image, widget.run_button):
        assert control.native.isVisible(), control
    for control in (widget.steps, widget.stitch, widget.out_flow, widget.min_size):
        assert not control.native.isVisible(), control  # folded away in a section
    widget.sections["sampler"].header.native.click()
    assert widget.steps.native.isVisible()
