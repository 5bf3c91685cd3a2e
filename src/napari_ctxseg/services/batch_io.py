"""The files of a batch: its inputs, its outputs' names, and the record of what made each output.

Each input ``NAME.ext`` gives ``NAME_labels.tif`` (uint32 labels) and ``NAME_objects.csv`` (per-object
measurements) in the output folder (``NAME`` is the file name without its image suffix, and without
``.ome``). Outputs are written atomically (temporary file, then rename), and the labels TIFF records the
input and the settings that made it (:func:`run_settings`), which :func:`existing_outputs` compares to
decide whether an output is done, to redo, or a file ctxseg did not write.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "LABELS_SUFFIX",
    "OBJECTS_SUFFIX",
    "RECORD_KEY",
    "atomic_write",
    "collect_inputs",
    "existing_outputs",
    "is_labels_file",
    "output_paths",
    "output_stem",
    "read_record",
    "remove_partial_outputs",
    "run_settings",
    "write_csv",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".jpg", ".jpeg")
#: the TIFF metadata key under which a labels file records its input and settings
RECORD_KEY = "ctxseg_segment"
#: what the batch writes, and never reads as an input
LABELS_SUFFIX, OBJECTS_SUFFIX = "_labels.tif", "_objects.csv"


def is_labels_file(path: str | os.PathLike) -> bool:
    """Whether a file is named like labels (``*_labels.tif[f]``): what this batch writes, or annotations."""
    return Path(path).name.lower().endswith(("_labels.tif", "_labels.tiff"))


def collect_inputs(items: Iterable[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files.

    Folders and patterns leave out hidden files and label files (``*_labels.tif``: the batch's own outputs,
    or annotations); a file named explicitly must be an image file that is not a label file.

    Raises
    ------
    InputError
        A pattern that matches no image, an explicit file that is not an image or is a label file, or no
        input at all.
    """
    out: list[Path] = []

    def usable(q: Path) -> bool:
        return q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith(".") and not is_labels_file(q)

    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file() and usable(q))
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(
                    f"{p} is not an image file this command reads (expected {', '.join(IMAGE_SUFFIXES)})"
                )
            if is_labels_file(p):
                raise InputError(
                    f"{p} is named like a labels file (*_labels.tif: segment's output, or annotations) "
                    f"and is never read as an image; rename it to segment it"
                )
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_file() and usable(Path(m)))
            if not matches:
                raise InputError(f"no image found for {item!r} (expected a file, a folder or a glob pattern)")
            out += matches
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    if not unique:
        raise InputError("no input images (label files *_labels.tif and hidden files are not inputs)")
    return unique


def output_stem(image_path: str | os.PathLike) -> str:
    """The ``NAME`` of an input's outputs: its file name without the image suffix (and ``.ome``).

    Examples
    --------
    >>> output_stem("a/s.v1.tif"), output_stem("cells.ome.tiff"), output_stem(".hidden.png")
    ('s.v1', 'cells', '.hidden')
    """
    name = Path(image_path).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
    if stem.lower().endswith(".ome") and len(stem) > 4:
        stem = stem[:-4]
    return stem


