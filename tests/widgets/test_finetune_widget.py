"""The fine-tune dock widget in a real viewer: training on layers, the loss curve, cancel, budget, errors."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctxseg.services.recent import clear_recent_checkpoints, recent_checkpoints


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CtxSegP checkpoint to fine-tune from."""
    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.models import build_model
    from napari_ctxseg.services.models import PRESETS

    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("base") / "tiny.safetensors",
        build_model(PRESETS["tiny"]).eval(),
        sigma_data=1.0,
    )


def discs(shape: tuple[int, int] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(((25, 30), (60, 64), (70, 20))):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = i + 1
    return ((labels > 0) * 200.0 + np.random.default_rng(0).normal(20, 5, shape)).astype(np.float32), labels


@pytest.fixture
def widget(make_napari_viewer, qtbot, tiny_base: Path, tmp_path: Path):
    from napari_ctxseg._widgets.finetune import FinetuneWidget

    viewer = make_napari_viewer()
    image, labels = discs()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells_labels")
    w = FinetuneWidget(viewer)
    qtbot.addWidget(w.native)
    w.base.native.setCurrentText(str(tiny_base))
    w.output.native.setText(str(tmp_path / "ft.safetensors"))
    w._output_auto = False
    w.steps.native.setValue(3)
    w.crop_size.native.setValue(64)
    w.batch_size.native.setValue(1)
    w.val_fraction.native.setValue(0.0)
    w.device.native.setCurrentText("cpu")
    w.threads.native.setValue(1)
    clear_recent_checkpoints()
    yield w
    if w.busy:  # never leave a worker thread behind
        w.cancel()
        qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    clear_recent_checkpoints()


def test_finetune_from_layers_with_a_shapes_region(widget, qtbot) -> None:
    from napari_ctxseg.core.nn.load import load_checkpoint

    widget.viewer.add_shapes([np.array([[5, 5], [90, 90]])], shape_type="rectangle", name="done")
    widget.pair_rows[0][2].native.setCurrentText("done")
    widget.val_fraction.native.setValue(0.3)
    widget.run_button.native.click()
    assert widget.busy and widget.run_button.native.text() == "Cancel"
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.error.native.text() == ""
    assert [s for s, _ in widget.curve.train] == [1, 2, 3] and widget.curve.val
    assert widget.result.stopped == "done" and widget.result.path.is_file()
    _, info = load_checkpoint(widget.result.path)
    assert info.provenance["finetune"]["layers"] == ["cells", "cells_labels", "done"]
    assert info.provenance["finetune"]["pairs"][0]["box"] == [0, 96, 0, 96]  # region + margin clipped
    assert recent_checkpoints() == [widget.result.path.resolve()]
    assert (
        widget.base.native.findText(str(widget.result.path)) >= 0 and "saved" in widget.status.native.text()
    )
    widget.curve.resize(300, 150)
    image = widget.curve.grab().toImage()  # paints the curve: the smoothed training loss is drawn in blue
    blue = [image.pixelColor(x, y) for x in range(60, 290, 3) for y in range(20, 130, 2)]
    assert any(c.blue() > 200 and c.red() < 150 for c in blue)


def test_cancel_mid_run_keeps_the_best_weights_and_event_loop_stays_responsive(widget, qtbot) -> None:
    from qtpy.QtCore import QTimer

    from napari_ctxseg.core.nn.load import load_checkpoint

    widget.steps.native.setValue(100_000)
    widget.val_fraction.native.setValue(0.3)
    lags: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lags.append(now - last[0] - 0.05)
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(50)
    widget.run_button.native.click()
    t0 = time.perf_counter()
    qtbot.waitUntil(lambda: len(widget.curve.train) >= 8 and time.perf_counter() - t0 > 3, timeout=120_000)
    widget.run_button.native.click()  # Cancel
    assert not widget.run_button.native.isEnabled()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    timer.stop()
    assert (
        widget.error.native.text() == ""
        and widget.run_button.native.text() == "Train"
        and widget.run_button.native.isEnabled()
    )
    result = widget.result
    assert result.stopped == "cancelled" and 8 <= result.steps_done < 100_000
    _, info = load_checkpoint(result.path)
    assert info.provenance["complete"] is False and info.provenance["steps_done"] == result.steps_done
    median, worst = statistics.median(lags) * 1e3, max(lags) * 1e3
    print(
        f"\nevent-loop lag during training (50 ms timer, {len(lags)} ticks): median {median:.1f} ms, "
        f"max {worst:.1f} ms"
    )
    assert median < 100  # the GUI thread is not blocked by training


def test_time_budget_stops_training_in_bfloat16(widget, qtbot) -> None:
    from napari_ctxseg.core.io.checkpoint import read_info

    widget.steps.native.setValue(100_000)
    widget.budget.native.setValue(0.01)  # 0.6 s
    widget.bf16.native.setChecked(True)
    assert widget.settings().precision == "bf16"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.result.stopped == "time budget" and 1 <= widget.result.steps_done < 100_000
    assert widget.result.path.is_file() and "time budget reached" in widget.status.native.text()
    assert read_info(widget.result.path).provenance["train_config"]["precision"] == "bf16"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda v: v.layers["cells_labels"].__setattr__("data", np.zeros((80, 96), np.int32)),
            "cells / cells_labels: labels shape (80, 96) does not match image shape (96, 96)",
        ),
        (
            lambda v: v.layers["cells_labels"].__setattr__("data", np.zeros((96, 96), np.int32)),
            "the labels contain no annotated objects",
        ),
        (lambda v: v.add_labels(np.zeros((96, 96), np.int32), name="region"), "the region mask is all zero"),
        (lambda v: v.layers.remove("cells_labels"), "choose an image layer and a labels layer"),
    ],
)
def test_bad_input_shows_a_clear_error_and_runs_nothing(widget, setup, message) -> None:
    setup(widget.viewer)
    widget._refresh_layers()
    if "region" in widget.viewer.layers:
        widget.pair_rows[0][2].native.setCurrentText("region")
    widget.run_button.native.click()
    assert not widget.busy and message in widget.error.native.text()
    assert widget.run_button.native.text() == "Train" and not Path(widget.output.native.text()).exists()


def test_an_error_during_training_is_shown_and_the_widget_returns_to_idle(widget, qtbot, monkeypatch) -> None:
    from napari_ctxseg._widgets import finetune
    from napari_ctxseg.core.errors import InputError

    def failing(req, **kwargs):
        raise InputError("something went wrong in the run")
        yield

    monkeypatch.setattr(finetune, "run_finetune", failing)
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.error.native.text() == "something went wrong in the run" and widget.result is None
    assert widget.run_button.native.text() == "Train" and all(box.native.isEnabled() for box in widget.form)
