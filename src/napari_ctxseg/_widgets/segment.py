"""The Segment dock widget: a checkpoint, sampler settings and an optional context, run on a napari worker.

The widget only reads its controls (:mod:`._segment_form`, :mod:`._segment_context`), snapshots the chosen
layers into a :class:`~._segment_job.SegmentJob`, runs it on a worker (:class:`~._run.RunDock`) and turns
what comes back into new layers; the logic lives in :mod:`._layer_io` and :mod:`._results`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import CtxSegError, InputError
from ._dock import show_features_table
from ._layer_io import crop_to_view, snapshot_layer
from ._results import PlanesProgress, PlanesResult, VolumeResult, provenance, rethreshold_job
from ._segment_context import SegmentContextForm
from ._segment_job import SegmentJob

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentJob", "SegmentWidget"]


class SegmentWidget(SegmentContextForm):
    """Segment an image layer with a ctxseg checkpoint; results arrive as new layers.

    Parameters
    ----------
    viewer
        The napari viewer (injected by napari when the widget is opened from the plugin menu).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(viewer)
        self.apply_button.changed.connect(self._on_apply)
        self.add_context_button.changed.connect(self._on_add_context)

    # ---- run / cancel ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Snapshot the layers and settings and segment on a worker (an input error runs nothing)."""
        self.clear_error()
        try:
            job = self._prepare()
            func, args = job.worker_call()
        except CtxSegError as exc:
            self.show_error(exc)
            return
        self.run_worker(func, args, self._on_segmented)

    def _prepare(self) -> SegmentJob:
        """Read the controls and snapshot the layers into a job.

        Raises
        ------
        CtxSegError
            Missing or inconsistent inputs (shown in the dock; nothing runs).
        """
        layer = self.image.value
        if layer is None:
            raise InputError("choose an image layer to segment")
        snap, fov = self._with_channels(snapshot_layer(layer), layer), None
        if self.fov.value:
            if self._viewer.dims.ndisplay != 2:
                raise InputError("the visible field of view needs the 2D view (the canvas is in 3D)")
            snap, fov = crop_to_view(snap, layer.corner_pixels)
        context = None
        ci, cl, cr = self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value
        if ci is not None or cl is not None or cr is not None:
            if ci is None or cl is None:
                raise InputError("a context needs both a context image and its labels")
            context = self._context(ci, cl, cr, layer)
        self._last_context = context
        if self.adapt.value and context is None:
            raise InputError("'adapt to context' needs a context: choose a context image and its labels")
        return SegmentJob(
            snap, self._run_settings(), context, fov, self.out_flow.value, self.out_disagreement.value
        )

    def on_progress(self, p: PlanesProgress | tuple[int, int]) -> None:
        """Show a segmentation's or a re-threshold's progress."""
        if isinstance(p, PlanesProgress):
            self.progress.value, self.status.value = int(1000 * p.fraction), p.message
        else:
            self.progress.value, self.status.value = int(1000 * p[0] / p[1]), f"re-thresholded {p[0]}/{p[1]}"

    def _on_segmented(self, out: tuple[PlanesResult | VolumeResult, list[Any]]) -> None:
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

    # ---- re-threshold and the interactive loop -----------------------------------------------------------

    def _on_apply(self) -> None:
        self.clear_error()
        if self._last is None:
            self.show_error(
                "re-thresholding works on slice-by-slice runs; the last run was 3D"
                if self._last_was_3d
                else "run a segmentation first: re-thresholding uses the flows of the last run"
            )
            return
        res, layer = self._last
        if layer not in self._viewer.layers:
            self.show_error(f"the labels layer {layer.name!r} of the last run was removed; run again")
            return
        flow = replace(
            res.flow,
            min_size=self.min_size.value,
            min_seed_cnts=self.min_seeds.value,
            max_flow_err=self.max_flow_err.value,
            flow_threshold=self.min_flow.value,
            min_contrast=self.min_contrast.value,
        )
        self.run_worker(rethreshold_job, (res, flow), self._on_rethresholded)

    def _on_rethresholded(self, out: tuple[PlanesResult, Any, dict[str, Any]]) -> None:
        if self._last is None:
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
        self.clear_error()
        labels, image = self.corrected.value, self.image.value
        if labels is None or image is None:
            self.show_error("choose the image and the corrected labels layer first")
            return
        self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value = image, labels, None
        self.status.value = f"context: {labels.name!r} on {image.name!r} (used by the next run)"
