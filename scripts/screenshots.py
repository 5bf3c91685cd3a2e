"""Screenshots of the Segment, Evaluate and Fine-tune dock widgets on the sample data, for docs/widgets.md.

Run under a virtual display (it drives a real napari window)::

    xvfb-run -a python scripts/screenshots.py --checkpoint runs/default.safetensors

``--checkpoint default`` uses the bundled model. The PNGs go to ``docs/images/``. The Fine-tune dock is
shown after a short fine-tune of the model on the *context* sample (``--finetune-minutes``), written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch  # before Qt

ROOT = Path(__file__).resolve().parents[1]


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    from qtpy.QtWidgets import QApplication

    app, end = QApplication.instance(), time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {timeout} s")
        app.processEvents()
        time.sleep(0.02)


def _settle(seconds: float = 1.0) -> None:
    end = time.monotonic() + seconds
    _wait(lambda: time.monotonic() > end, seconds + 5)


def _grab_top(widget: object, path: Path) -> None:
    """Save a widget without the empty space a dock stretches it to."""
    from qtpy.QtCore import QRect

    height = min(widget.height(), widget.sizeHint().height())  # type: ignore[attr-defined]
    widget.grab(QRect(0, 0, widget.width(), height)).save(str(path))  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default", help="a .safetensors checkpoint, or 'default'")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps")
    parser.add_argument("--samples", type=int, default=2, help="diffusion samples")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run")
    parser.add_argument("--finetune-minutes", type=float, default=0.5, help="time budget of the fine-tune")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from napari._qt import qt_main_window

    from napari_ctxseg._sample_data import read_sample

    qt_main_window.SHOW_QT_WARNING = False  # no "PyQt5 is deprecated" toast over the canvas

    viewer = napari.Viewer(title="napari-ctxseg")
    viewer.window.resize(1600, 1000)
    viewer.open_sample("napari-ctxseg", "context")
    for name in ("context image", "context labels"):
        viewer.layers[name].visible = False
    seg_dock, seg = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Segment")
    seg.image.value = viewer.layers["nuclei"]
    if args.checkpoint != "default":
        seg.browse.value = Path(args.checkpoint).resolve()
    seg.ctx_image.value = viewer.layers["context image"]
    seg.ctx_labels.value = viewer.layers["context labels"]
    seg.steps.value, seg.samples.value = args.steps, args.samples
    seg.out_disagreement.value = True
    seg.run_button.native.click()
    _wait(lambda: seg._worker is None, args.timeout)
    if seg.error.value:
        raise SystemExit(f"the run failed: {seg.error.value}")
    labels = viewer.layers["nuclei ctxseg labels"]
    labels.contour = 0
    labels.opacity = 0.5
    _settle()
    canvas, window = viewer.window._qt_viewer.canvas.native, viewer.window._qt_window
    print(f"Segment docked: canvas {canvas.width()} px of a {window.width()} x {window.height()} px window")
    viewer.screenshot(path=str(args.out / "segment_widget.png"), canvas_only=False, flash=False)
    _grab_top(seg.native, args.out / "segment_dock.png")

    viewer.window.remove_dock_widget(seg_dock)  # room for the Evaluate dock and the table
    viewer.add_labels(read_sample("nuclei_labels"), name="nuclei ground truth", visible=False)
    ev_dock, ev = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Evaluate")
    ev.prediction.value, ev.ground_truth.value = labels, viewer.layers["nuclei ground truth"]
    ev.evaluate_button.native.click()
    for layer in viewer.layers:
        layer.visible = layer.name in ("nuclei", "nuclei ctxseg labels TP/FP", "nuclei ground truth FN")
    _settle()
    viewer.screenshot(path=str(args.out / "evaluate_widget.png"), canvas_only=False, flash=False)
    _grab_top(ev.native, args.out / "evaluate_dock.png")

    viewer.window.remove_dock_widget(ev_dock)
    for layer in viewer.layers:
        layer.visible = layer.name in ("context image", "context labels")
    _, ft = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Fine-tune")
    image_combo, labels_combo, _, _ = ft.pair_rows[0]
    image_combo.value, labels_combo.value = viewer.layers["context image"], viewer.layers["context labels"]
    ft.base.native.setCurrentText(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        ft.output.value, ft._output_auto = str(Path(tmp) / "finetuned.safetensors"), False
        ft.steps.value, ft.budget.value = 100_000, args.finetune_minutes
        ft.crop_size.value, ft.batch_size.value, ft.val_fraction.value = 128, 2, 0.2
        ft.device.value, ft.threads.value = "cpu", args.threads
        ft.run_button.native.click()
        _wait(lambda: not ft.busy, args.timeout)
        if ft.error.value:
            raise SystemExit(f"the fine-tune failed: {ft.error.value}")
        _settle()
        _grab_top(ft.native, args.out / "finetune_dock.png")
    print(f"wrote {sorted(p.name for p in args.out.glob('*.png'))} to {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
