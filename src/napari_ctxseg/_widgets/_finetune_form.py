"""The Fine-tune dock's form: training pairs of layers, the model to start from and to save, the settings.

It reads the layers into :class:`~napari_ctxseg.services.finetune_data.TrainingPair` snapshots and the
controls into :class:`~napari_ctxseg.services.finetune.FinetuneSettings`;
:class:`~.finetune.FinetuneWidget` runs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    PushButton,
    SpinBox,
    Widget,
)
from napari.layers import Image, Labels, Shapes

from ..core.errors import InputError
from ..services.devices import DEVICE_CHOICES
from ..services.finetune import FinetuneSettings, default_output_path
from ..services.finetune_data import TrainingPair
from ..services.recent import recent_checkpoints
from ._dock import tidy
from ._run import RunDock
from ._sections import Section

__all__ = ["FinetuneForm"]

_NONE = "(none: labels complete)"

#: One training pair: the image, labels and region drop-downs, and the row holding them.
PairRow = tuple[ComboBox, ComboBox, ComboBox, Container]


def _layer_array(layer: Any) -> np.ndarray:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.array(data, copy=True)  # a snapshot: painting during training does not race the worker


class FinetuneForm(RunDock):
    """The Fine-tune dock's controls, read into training pairs and settings.

    Parameters
    ----------
    viewer
        The napari viewer.
    """

    def __init__(self, viewer: Any) -> None:
        super().__init__(
            viewer,
            run_text="Train",
            cancel_text="Cancelling (saving the best weights)...",
            notify="ctxseg fine-tune",
            labels=False,
        )
        self.pair_rows: list[PairRow] = []
        self._output_auto = True
        self._setting_output = False
        self._pairs: Container[Widget] = Container(labels=False)
        self._pairs.margins = (0, 0, 0, 0)
        add = PushButton(text="Add pair")
        add.changed.connect(self.add_pair)
        self.partial = CheckBox(
            text="labels are partial",
            tooltip="Without a region, teach only near the painted objects (a few corrected objects)",
        )
        self.add_pair()
        data = Section(
            "Training data",
            [self._pairs, add, self.partial],
            expanded=True,
            tooltip="Image, labels, and the region where the annotation is complete",
        )
        self.form = (data, self._model_section(), self._settings_section())
        self.status.value = "idle"
        self.extend([*self.form, self.run_button, self.progress, self.status, self.error])
        tidy(*(section.body for section in self.form[1:]))

    # ---- training pairs ----------------------------------------------------------------------------------

    def _layer_combo(self, kinds: tuple[type, ...], none: str | None = None) -> ComboBox:
        def choices(_widget: Any) -> list[tuple[str, Any]]:
            layers: list[Any] = [layer for layer in self._viewer.layers if isinstance(layer, kinds)]
            found = [(str(layer.name), layer) for layer in layers]
            return ([(none, None)] if none else []) + found

        return ComboBox(choices=choices)

    def add_pair(self, *_: Any) -> None:
        """Add a row (image, labels, region) to the training data."""
        combos = (
            self._layer_combo((Image,)),
            self._layer_combo((Labels,)),
            self._layer_combo((Labels, Shapes), none=_NONE),
        )
        combos[2].tooltip = (
            "Labels or shapes layer marking where the annotation is complete (non-zero); "
            "elsewhere nothing is taught"
        )
        remove = PushButton(text="x", tooltip="Remove this pair")
        remove.native.setFixedWidth(24)
        row: Container[Widget] = Container(widgets=[*combos, remove], layout="horizontal", labels=False)
        row.margins = (0, 0, 0, 0)
        entry: PairRow = (*combos, row)
        remove.changed.connect(lambda *_: self._remove_pair(entry))
        idx = len(self.pair_rows)
        for combo in combos[:2]:  # the n-th pair starts with the n-th image and labels layer
            if idx < len(combo.choices):
                combo.value = combo.choices[idx]
        self.pair_rows.append(entry)
        self._pairs.append(row)
        tidy(row, chars=8)  # three drop-downs a row: let them shrink

    def _remove_pair(self, entry: PairRow) -> None:
        if len(self.pair_rows) > 1 and entry in self.pair_rows:
            self.pair_rows.remove(entry)
            self._pairs.remove(entry[3])

    def _refresh_layers(self, *_: Any) -> None:
        """Offer the viewer's current layers in every drop-down (keeping the choices made)."""
        for row in self.pair_rows:
            for combo in row[:3]:
                combo.reset_choices()

    # ---- model and settings ------------------------------------------------------------------------------

    def _model_section(self) -> Section:
        self.base = ComboBox(
            label="start from",
            choices=["default", *(str(p) for p in recent_checkpoints())],
            tooltip="The bundled default model, a recent checkpoint, or a path typed here",
        )
        self.base.native.setEditable(True)  # a path may be typed
        self.base_file = FileEdit(
            label="checkpoint file", filter="*.safetensors", tooltip="Start from a .safetensors checkpoint"
        )
        self.base_file.changed.connect(self._on_base_file)
        self.output = LineEdit(label="save to", value=str(default_output_path()))
        self.output.native.textEdited.connect(self._on_output_edited)
        choose = PushButton(text="...", tooltip="Choose where to save the fine-tuned model")
        choose.native.setFixedWidth(28)
        choose.changed.connect(self._choose_output)
        save_to: Container[Widget] = Container(
            widgets=[self.output, choose], layout="horizontal", labels=False, label="save to"
        )
        save_to.margins = (0, 0, 0, 0)
        return Section("Model", [self.base, self.base_file, save_to], expanded=True)

    def _on_base_file(self, path: Path) -> None:
        if path and str(path) not in ("", "."):
            self.base.native.setCurrentText(str(Path(path).expanduser()))

    def _on_output_edited(self, *_: Any) -> None:
        self._output_auto = False

    def _choose_output(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        filt = "Checkpoints (*.safetensors)"
        path = QFileDialog.getSaveFileName(self.native, "Save fine-tuned model", self.output.value, filt)[0]
        if path:
            self.output.value = path
            self._output_auto = False

    def _settings_section(self) -> Section:
        d = FinetuneSettings()
        self.steps = SpinBox(label="steps", value=d.steps, min=1, max=1_000_000)
        self.budget = FloatSpinBox(
            label="time budget (min)",
            value=d.time_budget_min,
            min=0.0,
            max=10_000.0,
            step=1.0,
            tooltip="stop after this many minutes (0: no limit); the best weights are saved",
        )
        self.lr = FloatSpinBox(label="learning rate", min=1e-6, max=1.0, step=1e-4)
        self.lr.native.setDecimals(6)
        self.lr.value = d.lr
        self.batch_size = SpinBox(label="batch size", value=d.batch_size, min=1, max=256)
        self.crop_size = SpinBox(
            label="crop size", value=d.crop_size, min=32, max=1024, step=32, tooltip="a multiple of 32"
        )
        self.augment = CheckBox(text="augment: flips, rescaling, intensity", value=d.augment)
        self.val_fraction = FloatSpinBox(
            label="validation fraction",
            value=d.val_fraction,
            min=0.0,
            max=0.9,
            step=0.05,
            tooltip="held out: whole pairs/frames, or a strip of a single image",
        )
        self.seed = SpinBox(label="seed", value=d.seed, min=0, max=2**31 - 1)
        self.device = ComboBox(label="device", choices=list(DEVICE_CHOICES), value="auto")
        self.threads = SpinBox(
            label="CPU threads",
            value=max(1, (os.cpu_count() or 2) - 1),
            min=0,
            max=256,
            tooltip="CPU threads for training (0: torch default); leave a core to napari",
        )
        self.bf16 = CheckBox(
            text="bfloat16 precision",
            value=d.precision == "bf16",
            tooltip="train in bfloat16 arithmetic (weights stay float32): faster on CPUs with "
            "AVX-512 BF16 or AMX and on recent GPUs, slower on older CPUs",
        )
        controls: list[Widget] = [self.steps, self.budget, self.lr, self.batch_size, self.crop_size]
        controls += [self.augment, self.val_fraction, self.seed, self.device, self.threads, self.bf16]
        return Section("Settings", controls, expanded=True)

    def inputs(self) -> Iterable[Widget]:
        """The form (a run uses a snapshot of the form and the layers)."""
        return self.form

    # ---- reading the form --------------------------------------------------------------------------------

    def settings(self) -> FinetuneSettings:
        """The settings in the form."""
        return FinetuneSettings(
            steps=self.steps.value,
            time_budget_min=self.budget.value,
            lr=self.lr.value,
            batch_size=self.batch_size.value,
            crop_size=self.crop_size.value,
            augment=self.augment.value,
            val_fraction=self.val_fraction.value,
            seed=self.seed.value,
            device=self.device.value,
            threads=self.threads.value,
            precision="bf16" if self.bf16.value else "fp32",
            annotation="partial" if self.partial.value else "complete",
        )

    def base_checkpoint(self) -> str:
        """The checkpoint to start from: ``"default"``, or a path chosen or typed."""
        return self.base.native.currentText().strip() or "default"

    def pairs(self) -> list[TrainingPair]:
        """Snapshots of the selected layers as training pairs (shapes regions are rasterised)."""
        pairs = []
        for image_combo, labels_combo, region_combo, _ in self.pair_rows:
            image, labels, region = image_combo.value, labels_combo.value, region_combo.value
            if image is None or labels is None:
                raise InputError(
                    "choose an image layer and a labels layer for every pair (add them to the "
                    "viewer first; remove unused pairs)"
                )
            lab = _layer_array(labels)
            mask = None
            if region is not None:
                if isinstance(region, Shapes):
                    mask = np.asarray(region.to_labels(labels_shape=lab.shape)) != 0
                else:
                    mask = _layer_array(region) != 0
            names = (image.name, labels.name) + ((region.name,) if region is not None else ())
            pairs.append(TrainingPair(_layer_array(image), lab, mask, f"{image.name} / {labels.name}", names))
        return pairs
