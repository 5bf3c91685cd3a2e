"""Checkpoints: one ``.safetensors`` file whose metadata holds the model config as JSON.

Metadata keys (all strings, as safetensors requires):

- ``format``: ``"napari-ctxseg"``; ``format_version``: ``"1"``;
- ``config``: JSON of :meth:`ModelConfig.to_dict` (includes ``kind``);
- ``sigma_data``: the EDM sigma_data the model was trained with (the original inference uses 1.0);
- ``provenance``: JSON object (training data, steps, base checkpoint hash, converter source, ...);
- ``package_version``;
- ``sampling`` (optional): JSON object ``{"solvers": [...], "max_steps": N, "evidence": "..."}``, the sampler
  settings the weights were validated with (written by :func:`save_checkpoint` or :func:`set_sampling`,
  which refuse solver names this version does not have; readers accept them, for files of later versions).
  :func:`sampling_advice` flags steps beyond ``max_steps``, or more than one step with another solver.

Weights are never unpickled. Files are written atomically (temporary file in the same folder, then
``os.replace``), so an interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..diffusion.solvers import ONE_STEP, SOLVERS
from ..errors import CheckpointError, ConfigError
from ..nn.config import ModelConfig, config_from_dict

__all__ = [
    "FORMAT",
    "CheckpointInfo",
    "file_sha256",
    "read_checkpoint",
    "read_info",
    "sampling_advice",
    "save_checkpoint",
    "set_sampling",
]

FORMAT = "napari-ctxseg"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself."""

    path: Path | None
    config: ModelConfig
    sigma_data: float
    provenance: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    sha256: str = ""
    sampling: dict[str, Any] | None = None  # validated sampler settings, if the checkpoint declares them

    @property
    def kind(self) -> str:
        """The model kind (``ctxseg-p``, ``seg-p``, ``ctxseg-d`` or ``seg-d``)."""
        return self.config.kind


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-ctxseg")
    except Exception:  # not installed (source tree)
        return "0+unknown"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (provenance of checkpoints and inputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    sigma_data: float,
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    sampling: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its config to ``path`` atomically.

    Parameters
    ----------
    path
        Destination ``.safetensors`` file; its folder is created if needed.
    model
        A port model with a ``config`` attribute.
    sigma_data
        EDM sigma_data of the model (stored, used by inference).
    provenance
        JSON-serialisable facts about where the weights come from.
    dtype
        Storage dtype (e.g. ``torch.float16`` to halve the file); loading always returns float32.
    sampling
        The sampler settings the weights were validated with (module notes); ``None``: not declared.

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    config: ModelConfig = model.config  # type: ignore[assignment]
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "sigma_data": repr(float(sigma_data)),
        "provenance": json.dumps(provenance or {}),
        "package_version": _package_version(),
    }
    if sampling is not None:
        metadata["sampling"] = json.dumps(_check_sampling(sampling, path, writing=True))
    _write_atomic(path, tensors, metadata)
    return path


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file in the same folder and ``os.replace``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_sampling(sampling: Any, path: Path, writing: bool = False) -> dict[str, Any]:
    """Validate a ``sampling`` declaration (module notes); raises :class:`CheckpointError`.

    Solver names are checked against this version's solvers only when ``writing``: a file that names a
    solver added by a later version must still load.
    """
    where = f"{path}: "
    if not isinstance(sampling, dict):
        raise CheckpointError(f"{where}sampling must be a JSON object, got {type(sampling).__name__}")
    solvers, max_steps = sampling.get("solvers"), sampling.get("max_steps")
    if not (isinstance(solvers, list) and solvers and all(isinstance(s, str) for s in solvers)):
        raise CheckpointError(f"{where}sampling.solvers must be a non-empty list of solver names")
    if writing and (unknown := [s for s in solvers if s not in (*SOLVERS, ONE_STEP)]):
        raise CheckpointError(
            f"{where}unknown sampling.solvers {unknown}; expected some of {[*SOLVERS, ONE_STEP]}"
        )
    if not (isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1):
        raise CheckpointError(f"{where}sampling.max_steps must be an integer >= 1, got {max_steps!r}")
    if not isinstance(sampling.get("evidence", ""), str):
        raise CheckpointError(f"{where}sampling.evidence must be text")
    return sampling


