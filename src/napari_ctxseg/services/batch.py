"""Batch segmentation of many files, locally or on a dask.distributed cluster.

Each input ``NAME.ext`` gives ``NAME_labels.tif`` (uint32 labels) and ``NAME_objects.csv`` (per-object
measurements) in the output folder (``NAME`` is the file name without its image suffix, and without
``.ome``). Outputs are written atomically (temporary file, then rename), and the labels TIFF records the
input and the settings that made it, so that an interrupted batch resumes where it stopped: an output made
from the same input with the same settings counts as done, one made otherwise is redone with
``overwrite`` only.

Before any work :func:`segment_files` checks the whole batch: the output folder is writable, no two inputs
write the same outputs, no existing file that ctxseg did not write would be replaced (never, whatever
``overwrite``, when the output folder holds inputs: those files may be annotations), the checkpoint and
the context can be read. Then a file that cannot be segmented is reported (a ``failed`` record with the
reason) and the batch goes on. On a cluster each worker loads the model once (the model cache of
:func:`load_model` lives in the worker process) and images are distributed one task per file.
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

from ..core.errors import CheckpointError, ConfigError, CtxSegError, InputError
from ..core.preprocess.channels import select_channels
from .measure import measure_objects, measure_stack, measure_volume
from .progress import run_to_end

__all__ = [
    "IMAGE_SUFFIXES",
    "SCHEDULER_TIMEOUT_S",
    "collect_inputs",
    "is_labels_file",
    "output_paths",
    "output_stem",
    "run_settings",
    "segment_file",
    "segment_files",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".jpg", ".jpeg")
#: seconds to wait for a dask scheduler given by address
SCHEDULER_TIMEOUT_S = 30.0
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


def _read_record(labels_path: Path) -> dict[str, Any] | None:
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


def _existing(path: Path, out_dir: Path, settings: dict[str, Any]) -> tuple[str, str]:
    """What the outputs of ``path`` in ``out_dir`` are: ``("new" | "done" | "other" | "foreign", why)``.

    ``done``: made by this batch from this input with these settings; ``other``: made by ctxseg from
    another input or with other settings; ``foreign``: an existing file that ctxseg did not write.
    """
    labels_path, csv_path = output_paths(path, out_dir)
    if not labels_path.exists() and not csv_path.exists():
        return "new", ""
    record = _read_record(labels_path) if labels_path.is_file() else None
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
    return ("done", "") if csv_path.is_file() else ("other", f"{csv_path.name} is missing")


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
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


def _remove_partial_outputs(out_dir: Path) -> None:
    """Remove temporary output files an interrupt left behind (e.g. one inside ``mkstemp`` itself)."""
    for pattern in (".*_labels.tif.*.tmp", ".*_objects.csv.*.tmp"):
        for leftover in out_dir.glob(pattern):
            leftover.unlink(missing_ok=True)


def _write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            for row in zip(*table.values()):
                w.writerow([f"{v:.6g}" if isinstance(v, float | np.floating) else v for v in row])

    _atomic_write(path, write)


# ---- one file --------------------------------------------------------------------------------------------


def _read_context(
    ctx: tuple[str, str, str | None] | None, pack: str | None = None, channels: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The context (files, or a context pack) as request fields, checked (float or NaN labels are refused).

    ``channels`` (``channel``, ``nuclear_channel``, ``channel_axis``): the channel choice of the inputs,
    applied to a context image file as to every input; a pack holds its image with the channels chosen.
    """
    from .segment import validate_context
    from .training import read_array

    if pack is not None:
        from .context_pack import load_context_pack

        return load_context_pack(pack).as_request()
    assert ctx is not None
    image, labels = read_array(ctx[0]), read_array(ctx[1])
    if channels and channels.get("channel") is not None:
        image = select_channels(
            image, channels["channel"], channels.get("nuclear_channel"), channel_axis=channels["channel_axis"]
        )
    region = None if ctx[2] is None else read_array(ctx[2])
    names = (f"context image {ctx[0]}", f"context labels {ctx[1]}")
    validate_context(image, labels, region, names=names)
    region = None if region is None else region != 0
    return {"context_image": image, "context_labels": labels, "context_region": region}


def _channel_options(options: dict[str, Any]) -> dict[str, Any]:
    """Pop the channel choice out of ``options`` (applied to whole files, stacks included)."""
    return {
        "channel": options.pop("channel", None),
        "nuclear_channel": options.pop("nuclear_channel", None),
        "channel_axis": options.pop("channel_axis", -1),
    }


def _is_planar(image: np.ndarray) -> bool:
    """One 2D image: (H, W), or (H, W, C) with up to 4 channels last (as the segment service reads it).

    A last axis this short cannot be the width of a stack's planes (the service needs 8 pixels).
    """
    return image.ndim == 2 or (image.ndim == 3 and image.shape[-1] <= 4)


