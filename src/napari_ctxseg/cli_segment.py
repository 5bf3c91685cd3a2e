"""``ctxseg segment``, ``convert`` and ``eval`` subcommands (registered by :mod:`napari_ctxseg.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_segment_parsers(sub: argparse._SubParsersAction, register: Callable) -> None:
    """Add the inference-side subcommands to the ``ctxseg`` parser."""
