"""The Segment dock's context: layers read into a checked context, and context packs saved and loaded.

A context pack (:mod:`napari_ctxseg.services.context_pack`) keeps a context for later sessions and for
``ctxseg segment --context PACK``; loading one adds its layers and selects them as the context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CtxSegError, InputError
from ._layer_io import (
    ContextData,
    LayerSnapshot,
    channel_axis,
    choose_channels,
    context_from_layers,
    snapshot_layer,
)
from ._results import PlanesResult
from ._segment_form import SegmentForm

__all__ = ["SegmentContextForm"]


class SegmentContextForm(SegmentForm):
    """The Segment form with its context: read from the layers, saved to and loaded from context packs.

    Parameters
    ----------
    viewer
        The napari viewer.
    """

    def __init__(self, viewer: Any) -> None:
        super().__init__(viewer)
        self._last: tuple[PlanesResult, Any] | None = None  # (result, the labels layer it made)
        self._last_was_3d = False
        self._last_context: ContextData | None = None  # the context of the last run (for its self-score)
        self.save_context_button.changed.connect(self._on_save_context)
        self.load_context_button.changed.connect(self._on_load_context)

    def _context(self, ci: Any, cl: Any, cr: Any, layer: Any) -> ContextData:
        """The checked context of these layers (the plane shown in the viewer, the image's channel choice)."""
        return context_from_layers(
            ci, cl, cr, point=tuple(self._viewer.dims.point), image_plane=self._context_plane(ci, layer)
        )

    def _with_channels(self, snap: LayerSnapshot, layer: Any) -> LayerSnapshot:
        """``snap`` (a snapshot of ``layer``) with the chosen channel and nuclear channel, if any."""
        channel, nuclear = self.channel.value, self.nuclear.value
        if channel is None and nuclear is None:
            return snap
        is_layer = nuclear is not None and not isinstance(nuclear, int)
        return choose_channels(
            snap,
            channel,
            np.asarray(nuclear.data) if is_layer else nuclear,
            axis=channel_axis(layer),
            nuclear_name=str(nuclear.name) if is_layer else "",
        )

    def _context_plane(self, ci: Any, layer: Any) -> np.ndarray | None:
        """The context image with the image's channel choice, when it has the image's channels (else None)."""
        if (ci.metadata or {}).get("ctxseg_context_pack"):
            return np.asarray(ci.data)  # a loaded pack: its image has the chosen channels already
        if self.channel.value is None and self.nuclear.value is None:
            return None
        if ci is not layer and (np.shape(ci.data) != np.shape(layer.data) or ci.rgb != layer.rgb):
            return None  # another layer: taken as it is (e.g. a context loaded from a pack)
        snap = self._with_channels(snapshot_layer(ci), ci)
        if snap.leading_shape:
            raise InputError("a context with a channel choice must be one 2D image (no stack axes)")
        return snap.data

    # ---- context packs ---------------------------------------------------------------------------------

    def _ask_path(self, save: bool) -> str:
        """A file dialog for a context pack ('' when cancelled); tests replace it."""
        from qtpy.QtWidgets import QFileDialog

        ask = QFileDialog.getSaveFileName if save else QFileDialog.getOpenFileName
        title = "Save context pack" if save else "Load context pack"
        path, _ = ask(self.native, title, "context.npz" if save else "", "Context packs (*.npz)")
        return str(path)

    def _on_save_context(self) -> None:
        from ..services.context_pack import save_context_pack

        self.clear_error()
        ci, cl, cr = self.ctx_image.value, self.ctx_labels.value, self.ctx_region.value
        try:
            if ci is None or cl is None:
                raise InputError("choose a context image and its labels to save them as a context pack")
            layer = self.image.value
            context = self._context(ci, cl, cr, layer)
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
            self.show_error(exc)
            return
        except OSError as exc:
            self.show_error(f"cannot write {exc.filename or path}: {exc.strerror or exc}")
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

        self.clear_error()
        path = self._ask_path(save=False)
        if not path:
            return
        try:
            pack = load_context_pack(path)
        except CtxSegError as exc:
            self.show_error(exc)
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