def segment_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: dict[str, Any],
    overwrite: bool = False,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Segment one file and write its outputs; returns a small record (safe to send between processes).

    ``settings`` (:func:`run_settings` of ``options``, computed when not given) is recorded in the labels
    TIFF. Without ``overwrite`` an output made from this input with these settings is skipped, and any
    other existing output is refused.

    Raises
    ------
    InputError
        A file that cannot be read or segmented, or an existing output that may not be replaced.
    """
    import tifffile

    from .segment import SegmentRequest, segment_steps
    from .stack import segment_stack_steps
    from .training import read_array
    from .volume import segment_volume_steps

    path, out_dir = Path(path), Path(out_dir)
    labels_path, csv_path = output_paths(path, out_dir)
    settings = run_settings(options) if settings is None else settings
    if not overwrite:
        state, why = _existing(path, out_dir, settings)
        if state == "done":
            return {
                "input": str(path),
                "labels": str(labels_path),
                "objects": -1,
                "status": "skipped (exists)",
            }
        if state == "foreign":
            raise InputError(f"{why} exists and was not written by ctxseg segment; it is not replaced")
        if state == "other":
            raise InputError(f"{why}; the existing outputs are not replaced without overwrite")
    image = read_array(path)
    options = dict(options)
    channels = _channel_options(options)
    if channels["channel"] is not None:
        image = select_channels(
            image, channels["channel"], channels["nuclear_channel"], channel_axis=channels["channel_axis"]
        )
    ctx, pack = options.pop("context_paths", None), options.pop("context_pack", None)
    if ctx is not None or pack is not None:
        options.update(_read_context(ctx, pack, channels))
    volume_3d = bool(options.pop("volume_3d", False))
    normalize = options.pop("stack_normalize", "plane")  # stacks only: a 2D image has one plane
    stitch_threshold = options.pop("stitch_threshold", 0.25)  # stacks slice by slice only
    planar = _is_planar(image)
    if planar:
        result = run_to_end(segment_steps(SegmentRequest(image=image, **options)))
        labels = result.labels
    elif volume_3d:
        labels, _ = run_to_end(segment_volume_steps(image, normalize=normalize, **options))
    else:
        stack = run_to_end(
            segment_stack_steps(image, normalize=normalize, stitch_threshold=stitch_threshold, **options)
        )
        labels = stack.labels
    if planar:
        table = measure_objects(labels, image, sample_labels=result.sample_labels, flows=result.flows)
    elif volume_3d:
        table = measure_volume(labels, image)
    else:
        table = measure_stack(labels, image, leading=labels.ndim - 2)
    record = json.dumps({"input": str(path.resolve()), "settings": settings})
    _atomic_write(
        labels_path,
        # minisblack: a (3, H, W) or (H, W, 3) labels stack is planes of labels, never an RGB picture
        lambda tmp: tifffile.imwrite(
            tmp,
            labels.astype(np.uint32),
            compression="zlib",
            photometric="minisblack",
            metadata={RECORD_KEY: record},
        ),
    )
    _write_csv(csv_path, table)
    n = len(table["label"])
    return {"input": str(path), "labels": str(labels_path), "objects": int(n), "status": "done"}


# ---- the batch -------------------------------------------------------------------------------------------


def _failure(path: Path, out_dir: Path, exc: BaseException) -> dict[str, Any] | None:
    """A ``failed`` record for an error that concerns this file only; None for errors that stop the batch."""
    if isinstance(exc, CheckpointError):
        return None
    if isinstance(exc, CtxSegError):
        reason = str(exc)
    elif isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc)):
        reason = f"out of memory ({str(exc).splitlines()[0] if str(exc) else 'MemoryError'})"
    elif isinstance(exc, OSError):
        reason = f"cannot write its outputs: {exc.strerror or exc}"
    else:
        return None
    labels_path = output_paths(path, out_dir)[0]
    return {
        "input": str(path),
        "labels": str(labels_path),
        "objects": -1,
        "status": "failed",
        "error": reason,
    }


def _check_checkpoint(options: dict[str, Any]) -> None:
    """Read the checkpoint's header: a missing, corrupt or unusable model stops the batch before it starts."""
    from ..core.io.checkpoint import read_info
    from .models import resolve_checkpoint

    path = resolve_checkpoint(options.get("checkpoint", "default"))
    kind = read_info(path).kind
    if kind not in ("ctxseg-p", "seg-p"):
        raise CheckpointError(f"{path} holds a {kind} model; segmentation needs a ctxseg-p or seg-p model")
    has_context = options.get("context_paths") is not None or options.get("context_pack") is not None
    if has_context and kind != "ctxseg-p":
        raise ConfigError(f"{path.name} is a {kind} model without a context path; use a ctxseg-p checkpoint")