def output_paths(image_path: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The labels TIFF and objects CSV written for one input."""
    stem, out_dir = output_stem(image_path), Path(out_dir)
    return out_dir / f"{stem}{LABELS_SUFFIX}", out_dir / f"{stem}{OBJECTS_SUFFIX}"


# ---- what made an output ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready form of an option value (dataclasses as dicts, tuples as lists)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def run_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a batch's outputs, as recorded in each labels TIFF.

    Every :class:`~napari_ctxseg.services.segment.SegmentRequest` field with its default filled in (so an
    option left out and the same option given explicitly agree), the checkpoint by its SHA-256 and the
    context files by theirs; the device is left out (it does not change what is segmented).

    Raises
    ------
    CheckpointError
        A missing checkpoint.
    InputError
        A context file that cannot be read.
    """
    from ..core.io.checkpoint import file_sha256
    from .models import resolve_checkpoint
    from .segment import SegmentRequest

    skip = {"image", "context_image", "context_labels", "context_region", "device", "checkpoint"}
    settings: dict[str, Any] = {}
    for f in fields(SegmentRequest):
        if f.name not in skip:
            default = f.default_factory() if callable(f.default_factory) else f.default
            settings[f.name] = default
    settings.update({"volume_3d": False, "stack_normalize": "plane", "stitch_threshold": 0.25})
    settings.update(
        {k: v for k, v in options.items() if k not in skip and k not in ("context_paths", "context_pack")}
    )
    settings["checkpoint_sha256"] = file_sha256(resolve_checkpoint(options.get("checkpoint", "default")))
    ctx = options.get("context_paths")
    if options.get("context_pack") is not None:
        ctx = (options["context_pack"],)
    settings["context_sha256"] = None
    if ctx is not None:
        try:
            settings["context_sha256"] = [None if c is None else file_sha256(c) for c in ctx]
        except OSError as exc:
            raise InputError(f"cannot read the context file {exc.filename}: {exc.strerror}") from exc
    return _plain(settings)


def read_record(labels_path: Path) -> dict[str, Any] | None:
    """The record of a labels TIFF written by this batch, or None (another file, or not readable)."""
    import tifffile

    try:
        with tifffile.TiffFile(labels_path) as tif:
            meta = tif.shaped_metadata[0] if tif.shaped_metadata else {}
        record = json.loads(meta[RECORD_KEY])
    except Exception:  # not a TIFF, no record, corrupt: not ours
        return None
    return record if isinstance(record, dict) and "settings" in record else None


def _is_objects_table(csv_path: Path) -> bool:
    try:
        with open(csv_path, newline="") as f:
            return next(csv.reader(f), [""])[0] == "label"
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"num_samples 1 -> 4, flow.min_size 15 -> 3"`` (the first few settings that differ)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(new)
    diff = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diff[:3]) + (", ..." if len(diff) > 3 else "")


def existing_outputs(path: Path, out_dir: Path, settings: dict[str, Any]) -> tuple[str, str]:
    """What the outputs of ``path`` in ``out_dir`` are: ``(state, why)``.

    ``state`` is ``new``, ``done``, ``partial``, ``other`` or ``foreign``. ``done``: made by this batch
    from this input with these settings; ``partial``: the labels of such a run without their table (an
    interrupt between the two writes), redone like a new one since nothing else made them; ``other``:
    made by ctxseg from another input or with other settings; ``foreign``: an existing file that ctxseg
    did not write.
    """
    labels_path, csv_path = output_paths(path, out_dir)
    if not labels_path.exists() and not csv_path.exists():
        return "new", ""
    record = read_record(labels_path) if labels_path.is_file() else None
    if labels_path.exists() and record is None:
        return "foreign", str(labels_path)
    if csv_path.exists() and not (csv_path.is_file() and _is_objects_table(csv_path)):
        return "foreign", str(csv_path)
    if record is None:  # a table of ours without its labels: redo both
        return "other", f"{labels_path.name} is missing"
    if record.get("input") != str(path.resolve()):
        return "other", f"{labels_path.name} was made from {record.get('input')}"
    if record.get("settings") != settings:
        return "other", f"{labels_path.name}: {_differences(record.get('settings', {}), settings)}"
    return ("done", "") if csv_path.is_file() else ("partial", f"{csv_path.name} is missing")


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which replaces ``path``.

    The temporary file is removed if anything (an interrupt included) stops the write; the file is made
    readable by all (0644), as a plain ``open`` would.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:  # the temporary file is made inside the try, so an interrupt at any point removes it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_outputs(out_dir: Path) -> None:
    """Remove temporary output files an interrupt left behind (e.g. one inside ``mkstemp`` itself)."""
    for pattern in (".*_labels.tif.*.tmp", ".*_objects.csv.*.tmp"):
        for leftover in out_dir.glob(pattern):
            leftover.unlink(missing_ok=True)


def write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    """Write a table of equal-length columns as CSV, atomically (floats with 6 significant digits)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            for row in zip(*table.values()):
                w.writerow([f"{v:.6g}" if isinstance(v, float | np.floating) else v for v in row])

    atomic_write(path, write)
