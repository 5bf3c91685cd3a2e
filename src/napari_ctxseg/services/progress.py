"""Driving work generators: the services' long jobs yield progress and return their result."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["relay", "run_to_end"]

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


def relay(gen: Generator[Any, None, R], convert: Callable[[Any], Any]) -> Generator[Any, None, R]:
    """Yield ``convert(item)`` for every item of ``gen``, then return its return value.

    For a job that runs another job as one of its parts: ``result = yield from relay(inner, restate)``.
    Closing the outer generator closes ``gen`` too.
    """
    try:
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            yield convert(item)
    finally:
        gen.close()
