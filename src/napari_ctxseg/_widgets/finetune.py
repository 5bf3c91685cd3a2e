"""Fine-tune dock widget: train on the viewer's (image, labels[, region]) layers, with a live loss curve.

Thin: it reads layers into :class:`~napari_ctxseg.services.finetune_data.TrainingPair` values, checks them
at once (bad input runs nothing), and runs :func:`~napari_ctxseg.services.finetune.run_finetune` on a
napari generator worker. Cancel asks the service to stop between steps; the service writes the best
weights so far. A written checkpoint is registered with :mod:`napari_ctxseg.services.recent`, where the
Segment widget finds it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import CtxSegError, InputError
from ..services.devices import resolve_device
from ..services.finetune import (
    FinetuneResult,
    FinetuneSettings,
    check_base,
    check_pairs,
    default_output_path,
    finetune_request_from_arrays,
    run_finetune,
)
from ..services.finetune_data import TrainingPair
from ..services.recent import add_recent_checkpoint, recent_checkpoints
from ._loss_curve import LossCurve

if TYPE_CHECKING:
    import napari

    from ..core.train.trainer import TrainProgress

__all__ = ["FinetuneWidget"]

_NONE = "(none: labels complete)"


def _fmt_time(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _LayerCombo(QComboBox):
    """Names of the viewer's layers of some types; refreshed when layers change and when opened."""

    def __init__(self, viewer: napari.Viewer, kinds: tuple[str, ...], none: str | None = None) -> None:
        super().__init__()
        self.viewer, self.kinds, self.none = viewer, kinds, none
        self.refresh()

    def refresh(self, *_: Any) -> None:
        names = ([self.none] if self.none else []) + [
            layer.name for layer in self.viewer.layers if type(layer).__name__ in self.kinds
        ]
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)

    def showPopup(self) -> None:
        self.refresh()
        super().showPopup()

    def layer(self) -> Any:
        name = self.currentText()
        if not name or name == self.none or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]


def _layer_array(layer: Any) -> np.ndarray:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.array(data, copy=True)  # a snapshot: painting during training does not race the worker


