"""Context packs: one file that holds a context (image, labels, optional region) and its self-score.

A pack is a compressed numpy ``.npz`` (``np.savez_compressed``; read with ``allow_pickle=False``, so a
pack can never run code) with these arrays:

- ``image``: the context image as the model reads it, ``(H, W)`` or ``(H, W, C)`` channels last (with
  a channel choice, the chosen channels: see :mod:`napari_ctxseg.core.preprocess.channels`);
- ``labels``: ``(H, W)`` integer instance labels;
- ``region`` (optional): ``(H, W)`` bool, where the annotation is complete;
- ``meta``: a JSON string: ``format`` (``"ctxseg-context"``), ``version``, ``self_score`` (the context
  self-score AP@0.5 of a calibration, or null), and free ``info`` (e.g. the channel choice, the layers).

Use a pack with the API as ``segment(image, **load_context_pack(path).as_request())``, with the CLI as
``ctxseg segment --context PACK``, and in the Segment widget with "context pack: Load...".
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from .segment import validate_context

__all__ = [
    "PACK_FORMAT",
    "PACK_SUFFIX",
    "PACK_VERSION",
    "ContextPack",
    "load_context_pack",
    "save_context_pack",
]

PACK_FORMAT = "ctxseg-context"
PACK_VERSION = 1
PACK_SUFFIX = ".npz"


@dataclass(frozen=True)
class ContextPack:
    """A context read from (or to be written to) a pack file."""

    image: np.ndarray
    labels: np.ndarray
    region: np.ndarray | None = None
    self_score: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_request(self) -> dict[str, Any]:
        """The :class:`~napari_ctxseg.services.segment.SegmentRequest` fields of this context.

        Examples
        --------
        >>> import numpy as np
        >>> labels = np.zeros((16, 16), np.uint16); labels[4:9, 4:9] = 1
        >>> request = ContextPack(image=labels * 100.0, labels=labels).as_request()
        >>> sorted(request)  # segment(image, **load_context_pack("cells.npz").as_request())
        ['context_image', 'context_labels', 'context_region']
        """
        return {"context_image": self.image, "context_labels": self.labels, "context_region": self.region}


def save_context_pack(
    path: str | os.PathLike,
    image: np.ndarray,
    labels: np.ndarray,
    region: np.ndarray | None = None,
    *,
    self_score: float | None = None,
    info: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Check a context and write it to ``path`` (``.npz``) atomically; returns the path.

    Parameters
    ----------
    path
        The pack to write; must end in ``.npz``. An existing file is replaced only when it is a pack.
    image, labels, region
        The context, checked as a segmentation checks it
        (:func:`~napari_ctxseg.services.segment.validate_context`).
    self_score
        The context self-score (AP@0.5) of a calibration on this context, if one was computed.
    info
        JSON-serialisable notes kept with the pack (e.g. the channel choice).
    overwrite
        False: refuse an existing file.

    Raises
    ------
    InputError
        A bad context, a path that is not ``.npz``, an existing file that is not a pack (never replaced),
        or ``info`` that is not JSON.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> labels = np.zeros((16, 16), np.uint16); labels[4:9, 4:9] = 1
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = pathlib.Path(tmp.name) / "ctx.npz"
    >>> _ = save_context_pack(path, np.random.default_rng(0).random((16, 16)), labels, self_score=0.8)
    >>> pack = load_context_pack(path)
    >>> pack.labels.dtype, int(pack.labels.max()), pack.self_score, pack.region is None
    (dtype('uint16'), 1, 0.8, True)
    >>> tmp.cleanup()
    """
    path = Path(path)
    if path.suffix.lower() != PACK_SUFFIX:
        raise InputError(f"a context pack is a {PACK_SUFFIX} file, got {path}")
    if path.exists():
        if not overwrite:
            raise InputError(f"{path} exists; choose another name or allow replacing it")
        try:
            load_context_pack(path)
        except InputError:
            raise InputError(f"{path} exists and is not a context pack; it is never replaced") from None
    validate_context(image, labels, region)
    try:
        meta = json.dumps(
            {
                "format": PACK_FORMAT,
                "version": PACK_VERSION,
                "self_score": None if self_score is None else float(self_score),
                "info": info or {},
            }
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"the context pack's info must be JSON (numbers, strings, lists): {exc}") from exc
    arrays: dict[str, np.ndarray] = {
        "image": np.ascontiguousarray(image),
        "labels": np.ascontiguousarray(labels),
        "meta": np.array(meta),
    }
    if region is not None:
        arrays["region"] = np.asarray(region).astype(bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub reads allow_pickle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_context_pack(path: str | os.PathLike) -> ContextPack:
    """Read and check a context pack written by :func:`save_context_pack`.

    Raises
    ------
    InputError
        A missing file, a file that is not a pack (or is corrupt or truncated), a pack of a newer
        version, or a context that fails the checks of a segmentation.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"context pack not found: {path}")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            names = set(data.files)
            missing = {"image", "labels", "meta"} - names
            if missing:
                raise InputError(
                    f"{path} is not a context pack: it lacks {', '.join(sorted(missing))} (a pack is "
                    f"written by the Segment widget's 'context pack: Save...' or "
                    f"napari_ctxseg.services.context_pack.save_context_pack)"
                )
            meta = json.loads(str(data["meta"]))
            image, labels = data["image"], data["labels"]
            region = data["region"] if "region" in names else None
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(
            f"{path} is not a readable context pack (corrupt or not an .npz file): {exc}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != PACK_FORMAT:
        raise InputError(f"{path} is an .npz file but not a context pack (no '{PACK_FORMAT}' format tag)")
    version = meta.get("version")
    if not isinstance(version, int) or version > PACK_VERSION:
        raise InputError(
            f"{path} is a context pack of version {version!r}; this napari-ctxseg reads version "
            f"{PACK_VERSION} and older (update napari-ctxseg)"
        )
    validate_context(image, labels, region, names=(f"{path} image", f"{path} labels"))
    score = meta.get("self_score")
    info = meta.get("info")
    return ContextPack(
        image,
        labels,
        None if region is None else region.astype(bool),
        None if score is None else float(score),
        info if isinstance(info, dict) else {},
    )
