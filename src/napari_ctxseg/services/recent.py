"""Checkpoints made in this session (fine-tuned models), so other widgets can offer them at once.

A tiny in-process registry: the fine-tune widget calls :func:`add_recent_checkpoint` after it wrote a
model; the Segment widget lists :func:`recent_checkpoints` and connects to :data:`on_recent_changed` to
refresh its model choice. Nothing is persisted; files that disappeared are dropped when listed.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> from napari_ctxseg.services.recent import add_recent_checkpoint, on_recent_changed, recent_checkpoints
>>> def show(paths):
...     print([p.name for p in paths])
>>> _ = on_recent_changed.connect(show)
>>> tmp = tempfile.TemporaryDirectory()
>>> model = Path(tmp.name, "finetuned.safetensors"); model.touch()  # as written by a fine-tune
>>> _ = add_recent_checkpoint(model)
['finetuned.safetensors']
>>> model in recent_checkpoints()
True
>>> on_recent_changed.disconnect(show)
>>> tmp.cleanup()
>>> model in recent_checkpoints()  # a file that disappeared is dropped
False
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from psygnal import Signal, SignalInstance

__all__ = ["add_recent_checkpoint", "clear_recent_checkpoints", "on_recent_changed", "recent_checkpoints"]

_MAX = 20


class _Recent:
    """Holder of the list and its signal (psygnal signals live on classes)."""

    changed = Signal(list)

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.lock = threading.Lock()


_RECENT = _Recent()

#: Emitted with the new ``list[Path]`` (newest first) after every change. ``connect(callback)`` it;
#: bound methods of Qt widgets are held weakly, so a closed widget is not called. Emitted in the thread
#: that changed the list (the fine-tune widget does so in the GUI thread).
on_recent_changed: SignalInstance = _RECENT.changed


def recent_checkpoints() -> list[Path]:
    """Checkpoints added in this session that still exist, newest first."""
    with _RECENT.lock:
        _RECENT.paths = [p for p in _RECENT.paths if p.is_file()]
        return list(_RECENT.paths)


def add_recent_checkpoint(path: str | os.PathLike) -> list[Path]:
    """Put ``path`` first in the list (moving it if already there) and emit :data:`on_recent_changed`.

    Parameters
    ----------
    path
        An existing checkpoint file.

    Returns
    -------
    list of Path
        The list after the change (newest first, at most 20).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    with _RECENT.lock:
        _RECENT.paths = [p] + [q for q in _RECENT.paths if q != p and q.is_file()]
        del _RECENT.paths[_MAX:]
        paths = list(_RECENT.paths)
    on_recent_changed.emit(paths)
    return paths


def clear_recent_checkpoints() -> None:
    """Forget every recent checkpoint (tests, or a user's "clear" action); emits the empty list."""
    with _RECENT.lock:
        _RECENT.paths = []
    on_recent_changed.emit([])