def _check_batch(
    paths: list[Path], out_dir: Path, settings: dict[str, Any], overwrite: bool
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Check the whole batch before any work; returns (files to segment, records of files already done).

    Raises
    ------
    InputError
        Two inputs with the same outputs, or existing files that may not be replaced.
    """
    by_stem: dict[str, Path] = {}
    for p in paths:
        first = by_stem.setdefault(output_stem(p).casefold(), p)
        if first is not p:
            raise InputError(
                f"{first} and {p} would both write {output_paths(p, out_dir)[0]}; rename one, or segment "
                f"them into different output folders"
            )
    input_dirs = {p.parent.resolve() for p in paths}
    holds_inputs = out_dir.resolve() in input_dirs
    todo: list[Path] = []
    done: list[dict[str, Any]] = []
    foreign: list[str] = []
    other: list[str] = []
    for p in paths:
        state, why = _existing(p, out_dir, settings)
        if state == "done" and not overwrite:
            labels_path = output_paths(p, out_dir)[0]
            done.append(
                {"input": str(p), "labels": str(labels_path), "objects": -1, "status": "skipped (exists)"}
            )
            continue
        if state == "foreign" and (holds_inputs or not overwrite):
            foreign.append(why)
        elif state == "other" and not overwrite:
            other.append(why)
        todo.append(p)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        fix = (
            f"{out_dir} holds input images, so these may be annotations: choose another output folder (-o)"
            if holds_inputs
            else "choose another output folder (-o), or pass --overwrite to replace them"
        )
        raise InputError(
            f"{len(foreign)} existing file(s) that ctxseg segment did not write would be replaced: {shown}; "
            f"{fix}"
        )
    if other:
        raise InputError(
            f"{len(other)} existing output(s) in {out_dir} were made from other inputs or with other "
            f"settings ({other[0]}); pass --overwrite to redo them, or choose another output folder (-o)"
        )
    return todo, done


def segment_files(
    paths: list[Path],
    out_dir: str | os.PathLike,
    *,
    options: dict[str, Any],
    overwrite: bool = False,
    workers: int = 0,
    scheduler: str | None = None,
    progress: Callable[[str], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment many files, sequentially, on a local dask cluster (``workers``) or at ``scheduler``.

    Returns one record per input, in input order: ``status`` is ``done``, ``skipped (exists)`` or
    ``failed`` (with ``error``, the reason); a failed file does not stop the batch. ``progress`` gets a line
    of text per file, ``on_record`` each file's record as it is done (skipped files first), e.g. for a bar.

    Raises
    ------
    InputError
        Before any work: an output folder that cannot be written, inputs that would write the same
        outputs, existing files that may not be replaced (see the module notes), an unreadable context.
    ConfigError
        Bad settings (``workers`` < 0, flow or sampler settings), or a scheduler that cannot be reached.
    CheckpointError
        A missing or unreadable checkpoint (the batch stops: no file could be segmented).
    """
    from .limits import check_segment_settings
    from .outputs import check_writable_folder

    say = progress or (lambda s: None)
    out_dir = Path(out_dir)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be a whole number >= 1 (or 0: no cluster), got {workers!r}")
    paths = [Path(p) for p in paths]
    if out_dir.resolve() in {p.resolve() for p in paths}:
        raise InputError(f"the output folder {out_dir} is one of the input files")
    check_segment_settings(
        num_samples=options.get("num_samples", 1),
        diameter=options.get("diameter", "auto"),
        tile_size=options.get("tile_size", 1024),
        tile_overlap=options.get("tile_overlap", 128),
        seed=options.get("seed", 0),
    )
    from .devices import resolve_device

    resolve_device(options.get("device", "auto"))  # an unknown device stops the batch, not each file
    _check_checkpoint(options)
    if options.get("context_paths") is not None or options.get("context_pack") is not None:
        channels = _channel_options(dict(options))
        _read_context(options.get("context_paths"), options.get("context_pack"), channels)
    check_writable_folder(out_dir)
    settings = run_settings(options)
    todo, records = _check_batch(paths, out_dir, settings, overwrite)
    n = len(paths)
    for rec in records:
        say(f"{rec['input']}: skipped (its outputs exist)")
        if on_record is not None:
            on_record(rec)

    def add(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        status = rec["status"] if rec["status"] != "failed" else f"failed: {rec['error']}"
        say(f"[{len(records)}/{n}] {rec['input']}: {status}")

    try:
        if not workers and not scheduler:
            for p in todo:
                try:
                    add(segment_file(p, out_dir, options, True, settings))
                except Exception as exc:
                    failed = _failure(p, out_dir, exc)
                    if failed is None:
                        raise
                    add(failed)
        else:
            _run_on_dask(todo, out_dir, options, settings, workers, scheduler, add)
    except KeyboardInterrupt:
        _remove_partial_outputs(out_dir)
        raise
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(records, key=lambda r: order[r["input"]])


def _run_on_dask(
    todo: list[Path],
    out_dir: Path,
    options: dict[str, Any],
    settings: dict[str, Any],
    workers: int,
    scheduler: str | None,
    add: Callable[[dict[str, Any]], None],
) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise ConfigError(
            "--workers and --scheduler need dask.distributed (pip install 'napari-ctxseg[dask]')"
        ) from exc

    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler!r}: {reason}") from None
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        futures = {
            client.submit(segment_file, str(p), str(out_dir), options, True, settings, pure=False): p
            for p in todo
        }
        for fut in as_completed(futures):
            p = futures[fut]
            try:
                add(fut.result())
            except Exception as exc:
                failed = _failure(p, out_dir, exc)
                if failed is None:
                    raise
                add(failed)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