def set_sampling(path: str | os.PathLike, sampling: dict[str, Any] | None) -> Path:
    """Declare (or, with ``None``, remove) the validated sampler settings of a checkpoint in place.

    The tensors and the other metadata are kept bit for bit; the file is rewritten atomically.

    Parameters
    ----------
    path
        An existing napari-ctxseg checkpoint.
    sampling
        ``{"solvers": [...], "max_steps": N, "evidence": "..."}`` (module notes), or ``None``.

    Returns
    -------
    Path
        ``path``.
    """
    from safetensors import safe_open

    path = Path(path)
    read_info(path)  # ours and well-formed, or CheckpointError
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata.pop("sampling", None)
    if sampling is not None:
        metadata["sampling"] = json.dumps(_check_sampling(sampling, path, writing=True))
    _write_atomic(path, tensors, metadata)
    return path


def sampling_advice(info: CheckpointInfo, steps: int, solver: str) -> str | None:
    """A one-line warning when ``steps``/``solver`` lie outside what the checkpoint was validated with.

    One step is the same prediction for every solver and is never flagged. Checkpoints that declare
    nothing get no advice (``None``).

    Parameters
    ----------
    info
        The checkpoint's metadata (:func:`read_info`).
    steps, solver
        The sampler settings about to be used.

    Returns
    -------
    str or None
        The warning, or ``None`` when the settings are within the declared ones.
    """
    s = info.sampling
    if not s or steps <= 1:
        return None
    solvers, max_steps = s["solvers"], s["max_steps"]  # validated when read
    if solver in solvers and steps <= max_steps:
        return None
    name = info.path.name if info.path is not None else "this model"
    evidence = f" ({s['evidence']})" if s.get("evidence") else ""
    return (
        f"{name} is validated for 1-{max_steps} sampler steps with {' or '.join(solvers)}; {steps} steps "
        f"with {solver} may give much worse labels{evidence}"
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then the JSON header ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _check_not_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); expected a .safetensors checkpoint")
    if _looks_like_safetensors(head, path.stat().st_size):
        return
    pickle_protocol = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if pickle_protocol or head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{path} is a pickle, not a safetensors checkpoint. Pickles can run code and are never loaded "
            f"directly; if it is an original ctxseg (Flax) checkpoint you trust, convert it with "
            f"`ctxseg convert {path.name} -o model.safetensors --model ctxseg-p --trust`."
        )


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read and validate the metadata of a checkpoint without loading its weights.

    Raises
    ------
    CheckpointError
        Missing file, pickle, corrupt or truncated header, or metadata that is not ours.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several error types for corrupt files
        raise CheckpointError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}"
        ) from exc
    return _info_from_metadata(meta, path)


def _info_from_metadata(meta: dict[str, str], path: Path) -> CheckpointInfo:
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a napari-ctxseg checkpoint (metadata format="
            f"{meta.get('format')!r}, expected {FORMAT!r}); original Flax checkpoints need `ctxseg convert`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; this "
            f"napari-ctxseg reads version {FORMAT_VERSION!r} (upgrade the package?)"
        )
    try:
        config = config_from_dict(json.loads(meta["config"]))
        sigma_data = float(meta["sigma_data"])
        provenance = json.loads(meta.get("provenance", "{}"))
        sampling = json.loads(meta["sampling"]) if "sampling" in meta else None
    except (KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path} has invalid metadata: {exc}") from exc
    if not sigma_data > 0:
        raise CheckpointError(f"{path} has sigma_data {sigma_data}; expected a positive number")
    if sampling is not None:
        _check_sampling(sampling, path)
    return CheckpointInfo(
        path, config, sigma_data, provenance, meta.get("package_version", ""), sampling=sampling
    )


def read_checkpoint(
    path: str | os.PathLike, *, expected_kinds: tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors on the CPU, info)``.

    The tensors are checked to be readable and finite; that they fit the model of ``info.config`` is checked
    by :func:`napari_ctxseg.core.nn.load.load_checkpoint`, which builds it.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    expected_kinds
        If given, the model kinds acceptable to the caller (e.g. ``("ctxseg-p", "seg-p")``).

    Raises
    ------
    CheckpointError
        Any problem with the file, its metadata or its tensors, or a model kind the caller cannot use.
    """
    from safetensors.torch import load_file

    info = read_info(path)
    if expected_kinds is not None and info.kind not in expected_kinds:
        raise CheckpointError(f"{path} holds a {info.kind} model; expected one of {list(expected_kinds)}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: tensors could not be read (corrupt or truncated?): {exc}") from exc
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} has non-finite weights in {bad[:3]}")
    return tensors, dataclasses.replace(info, sha256=file_sha256(path))
