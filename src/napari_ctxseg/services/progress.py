"""Driving work generators: the services' long jobs yield progress and return their result."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["run_to_end"]

R = TypeVar("R")


def run_to_end(gen: Generator[Any, None, R], on_progress: Callable[[Any], None] | None = None) -> R:
    """Run a work generator to its end and return its return value (``StopIteration.value``).

    Parameters
    ----------
    gen
        E.g. :func:`~napari_ctxseg.services.segment.segment_steps` or
        :func:`~napari_ctxseg.services.training.run_training`.
    on_progress
        Called with every progress item the generator yields.
    """
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(item)
