"""Checks on where a run will write, made before the run starts (so no work is lost to a bad output).

A user's file is never replaced by something else: a checkpoint only replaces a checkpoint, a report only a
report, and every destination must be writable before the computing starts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..core.errors import InputError

__all__ = ["check_checkpoint_output", "check_file_output", "check_writable_folder"]


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it.

    Raises
    ------
    InputError
        When ``folder`` is an existing file, cannot be created, or is read-only or full.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the {what} {folder} is an existing file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ctxseg-write-test.", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write in the {what} {folder}: {exc.strerror or exc}") from exc
    return folder


def check_file_output(path: str | os.PathLike, what: str, *, replaceable: str | None = None) -> Path:
    """Check that ``path`` can be written: not a folder, its folder writable.

    ``replaceable`` describes the only kind of existing file the caller may replace; the caller checks
    that kind itself (this only refuses folders and unwritable places).

    Raises
    ------
    InputError
        A folder at ``path``, or a folder that cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        kind = f" ({replaceable})" if replaceable else ""
        raise InputError(f"the {what} {path} is a folder; expected a file path{kind}")
    check_writable_folder(path.parent if str(path.parent) else Path("."), f"folder of the {what}")
    return path


def check_checkpoint_output(path: str | os.PathLike) -> Path:
    """Check, before training, that ``path`` may receive a checkpoint.

    Raises
    ------
    InputError
        A folder, an existing file that is not a napari-ctxseg checkpoint (an image, a label file, any
        other file: it is never replaced), or a folder that cannot be written.
    """
    from ..core.errors import CheckpointError
    from ..core.io.checkpoint import read_info

    path = check_file_output(path, "output checkpoint", replaceable="a .safetensors checkpoint")
    if path.exists():
        try:
            read_info(path)
        except CheckpointError:
            raise InputError(
                f"{path} exists and is not a napari-ctxseg checkpoint; it is never replaced (choose another "
                f"output path, e.g. model.safetensors)"
            ) from None
    return path
