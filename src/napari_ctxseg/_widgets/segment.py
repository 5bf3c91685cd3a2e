"""The Segment dock widget: a checkpoint, sampler settings and an optional context, run on a napari worker.

The widget only reads its controls, snapshots the chosen layers, starts a generator from
:mod:`._results` on a thread and turns what comes back into new layers; the logic lives in
:mod:`._layer_io` and :mod:`._results`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Widget,
)
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

from ..core.errors import CtxSegError, InputError
from ..services.devices import DEVICE_CHOICES
from ..services.models import sampler_warning
from ..services.recent import add_recent_checkpoint, on_recent_changed, recent_checkpoints
from ..services.segment import SOLVERS, FlowParams
from ._dock import show_features_table, tidy
from ._layer_io import (
    RunSettings,
    channel_axis,
    choose_channels,
    context_from_layers,
    crop_to_view,
    diameter_in_pixels,
    snapshot_layer,
    spatial_unit,
)
from ._results import (
    PlanesProgress,
    PlanesResult,
    VolumeResult,
    provenance,
    rethreshold_job,
    segment_job,
    volume_job,
)

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentWidget"]

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


class SegmentWidget(Container):
    """Segment an image layer with a ctxseg checkpoint; results arrive as new layers.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari when the widget is opened from the plugin menu).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._worker: Any = None
        self._closed = False
        self._last: tuple[PlanesResult, Any] | None = None  # (result, the labels layer it made)
        self._last_was_3d = False
        self._last_context: Any = None  # the ContextData of the last run (for its self-score)

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
        self.save_context_button = PushButton(text="Save context...")
        self.save_context_button.tooltip = (
            "Save the context (image, labels, region, and the self-score of the last calibrated run on it) "
            "to one .npz file: for later sessions and `ctxseg segment --context PACK`"
        )
        self.load_context_button = PushButton(text="Load context...")
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
        self.run_button = PushButton(text="Run")
        self.progress = ProgressBar(value=0, min=0, max=1000)
        self.status = Label(value="")
        self.error = Label(value="")
        self.error.native.setStyleSheet("color: #e04040")
        self.error.native.setWordWrap(True)
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
        self._settings = Container(
            widgets=[
                self.image,
                self.channel,
                self.nuclear,
                self.checkpoint,
                self.browse,
                self.diameter,
                self.diameter_unit,
                self.steps,
                self.solver,
                self.sampler_note,
                self.samples,
                self.tta,
                self.seed,
                self.device,
                self.stitch,
                self.normalize,
                self.volume_3d,
                Label(value="<b>Context</b> (optional)"),
                self.ctx_image,
                self.ctx_labels,
                self.ctx_region,
                Container(widgets=[self.save_context_button, self.load_context_button], layout="horizontal"),
                self.calibrate,
                self.adapt,
                self.adapt_seconds,
                self.fov,
                self.out_flow,
                self.out_disagreement,
            ]
        )
        self._rethreshold: Container[Widget] = Container(
            widgets=[
                Label(value="<b>Re-threshold</b> (cached flows, no network)"),
                self.min_flow,
                self.min_size,
                self.min_seeds,
                self.max_flow_err,
                self.min_contrast,
                self.apply_button,
                Label(value="<b>Interactive loop</b>"),
                self.corrected,
                self.add_context_button,
            ]
        )
        self.extend(
            [self._settings, self.run_button, self.progress, self.status, self.error, self._rethreshold]
        )
        self.run_button.changed.connect(self._on_run)
        self.apply_button.changed.connect(self._on_apply)
        self.add_context_button.changed.connect(self._on_add_context)
        self.browse.changed.connect(self._on_browse)
        self.image.changed.connect(self._on_image_changed)
        self.save_context_button.changed.connect(self._on_save_context)
        self.load_context_button.changed.connect(self._on_load_context)
        for control in (self.checkpoint, self.steps, self.solver):
            control.changed.connect(self._update_sampler_note)
        on_recent_changed.connect(self._on_recent)
        self.native.destroyed.connect(self._on_destroyed)
        tidy(self._settings, self._rethreshold)
        self._update_sampler_note()

    # ---- controls ----------------------------------------------------------------------------------------

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
            self._show_error(f"checkpoint not found: {path}")
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

    def _set_busy(self, busy: bool) -> None:
        self._settings.enabled = self._rethreshold.enabled = not busy
        self.run_button.text = "Cancel" if busy else "Run"
        self.run_button.enabled = True

    def _show_error(self, exc: BaseException | str) -> None:
        msg = str(exc) if isinstance(exc, CtxSegError | str) else f"{type(exc).__name__}: {exc}"
        self.error.value = msg
        show_error(f"ctxseg: {msg}")

    def _alive(self) -> bool:
        if self._closed:
            return False
        try:
            self.native.objectName()
        except RuntimeError:  # the Qt widget is gone (viewer closed)
            return False
        return True

    def _on_destroyed(self, *_: Any) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.quit()

    # ---- run / cancel ------------------------------------------------------------------------------------

    def _on_run(self) -> None:
        if self._worker is not None:  # the button is "Cancel"
            self._worker.quit()
            self.run_button.enabled = False
            self.status.value = "cancelling at the next step..."
            return
        self.error.value = ""
        try:
            job = self._prepare()
        except CtxSegError as exc:
            self._show_error(exc)
            return
        snap, settings, context, fov = job[:4]
        if settings.volume_3d:
            if context is not None:
                self._show_error("3D mode runs without a context; clear the context layers or untick 3D")
                return
            self._start(volume_job, (snap, settings, fov), self._on_segmented)
            return
        self._start(segment_job, job, self._on_segmented)

    def _prepare(self) -> tuple[Any, ...]:
        layer = self.image.value
        if layer is None:
            raise InputError("choose an image layer to segment")
        snap, fov = snapshot_layer(layer), None
        nuclear = self.nuclear.value
        if self.channel.value is not None or nuclear is not None:
            is_layer = nuclear is not None and not isinstance(nuclear, int)
            snap = choose_channels(
                snap,
                self.channel.value,
                np.asarray(nuclear.data) if is_layer else nuclear,
                axis=channel_axis(layer),
                nuclear_name=str(nuclear.name) if is_layer else "",
            )
        if self.fov.value:
            if self._viewer.dims.ndisplay != 2:
                raise InputError("the visible field of view needs the 2D view (the canvas is in 3D)")
            snap, fov = crop_to_view(snap, layer.corner_pixels)
        context = None
        ci, cl, cr = self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value
        if ci is not None or cl is not None or cr is not None:
            if ci is None or cl is None:
                raise InputError("a context needs both a context image and its labels")
            context = context_from_layers(
                ci, cl, cr, point=tuple(self._viewer.dims.point), image_plane=self._context_plane(ci, layer)
            )
        self._last_context = context
        if self.adapt.value and context is None:
            raise InputError("'adapt to context' needs a context: choose a context image and its labels")
        return snap, self._run_settings(), context, fov, self.out_flow.value, self.out_disagreement.value

    def _context_plane(self, ci: Any, layer: Any) -> np.ndarray | None:
        """The context image with the image's channel choice, when it has the image's channels (else None)."""
        if (ci.metadata or {}).get("ctxseg_context_pack"):
            return np.asarray(ci.data)  # a loaded pack: its image has the chosen channels already
        if self.channel.value is None and self.nuclear.value is None:
            return None
        if ci is not layer and (np.shape(ci.data) != np.shape(layer.data) or ci.rgb != layer.rgb):
            return None  # another layer: taken as it is (e.g. a context loaded from a pack)
        nuclear = self.nuclear.value
        is_layer = nuclear is not None and not isinstance(nuclear, int)
        snap = choose_channels(
            snapshot_layer(ci),
            self.channel.value,
            np.asarray(nuclear.data) if is_layer else nuclear,
            axis=channel_axis(ci),
            nuclear_name=str(nuclear.name) if is_layer else "",
        )
        if snap.leading_shape:
            raise InputError("a context with a channel choice must be one 2D image (no stack axes)")
        return snap.data

    def _start(self, func: Any, args: tuple[Any, ...], on_done: Any) -> None:
        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.progress.value = 0
        self._set_busy(True)
        worker.start()

    def _on_progress(self, p: PlanesProgress | tuple[int, int]) -> None:
        if not self._alive():
            return
        if isinstance(p, PlanesProgress):
            self.progress.value, self.status.value = int(1000 * p.fraction), p.message
        else:
            self.progress.value, self.status.value = int(1000 * p[0] / p[1]), f"re-thresholded {p[0]}/{p[1]}"

    def _on_error(self, exc: BaseException) -> None:
        if self._alive():
            self.status.value = "failed"
            self._show_error(exc)

    def _on_aborted(self) -> None:
        if self._alive():
            self.status.value = "cancelled; no layer was added"
            self.progress.value = 0

    def _on_finished(self) -> None:
        self._worker = None
        if self._alive():
            self._set_busy(False)

    def _on_segmented(self, out: tuple[PlanesResult | VolumeResult, list[Any]]) -> None:
        if not self._alive():
            return
        res, layer_data = out
        labels: Any = None  # the last layer added: the labels (layer_data is never empty)
        for data, kwargs, kind in layer_data[1:] + layer_data[:1]:  # labels last: it ends up selected
            labels = getattr(self._viewer, f"add_{kind}")(data, **kwargs)
        self.corrected.reset_choices()
        self.corrected.value = labels
        self._last_was_3d = isinstance(res, VolumeResult)
        if isinstance(res, VolumeResult):
            self._last = None  # no per-plane flows to re-threshold
            meta = res.metadata
            self.status.value = (
                f"{len(labels.features)} objects in 3D ({meta['planes']} planes) on {meta['device']} "
                f"with {meta['checkpoint']}"
            )
            self.progress.value = self.progress.max
            self._viewer.layers.selection.active = labels
            show_features_table(self._viewer)
            return
        self._last = (res, labels)
        self.progress.value = self.progress.max  # done: the bar reads 100 % beside the result
        meta = res.results[0].metadata
        size = ""
        if meta.get("measured_diameter"):  # diameter "auto": say what was measured and done
            scale = meta["scale"]
            size = f"; objects ~{meta['measured_diameter']:.0f} px"
            if scale != 1.0:
                size += f", upscaled {scale:.1f}x" if scale > 1.0 else f", downscaled {1 / scale:.1f}x"
        adapted = ""
        if meta.get("calibration"):  # the chosen settings become the re-threshold controls' values
            cal = meta["calibration"]
            self.min_flow.value, self.min_size.value = cal["flow_threshold"], cal["min_size"]
            adapted = f"; context self-score AP@0.5 {cal['self_score_ap50']:.2f}"
        if meta.get("adapted"):  # the adapted copy is listed under 'model' for later runs
            info = meta["adapted"]
            adapted += f" (adapted for {info['seconds']:g} s; saved as {Path(info['path']).name})"
        self.status.value = (
            f"{len(labels.features)} objects in {len(res.results)} plane(s) on "
            f"{meta['device']} with {meta['checkpoint']}{size}{adapted}"
        )
        self._viewer.layers.selection.active = labels
        show_features_table(self._viewer)

    # ---- context packs -----------------------------------------------------------------------------------

    def _ask_path(self, save: bool) -> str:
        """A file dialog for a context pack ('' when cancelled); tests replace it."""
        from qtpy.QtWidgets import QFileDialog

        ask = QFileDialog.getSaveFileName if save else QFileDialog.getOpenFileName
        title = "Save context pack" if save else "Load context pack"
        path, _ = ask(self.native, title, "context.npz" if save else "", "Context packs (*.npz)")
        return str(path)

    def _on_save_context(self) -> None:
        from ..services.context_pack import save_context_pack

        self.error.value = ""
        ci, cl, cr = self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value
        try:
            if ci is None or cl is None:
                raise InputError("choose a context image and its labels to save them as a context pack")
            layer = self.image.value
            context = context_from_layers(
                ci, cl, cr, point=tuple(self._viewer.dims.point), image_plane=self._context_plane(ci, layer)
            )
            path = self._ask_path(save=True)
            if not path:
                return
            if not path.lower().endswith(".npz"):
                path += ".npz"
            score = self._self_score(context)
            info = {
                "image_layer": str(ci.name),
                "labels_layer": str(cl.name),
                "channels": self._channel_info(),
            }
            save_context_pack(
                path, context.image, context.labels, context.region, self_score=score, info=info
            )
        except CtxSegError as exc:
            self._show_error(exc)
            return
        except OSError as exc:
            self._show_error(f"cannot write {exc.filename or path}: {exc.strerror or exc}")
            return
        with_score = "" if score is None else f" (self-score AP@0.5 {score:.2f})"
        self.status.value = f"context saved to {Path(path).name}{with_score}"

    def _channel_info(self) -> dict[str, Any] | None:
        nuclear = self.nuclear.value
        if self.channel.value is None and nuclear is None:
            return None
        return {
            "channel": self.channel.value,
            "nuclear": nuclear if nuclear is None or isinstance(nuclear, int) else f"layer {nuclear.name}",
        }

    def _self_score(self, context: Any) -> float | None:
        """The calibration self-score of the last run, when it ran with this very context."""
        last = self._last_context
        if self._last is None or last is None:
            return None
        cal = self._last[0].results[0].metadata.get("calibration")
        same = (
            np.array_equal(last.image, context.image)
            and np.array_equal(last.labels, context.labels)
            and (last.region is None) == (context.region is None)
            and (last.region is None or np.array_equal(last.region, context.region))
        )
        return float(cal["self_score_ap50"]) if cal and same else None

    def _on_load_context(self) -> None:
        from ..services.context_pack import load_context_pack

        self.error.value = ""
        path = self._ask_path(save=False)
        if not path:
            return
        try:
            pack = load_context_pack(path)
        except CtxSegError as exc:
            self._show_error(exc)
            return
        stem = Path(path).stem
        rgb = pack.image.ndim == 3 and pack.image.shape[-1] in (3, 4)
        image = self._viewer.add_image(
            pack.image,
            name=f"{stem} context image",
            rgb=rgb,
            metadata={"ctxseg_context_pack": str(path), "info": pack.info},
        )
        labels = self._viewer.add_labels(pack.labels, name=f"{stem} context labels")
        region = None
        if pack.region is not None:
            region = self._viewer.add_labels(pack.region.astype(np.uint8), name=f"{stem} context region")
        for combo in (self.ctx_image, self.ctx_labels, self.ctx_region):
            combo.reset_choices()
        self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value = image, labels, region
        score = "" if pack.self_score is None else f" (saved self-score AP@0.5 {pack.self_score:.2f})"
        self.status.value = f"context loaded from {Path(path).name}{score}; used by the next run"

    # ---- re-threshold and the interactive loop -----------------------------------------------------------

    def _on_apply(self) -> None:
        self.error.value = ""
        if self._last is None:
            self._show_error(
                "re-thresholding works on slice-by-slice runs; the last run was 3D"
                if self._last_was_3d
                else "run a segmentation first: re-thresholding uses the flows of the last run"
            )
            return
        res, layer = self._last
        if layer not in self._viewer.layers:
            self._show_error(f"the labels layer {layer.name!r} of the last run was removed; run again")
            return
        flow = replace(
            res.flow,
            min_size=self.min_size.value,
            min_seed_cnts=self.min_seeds.value,
            max_flow_err=self.max_flow_err.value,
            flow_threshold=self.min_flow.value,
            min_contrast=self.min_contrast.value,
        )
        self._start(rethreshold_job, (res, flow), self._on_rethresholded)

    def _on_rethresholded(self, out: tuple[PlanesResult, Any, dict[str, Any]]) -> None:
        if not self._alive() or self._last is None:
            return
        res, labels, features = out
        layer = self._last[1]
        layer.data = labels
        layer.features = features
        layer.metadata = {**layer.metadata, "ctxseg": provenance(res)}
        self._last = (res, layer)
        self.progress.value = self.progress.max
        self.status.value = f"re-thresholded: {len(features['index'])} objects"

    def _on_add_context(self) -> None:
        self.error.value = ""
        labels, image = self.corrected.value, self.image.value
        if labels is None or image is None:
            self._show_error("choose the image and the corrected labels layer first")
            return
        self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value = image, labels, None
        self.status.value = f"context: {labels.name!r} on {image.name!r} (used by the next run)"
