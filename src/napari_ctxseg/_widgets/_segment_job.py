"""What one press of the Segment dock's Run hands to the worker: a snapshot of the layers and the settings."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ..core.errors import InputError
from ._layer_io import ContextData, LayerSnapshot, RunSettings
from ._results import segment_job, volume_job

__all__ = ["SegmentJob"]


@dataclass(frozen=True)
class SegmentJob:
    """A Segment run, read from the dock when Run is pressed; the worker sees nothing else.

    Parameters
    ----------
    snapshot
        A copy of the image layer (channels chosen, cropped to the field of view where asked).
    settings
        What the controls say.
    context
        The checked context, or ``None``.
    field_of_view
        ``(y0, x0, y1, x1)`` of the crop to the visible field of view, or ``None`` (the whole image).
    flow_image, disagreement_image
        Whether to add the flow and the sample-disagreement image layers.
    """

    snapshot: LayerSnapshot
    settings: RunSettings
    context: ContextData | None = None
    field_of_view: tuple[int, ...] | None = None
    flow_image: bool = False
    disagreement_image: bool = False

    def worker_call(self) -> tuple[Callable[..., Generator[Any, None, Any]], tuple[Any, ...]]:
        """The worker function and its arguments: a 3D run, or a slice-by-slice one.

        Raises
        ------
        InputError
            A 3D run with a context (3D runs take none).
        """
        if self.settings.volume_3d:
            if self.context is not None:
                raise InputError("3D mode runs without a context; clear the context layers or untick 3D")
            return volume_job, (self.snapshot, self.settings, self.field_of_view)
        args = (
            self.snapshot,
            self.settings,
            self.context,
            self.field_of_view,
            self.flow_image,
            self.disagreement_image,
        )
        return segment_job, args
