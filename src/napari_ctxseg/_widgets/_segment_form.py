"""The Segment dock's form: its controls, their compact layout, and what they say as :class:`RunSettings`.

Always visible: the image, the model, the object diameter, the context and Run. Channels, sampler,
adaptation, stack, output-layer and re-threshold settings fold away in :class:`~._sections.Section` s.
:class:`~.segment.SegmentWidget` adds what happens when Run is pressed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
    Widget,
)
from napari.layers import Image, Labels, Shapes

from ..services.devices import DEVICE_CHOICES
from ..services.models import sampler_warning
from ..services.recent import add_recent_checkpoint, on_recent_changed, recent_checkpoints
from ..services.segment import SOLVERS, FlowParams
from ._dock import tidy
from ._layer_io import RunSettings, channel_axis, diameter_in_pixels, spatial_unit
from ._run import RunDock
from ._sections import Section

__all__ = ["SegmentForm"]

STACK_TIP = (
    "Image to segment: 2D grey, RGB, or a stack / time series (more than two non-RGB axes), which "
    "is segmented slice by slice over its leading axes (progress per slice; overlapping objects "
    "of consecutive slices are stitched into one label, see 'stitch IoU'). The layer is copied "
    "when the run starts, so switching layers mid-run is safe."
)


def _layers(viewer: Any, kind: type | tuple[type, ...]) -> Any:
    """A magicgui choices callback listing the viewer's layers of ``kind`` by name."""

    def choices(_widget: Any) -> list[tuple[str, Any]]:
        layers: list[Any] = [layer for layer in viewer.layers if isinstance(layer, kind)]
        return [(layer.name, layer) for layer in layers]

    return choices


