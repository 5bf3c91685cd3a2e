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

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CheckpointError, ConfigError, CtxSegError, InputError
from ..core.preprocess.channels import select_channels
from .batch_io import (
    RECORD_KEY,
    atomic_write,
    existing_outputs,
    output_paths,
    output_stem,
    remove_partial_outputs,
    run_settings,
    write_csv,
)
from .measure import measure_objects, measure_stack, measure_volume
from .progress import run_to_end

__all__ = ["SCHEDULER_TIMEOUT_S", "read_context", "segment_file", "segment_files"]

#: seconds to wait for a dask scheduler given by address
SCHEDULER_TIMEOUT_S = 30.0


# ---- one file --------------------------------------------------------------------------------------------


def read_context(
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
        state, why = existing_outputs(path, out_dir, settings)
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
        options.update(read_context(ctx, pack, channels))
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
    atomic_write(
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
    write_csv(csv_path, table)
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
        state, why = existing_outputs(p, out_dir, settings)
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
        read_context(options.get("context_paths"), options.get("context_pack"), channels)
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
                add(_outcome(p, out_dir, partial(segment_file, p, out_dir, options, True, settings)))
        else:
            _run_on_dask(todo, out_dir, options, settings, workers, scheduler, add)
    except KeyboardInterrupt:
        remove_partial_outputs(out_dir)
        raise
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(records, key=lambda r: order[r["input"]])


def _outcome(path: Path, out_dir: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record of one file: what ``run`` returns, or a ``failed`` record for an error of that file only."""
    try:
        return run()
    except Exception as exc:
        failed = _failure(path, out_dir, exc)
        if failed is None:
            raise
        return failed


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
            add(_outcome(futures[fut], out_dir, fut.result))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