class FinetuneWidget(QWidget):
    """Dock widget: fine-tune a ctxseg model on annotations in the viewer.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.result: FinetuneResult | None = None
        self._stop = threading.Event()
        self._output_auto = True
        self.pair_rows: list[tuple[_LayerCombo, _LayerCombo, _LayerCombo, QWidget]] = []
        layout = QVBoxLayout(self)
        self.form = (self._data_box(), self._model_box(), self._settings_box())
        for box in self.form:
            layout.addWidget(box)
        self.run_button = QPushButton("Train")
        self.run_button.clicked.connect(self._run_or_cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("idle")
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #e0533d")
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.curve = LossCurve()
        for w in (self.run_button, self.progress, self.status, self.error, self.curve):
            layout.addWidget(w)
        layout.addStretch(1)
        events = (self.viewer.layers.events.inserted, self.viewer.layers.events.removed)
        for event in events:
            event.connect(self._refresh_layers)

        def on_destroyed(*_: Any, stop: threading.Event = self._stop, cb: Any = self._refresh_layers) -> None:
            stop.set()  # a running fine-tune stops at its next step and saves the best weights
            for event in events:
                event.disconnect(cb)

        self.destroyed.connect(on_destroyed)

    # ---- form --------------------------------------------------------------------------------------
    def _data_box(self) -> QGroupBox:
        box = QGroupBox("Training data (image, labels, region where the annotation is complete)")
        self._pairs_layout = QVBoxLayout(box)
        add = QPushButton("Add pair")
        add.clicked.connect(self.add_pair)
        self.partial = QCheckBox("Labels are partial: without a region, teach only near painted objects")
        self._pairs_layout.addWidget(add)
        self._pairs_layout.addWidget(self.partial)
        self.add_pair()
        return box

    def add_pair(self) -> None:
        """Add a row (image, labels, region) to the training data."""
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        combos = (
            _LayerCombo(self.viewer, ("Image",)),
            _LayerCombo(self.viewer, ("Labels",)),
            _LayerCombo(self.viewer, ("Labels", "Shapes"), none=_NONE),
        )
        combos[2].setToolTip(
            "Labels or shapes layer marking where the annotation is complete (non-zero); "
            "elsewhere nothing is taught"
        )
        remove = QPushButton("x")
        remove.setFixedWidth(24)
        entry = (*combos, row)
        remove.clicked.connect(lambda: self._remove_pair(entry))
        for w in (*combos, remove):
            h.addWidget(w)
        idx = len(self.pair_rows)
        if idx < combos[0].count():
            combos[0].setCurrentIndex(idx)
        if idx < combos[1].count():
            combos[1].setCurrentIndex(idx)
        self.pair_rows.append(entry)
        self._pairs_layout.insertWidget(idx, row)

    def _remove_pair(self, entry: tuple) -> None:
        if len(self.pair_rows) > 1 and entry in self.pair_rows:
            self.pair_rows.remove(entry)
            entry[3].deleteLater()

    def _refresh_layers(self, *_: Any) -> None:
        for row in self.pair_rows:
            for combo in row[:3]:
                combo.refresh()

    def _model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.base = QComboBox()
        self.base.setEditable(True)
        self.base.addItems(["default", *(str(p) for p in recent_checkpoints())])
        self.output = QLineEdit(str(default_output_path()))
        self.output.textEdited.connect(lambda _: setattr(self, "_output_auto", False))
        form.addRow("Start from", self._with_browse(self.base, save=False))
        form.addRow("Save to", self._with_browse(self.output, save=True))
        return box

    def _with_browse(self, field: QWidget, save: bool) -> QWidget:
        w = QWidget()
        h = QHBoxLayout(w)
        h.setContentsMargins(0, 0, 0, 0)
        button = QPushButton("...")
        button.setFixedWidth(28)
        button.clicked.connect(lambda: self._browse(field, save))
        h.addWidget(field, 1)
        h.addWidget(button)
        return w

    def _browse(self, field: QWidget, save: bool) -> None:
        filt = "Checkpoints (*.safetensors)"
        if save:
            path, _ = QFileDialog.getSaveFileName(self, "Save fine-tuned model", self.output.text(), filt)
            if path:
                self.output.setText(path)
                self._output_auto = False
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", str(Path.home()), filt)
            if path:
                self.base.setCurrentText(path)

    def _settings_box(self) -> QGroupBox:
        box = QGroupBox("Settings")
        form = QFormLayout(box)
        d = FinetuneSettings()
        self.steps = self._spin(QSpinBox(), 1, 1_000_000, d.steps)
        self.budget = self._spin(
            QDoubleSpinBox(),
            0.0,
            10_000.0,
            d.time_budget_min,
            decimals=2,
            tip="stop after this many minutes (0: no limit); the best weights are saved",
        )
        self.lr = self._spin(QDoubleSpinBox(), 1e-6, 1.0, d.lr, decimals=6, step=1e-4)
        self.batch_size = self._spin(QSpinBox(), 1, 256, d.batch_size)
        self.crop_size = self._spin(QSpinBox(), 32, 1024, d.crop_size, step=32, tip="a multiple of 32")
        self.augment = QCheckBox("flips, rescaling, intensity")
        self.augment.setChecked(d.augment)
        self.val_fraction = self._spin(
            QDoubleSpinBox(),
            0.0,
            0.9,
            d.val_fraction,
            decimals=2,
            step=0.05,
            tip="held out: whole pairs/frames, or a strip of a single image",
        )
        self.seed = self._spin(QSpinBox(), 0, 2**31 - 1, d.seed)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.threads = self._spin(
            QSpinBox(),
            0,
            256,
            max(1, (os.cpu_count() or 2) - 1),
            tip="CPU threads for training (0: torch default); leave a core to napari",
        )
        self.bf16 = QCheckBox("bfloat16")
        self.bf16.setChecked(d.precision == "bf16")
        self.bf16.setToolTip(
            "train in bfloat16 arithmetic (weights stay float32): faster on CPUs with "
            "AVX-512 BF16 or AMX and on recent GPUs, slower on older CPUs"
        )
        for label, w in (
            ("Steps", self.steps),
            ("Time budget (min)", self.budget),
            ("Learning rate", self.lr),
            ("Batch size", self.batch_size),
            ("Crop size", self.crop_size),
            ("Augmentation", self.augment),
            ("Validation fraction", self.val_fraction),
            ("Seed", self.seed),
            ("Device", self.device),
            ("CPU threads", self.threads),
            ("Precision", self.bf16),
        ):
            form.addRow(label, w)
        return box

    @staticmethod
    def _spin(
        w: Any,
        lo: float,
        hi: float,
        value: float,
        *,
        decimals: int | None = None,
        step: float | None = None,
        tip: str = "",
    ) -> Any:
        if decimals is not None:
            w.setDecimals(decimals)
        w.setRange(lo, hi)
        w.setValue(value)
        if step is not None:
            w.setSingleStep(step)
        w.setToolTip(tip)
        return w

    # ---- reading the form -----------------------------------------------------------------------------
    def settings(self) -> FinetuneSettings:
        """The settings in the form."""
        return FinetuneSettings(
            steps=self.steps.value(),
            time_budget_min=self.budget.value(),
            lr=self.lr.value(),
            batch_size=self.batch_size.value(),
            crop_size=self.crop_size.value(),
            augment=self.augment.isChecked(),
            val_fraction=self.val_fraction.value(),
            seed=self.seed.value(),
            device=self.device.currentText(),
            threads=self.threads.value(),
            precision="bf16" if self.bf16.isChecked() else "fp32",
            annotation="partial" if self.partial.isChecked() else "complete",
        )

    def pairs(self) -> list[TrainingPair]:
        """Snapshots of the selected layers as training pairs (shapes regions are rasterised)."""
        pairs = []
        for image_combo, labels_combo, region_combo, _ in self.pair_rows:
            image, labels, region = image_combo.layer(), labels_combo.layer(), region_combo.layer()
            if image is None or labels is None:
                raise InputError(
                    "choose an image layer and a labels layer for every pair (add them to the "
                    "viewer first; remove unused pairs)"
                )
            lab = _layer_array(labels)
            mask = None
            if region is not None:
                if type(region).__name__ == "Shapes":
                    mask = np.asarray(region.to_labels(labels_shape=lab.shape)) != 0
                else:
                    mask = _layer_array(region) != 0
            names = (image.name, labels.name) + ((region.name,) if region is not None else ())
            pairs.append(TrainingPair(_layer_array(image), lab, mask, f"{image.name} / {labels.name}", names))
        return pairs

    # ---- running --------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a fine-tune is running."""
        return self.worker is not None

    def _run_or_cancel(self) -> None:
        if self.busy:
            self.cancel()
        else:
            self.start()

    def start(self) -> None:
        """Check the inputs (showing any error, running nothing) and start training on a worker."""
        from napari.qt.threading import thread_worker

        self._show_error(None)
        if self._output_auto:
            self.output.setText(str(default_output_path()))
        try:
            settings = self.settings()
            pairs = self.pairs()
            check_pairs(pairs)
            base = self.base.currentText().strip() or "default"
            check_base(base, settings.crop_size)
            resolve_device(settings.device)
            output = Path(self.output.text()).expanduser()
            if output.suffix != ".safetensors":
                raise InputError(f"the output must be a .safetensors file, got {output.name!r}")
        except CtxSegError as exc:
            self._show_error(exc)
            return

        def work():
            req = finetune_request_from_arrays(
                pairs,
                base=base,
                output=output,
                settings=settings,
                provenance={"source": "napari fine-tune widget"},
            )
            return (
                yield from run_finetune(
                    req,
                    time_budget_s=settings.time_budget_min * 60 or None,
                    should_stop=self._stop.is_set,
                    threads=settings.threads,
                )
            )

        self._stop.clear()
        self._output_path, self._t_start = output, time.time()
        self.result = None
        self.curve.clear()
        self.progress.setValue(0)
        self.status.setText("preparing data and model...")
        self._budget_s = settings.time_budget_min * 60
        self.worker = thread_worker(work, start_thread=False, ignore_errors=True)()
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.run_button.setText("Cancel")
        for box in self.form:
            box.setEnabled(False)  # the run uses a snapshot of the form and layers
        self.worker.start()

    def cancel(self) -> None:
        """Stop after the current step; the best weights so far are saved."""
        if self.busy:
            self._stop.set()
            self.run_button.setEnabled(False)
            self.run_button.setText("Cancelling (saving the best weights)...")

    def _on_progress(self, p: TrainProgress) -> None:
        frac = p.step / p.total
        if self._budget_s:
            frac = max(frac, min(1.0, p.elapsed_s / self._budget_s))
        self.progress.setValue(int(1000 * frac))
        val = f" | val {p.val_loss:.4f}" if p.val_loss is not None else ""
        self.status.setText(
            f"step {p.step}/{p.total} | loss {p.loss:.4f}{val} | {p.samples_per_s:.1f} "
            f"samples/s | ETA {_fmt_time(p.eta_s)}"
        )
        self.curve.add(p.step, p.loss, p.val_loss)

    def _on_done(self, result: FinetuneResult) -> None:
        from napari.utils.notifications import show_info

        self.result = result
        if result.path is None:
            self.status.setText("cancelled before the first step finished: nothing was written")
            return
        add_recent_checkpoint(result.path)
        if self.base.findText(str(result.path)) < 0:
            self.base.addItem(str(result.path))
        how = {"done": "finished", "time budget": "time budget reached", "cancelled": "cancelled"}
        msg = (
            f"{how[result.stopped]} after {result.steps_done} steps; saved {result.path} (now offered in "
            f"the Segment widget)"
        )
        self.status.setText(msg)
        self.progress.setValue(1000)
        show_info(f"ctxseg fine-tune {msg}")

    def _on_error(self, exc: BaseException) -> None:
        out = self._output_path
        saved = out.is_file() and out.stat().st_mtime >= self._t_start - 1
        self._show_error(exc, note=f" (the best weights so far were saved to {out})" if saved else "")

    def _on_finished(self) -> None:
        self.worker = None
        for box in self.form:
            box.setEnabled(True)
        self.run_button.setText("Train")
        self.run_button.setEnabled(True)

    def _show_error(self, exc: BaseException | None, note: str = "") -> None:
        if exc is None:
            self.error.setText("")
            return
        text = (str(exc) if isinstance(exc, CtxSegError) else f"{type(exc).__name__}: {exc}") + note
        self.error.setText(text)
        self.status.setText("error (nothing was trained)" if not self.curve.train else "stopped by an error")
        from napari.utils.notifications import show_error

        show_error(f"ctxseg fine-tune: {text}")