class SegmentForm(RunDock):
    """The Segment dock's controls in a compact layout, read into :class:`RunSettings`.

    Parameters
    ----------
    viewer
        The napari viewer.
    """

    def __init__(self, viewer: Any) -> None:
        super().__init__(viewer, labels=False)

        def combo(label: str, kind: Any, nullable: bool = False, tip: str = "") -> ComboBox:
            return ComboBox(label=label, choices=_layers(viewer, kind), nullable=nullable, tooltip=tip)

        self.image = combo("image", Image, tip=STACK_TIP)
        self.channel = ComboBox(
            label="channel",
            choices=self._channel_choices,
            tooltip="The channel to segment (cytoplasm, membrane or nuclei), along the first axis of a "
            "(C, H, W) layer or the colours of an RGB layer; 'all' reads the layer as grey or RGB. One "
            "channel is given to the model as grey (repeated 3 times, as it was trained)",
        )
        self.nuclear = ComboBox(
            label="nuclear channel",
            choices=self._nuclear_choices,
            tooltip="Optional: a nuclear channel of the same layer or another image layer; the model then "
            "sees (channel, nuclear, 0), a red/green picture. The bundled model was trained on grey and "
            "RGB images: try it, compare with 'none'",
        )
        self.checkpoint = ComboBox(
            label="model",
            choices=self._checkpoints,
            tooltip="The bundled default model or a recently used checkpoint",
        )
        self.browse = FileEdit(
            label="checkpoint file",
            filter="*.safetensors",
            tooltip="A .safetensors checkpoint (Flax pickles: `ctxseg convert` first)",
        )
        self.diameter = FloatSpinBox(
            label="diameter",
            value=0.0,
            min=0.0,
            max=1000.0,
            step=1.0,
            tooltip="Typical object diameter, in the unit chosen below; 0 = auto (measured from "
            "the context labels, or from a quick first pass); 20 px = the model's training scale",
        )
        self.diameter_unit = ComboBox(
            label="diameter unit",
            choices=self._diameter_units,
            tooltip="Pixels, or the image layer's own unit where its scale has one (e.g. micrometer): "
            "the diameter is then converted with the layer's pixel size",
        )
        self.steps = SpinBox(
            label="sampler steps",
            value=1,
            min=1,
            max=200,
            tooltip="Denoising steps; 1 = one-step prediction (the bundled model's best). "
            "A checkpoint may declare the steps and solvers it was validated with; "
            "settings outside them are flagged below",
        )
        self.solver = ComboBox(label="solver", choices=list(SOLVERS), value="edf")
        self.sampler_note = Label(value="")
        self.sampler_note.native.setStyleSheet("color: #e0a040")
        self.sampler_note.native.setWordWrap(True)
        self.samples = SpinBox(
            label="samples",
            value=1,
            min=1,
            max=64,
            tooltip="Diffusion samples; their disagreement is measured per object",
        )
        self.tta = CheckBox(
            label="average flips (TTA)",
            value=RunSettings.tta,
            tooltip="Test-time augmentation: average the flows predicted for the image and its 3 flips "
            "(4x the network calls)",
        )
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.device = ComboBox(label="device", choices=list(DEVICE_CHOICES), value="auto")
        self.stitch = FloatSpinBox(
            label="stitch IoU",
            value=RunSettings.stitch_threshold,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="Stacks: objects of consecutive slices that overlap "
            "at least this much (IoU) share one label and one row of measurements; "
            "0 = every slice's objects get their own labels",
        )
        self.normalize = ComboBox(
            label="stack contrast",
            choices=[("per slice", "plane"), ("whole stack", "stack")],
            value=RunSettings.normalize,
            tooltip="Stacks: stretch each slice's own intensity range (per slice: time series whose "
            "brightness drifts) or the whole stack's (z-stacks: out-of-focus slices stay dim). Blank "
            "slices are segmented as empty either way",
        )
        self.volume_3d = CheckBox(
            label="3D (volume)",
            value=RunSettings.volume_3d,
            tooltip="Grey (Z, Y, X) stacks: predict flows on every z-, y- and x-slice and follow them in 3D "
            "(Z + Y + X model calls; assumes isotropic voxels). Without a context; re-thresholding and "
            "the flow images are for slice-by-slice runs",
        )
        self.ctx_image = combo("context image", Image, True, "An annotated example (may be the image itself)")
        self.ctx_labels = combo("context labels", Labels, True, "The labels of the context image")
        self.ctx_region = combo(
            "complete in",
            (Shapes, Labels),
            True,
            "Where the context annotation is complete (shapes or non-zero labels)",
        )
        self.save_context_button = PushButton(text="Save...")
        self.save_context_button.tooltip = (
            "Save the context (image, labels, region, and the self-score of the last calibrated run on it) "
            "to one .npz file: for later sessions and `ctxseg segment --context PACK`"
        )
        self.load_context_button = PushButton(text="Load...")
        self.load_context_button.tooltip = (
            "Add the layers of a saved context pack and use them as the context"
        )
        self.adapt = CheckBox(
            label="adapt to context",
            value=False,
            tooltip="With a context: first fine-tune a copy of the model on the context for the time "
            "below, then segment with it. The copy is saved and listed under 'model' for later runs",
        )
        self.adapt_seconds = SpinBox(
            label="adapt for (s)",
            value=90,
            min=5,
            max=3600,
            step=15,
            tooltip="Training time of the adaptation (about 90 s on 2 CPU cores; setup comes on top)",
        )
        self.calibrate = CheckBox(
            label="calibrate on context",
            value=True,
            tooltip="With a context: segment the context image itself at three object sizes and a few "
            "flow settings, keep those that match its labels best, and report that context self-score "
            "(AP@0.5) so you know before a batch whether the settings fit",
        )
        self.fov = CheckBox(label="visible field of view only", value=False)
        self.out_flow = CheckBox(label="flow image", value=False)
        self.out_disagreement = CheckBox(label="sample disagreement image", value=False)
        self.min_flow = FloatSpinBox(
            label="min flow",
            value=FlowParams.flow_threshold,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="Shorter predicted flows are background",
        )
        self.min_size = SpinBox(label="min size (px)", value=FlowParams.min_size, min=0, max=10**5)
        self.min_seeds = SpinBox(label="min seed counts", value=FlowParams.min_seed_cnts, min=0, max=10**5)
        self.max_flow_err = FloatSpinBox(
            label="max flow error",
            value=FlowParams.max_flow_err,
            min=0.0,
            max=10.0,
            step=0.05,
            tooltip="Drop objects whose flow disagrees with their shape; 0: off",
        )
        self.min_contrast = FloatSpinBox(
            label="min contrast",
            value=FlowParams.min_contrast,
            min=0.0,
            max=100.0,
            step=0.5,
            tooltip="Drop objects fainter than this many noise levels against their surroundings "
            "(objects found in empty, noisy fields are ~1); 0: off. Keep off for faint, low-SNR cells",
        )
        self.apply_button = PushButton(text="Apply to last result")
        self.corrected = combo("corrected labels", Labels)
        self.add_context_button = PushButton(text="Add labels to context")
        self._arrange()
        self.browse.changed.connect(self._on_browse)
        self.image.changed.connect(self._on_image_changed)
        for control in (self.checkpoint, self.steps, self.solver):
            control.changed.connect(self._update_sampler_note)
        on_recent_changed.connect(self._on_recent)
        self._update_sampler_note()

    def _arrange(self) -> None:
        """Put the controls in place: the usual ones in view, the rest in folded sections."""
        main: Container[Widget] = Container(
            widgets=[
                self.image,
                self.checkpoint,
                self.browse,
                self.diameter,
                self.diameter_unit,
                self.sampler_note,
            ]
        )
        pack = Container(
            widgets=[self.save_context_button, self.load_context_button],
            layout="horizontal",
            labels=False,
            label="context pack",
        )
        pack.margins = (0, 0, 0, 0)
        self.sections = {
            "channels": Section("Channels", [self.channel, self.nuclear]),
            "sampler": Section(
                "Sampler", [self.steps, self.solver, self.samples, self.tta, self.seed, self.device]
            ),
            "context": Section(
                "Context (optional)", [self.ctx_image, self.ctx_labels, self.ctx_region], expanded=True
            ),
            "adapt": Section(
                "Calibrate, adapt, save", [self.calibrate, self.adapt, self.adapt_seconds, pack]
            ),
            "stack": Section("Stacks", [self.stitch, self.normalize, self.volume_3d]),
            "output": Section("Output layers", [self.fov, self.out_flow, self.out_disagreement]),
            "rethreshold": Section(
                "Re-threshold (no network)",
                [
                    self.min_flow,
                    self.min_size,
                    self.min_seeds,
                    self.max_flow_err,
                    self.min_contrast,
                    self.apply_button,
                ],
            ),
            "loop": Section("Interactive loop", [self.corrected, self.add_context_button]),
        }
        s = self.sections
        self._settings: Container[Widget] = Container(
            widgets=[main, *(s[k] for k in ("channels", "sampler", "context", "adapt", "stack", "output"))],
            labels=False,
        )
        self._rethreshold: Container[Widget] = Container(widgets=[s["rethreshold"], s["loop"]], labels=False)
        for box in (self._settings, self._rethreshold):
            box.margins = (0, 0, 0, 0)
        self.extend(
            [self._settings, self.run_button, self.progress, self.status, self.error, self._rethreshold]
        )
        tidy(main, *(section.body for section in s.values()), chars=11)

    def inputs(self) -> Iterable[Widget]:
        """The settings and the re-threshold controls (disabled while a run goes on)."""
        return (self._settings, self._rethreshold)

    # ---- choices and derived values ------------------------------------------------------------------------

    def _checkpoints(self, _widget: Any = None) -> list[tuple[str, str]]:
        return [("default (bundled)", "default")] + [(p.name, str(p)) for p in recent_checkpoints()]

    def _channel_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        layer: Any = self.image.value if hasattr(self, "image") else None
        choices: list[tuple[str, Any]] = [("all (grey / RGB)", None)]
        axis = None if layer is None else channel_axis(layer)
        if axis is not None:
            n = np.shape(layer.data)[axis]
            names = "RGBA" if layer.rgb else None
            choices += [(names[c] if names else f"{c} (axis {axis})", c) for c in range(n)]
        return choices

    def _nuclear_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        layer = self.image.value if hasattr(self, "image") else None
        own = [(name, c) for name, c in self._channel_choices()[1:]]
        others = [
            (f"layer {other.name}", other)
            for other in self._viewer.layers
            if isinstance(other, Image) and other is not layer and not other.rgb
        ]
        return [("none", None), *own, *others]

    def _on_image_changed(self, _layer: Any = None) -> None:
        self.channel.reset_choices()
        self.nuclear.reset_choices()
        self.diameter_unit.reset_choices()

    def _diameter_units(self, _widget: Any = None) -> list[str]:
        found = spatial_unit(self.image.value) if self.image.value is not None else None
        return ["px"] if found is None else [found[0], "px"]

    def _diameter_px(self) -> float:
        layer = self.image.value
        if layer is None:
            return float(self.diameter.value)
        return diameter_in_pixels(self.diameter.value, self.diameter_unit.value, layer)

    def _on_recent(self, _paths: list[Path]) -> None:
        if not self._closed:
            self.checkpoint.reset_choices()

    def _on_browse(self, path: Path) -> None:
        if not path or str(path) in ("", "."):
            return
        if not Path(path).is_file():
            self.show_error(f"checkpoint not found: {path}")
            return
        add_recent_checkpoint(path)  # emits on_recent_changed -> the choices now list it
        self.checkpoint.reset_choices()
        self.checkpoint.value = str(Path(path).expanduser().resolve())

    def _update_sampler_note(self, _value: Any = None) -> None:
        """Flag sampler settings outside those the chosen checkpoint was validated with."""
        advice = sampler_warning(self.checkpoint.value, self.steps.value, self.solver.value)
        self.sampler_note.value = advice or ""
        self.sampler_note.visible = bool(advice)

    def _run_settings(self) -> RunSettings:
        flow = replace(
            FlowParams(),
            min_size=self.min_size.value,
            min_seed_cnts=self.min_seeds.value,
            max_flow_err=self.max_flow_err.value,
            flow_threshold=self.min_flow.value,
            min_contrast=self.min_contrast.value,
        )
        return RunSettings(
            checkpoint=self.checkpoint.value,
            device=self.device.value,
            steps=self.steps.value,
            solver=self.solver.value,
            num_samples=self.samples.value,
            tta=self.tta.value,
            seed=self.seed.value,
            diameter=self._diameter_px(),
            flow=flow,
            stitch_threshold=self.stitch.value,
            normalize=self.normalize.value,
            volume_3d=self.volume_3d.value,
            adapt_seconds=float(self.adapt_seconds.value) if self.adapt.value else 0.0,
            calibrate=self.calibrate.value,
        )
