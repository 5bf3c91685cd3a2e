"""Batch segmentation of many files, locally or on a dask.distributed cluster.

Each input ``NAME.ext`` gives ``NAME_labels.tif`` (uint32 labels) and ``NAME_objects.csv`` (per-object
measurements) in the output folder. Outputs are written atomically (temporary file, then rename), and
inputs whose outputs exist are skipped unless ``overwrite``, so an interrupted batch resumes where it
stopped. On a cluster each worker loads the model once (the model cache of :func:`load_model` lives in
the worker process) and images are distributed one task per file.
"""

from __future__ import annotations

import csv
import glob
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from .measure import measure_objects, measure_stack, measure_volume
from .progress import run_to_end

__all__ = ["IMAGE_SUFFIXES", "collect_inputs", "segment_file", "segment_files"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".jpg", ".jpeg")


def collect_inputs(items: Iterable[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise InputError(f"no image found for {item!r} (expected a file, a folder or a glob pattern)")
            out += matches
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    if not unique:
        raise InputError("no input images")
    return unique


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            for row in zip(*table.values()):
                w.writerow([f"{v:.6g}" if isinstance(v, float | np.floating) else v for v in row])

    _atomic_write(path, write)


def output_paths(image_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """The labels TIFF and objects CSV written for one input."""
    stem = image_path.name.split(".")[0]
    return out_dir / f"{stem}_labels.tif", out_dir / f"{stem}_objects.csv"


def segment_file(
    path: str | os.PathLike, out_dir: str | os.PathLike, options: dict[str, Any], overwrite: bool = False
) -> dict[str, Any]:
    """Segment one file and write its outputs; returns a small record (safe to send between processes)."""
    import tifffile

    from .segment import SegmentRequest, segment_steps
    from .stack import is_rgb, segment_stack_steps, segment_volume_steps
    from .training import read_array

    path, out_dir = Path(path), Path(out_dir)
    labels_path, csv_path = output_paths(path, out_dir)
    if not overwrite and labels_path.exists() and csv_path.exists():
        return {"input": str(path), "labels": str(labels_path), "objects": -1, "status": "skipped (exists)"}
    image = read_array(path)
    options = dict(options)
    ctx = options.pop("context_paths", None)
    if ctx is not None:
        options["context_image"] = read_array(ctx[0])
        options["context_labels"] = read_array(ctx[1]).astype(np.int64)
        options["context_region"] = None if ctx[2] is None else read_array(ctx[2]) != 0
    volume_3d = bool(options.pop("volume_3d", False))
    normalize = options.pop("stack_normalize", "plane")  # stacks only: a 2D image has one plane
    stitch_threshold = options.pop("stitch_threshold", 0.25)  # stacks slice by slice only
    planar = image.ndim == 2 or (image.ndim == 3 and is_rgb(image.shape))
    if planar:
        result = run_to_end(segment_steps(SegmentRequest(image=image, **options)))
        labels = result.labels
    elif volume_3d:
        labels, _ = run_to_end(segment_volume_steps(image, normalize=normalize, **options))
    else:
        labels = run_to_end(
            segment_stack_steps(image, normalize=normalize, stitch_threshold=stitch_threshold, **options)
        )
    if planar:
        table = measure_objects(labels, image, sample_labels=result.sample_labels, flows=result.flows)
    elif volume_3d:
        table = measure_volume(labels, image)
    else:
        table = measure_stack(labels, image, leading=labels.ndim - 2)
    _atomic_write(
        labels_path,
        # minisblack: a (3, H, W) or (H, W, 3) labels stack is planes of labels, never an RGB picture
        lambda tmp: tifffile.imwrite(
            tmp, labels.astype(np.uint32), compression="zlib", photometric="minisblack"
        ),
    )
    _write_csv(csv_path, table)
    n = len(table["label"])
    return {"input": str(path), "labels": str(labels_path), "objects": int(n), "status": "done"}


def segment_files(
    paths: list[Path],
    out_dir: str | os.PathLike,
    *,
    options: dict[str, Any],
    overwrite: bool = False,
    workers: int = 0,
    scheduler: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment many files, sequentially, on a local dask cluster (``workers``) or at ``scheduler``.

    Raises
    ------
    InputError
        From any image that cannot be segmented (the message names the file).
    """
    say = progress or (lambda s: None)
    if not workers and not scheduler:
        records = []
        for i, p in enumerate(paths):
            say(f"[{i + 1}/{len(paths)}] {p}")
            try:
                records.append(segment_file(p, out_dir, options, overwrite))
            except InputError as exc:
                raise InputError(f"{p}: {exc}") from exc
        return records
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        futures = [
            client.submit(segment_file, str(p), str(out_dir), options, overwrite, pure=False) for p in paths
        ]
        records = []
        for i, fut in enumerate(as_completed(futures)):
            rec = fut.result()
            say(f"[{i + 1}/{len(paths)}] {rec['input']}: {rec['status']}")
            records.append(rec)
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(records, key=lambda r: order[r["input"]])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
