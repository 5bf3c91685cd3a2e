"""Checkpoints: one ``.safetensors`` file whose metadata holds the model config as JSON.

Metadata keys (all strings, as safetensors requires):

- ``format``: ``"napari-ctxseg"``; ``format_version``: ``"1"``;
- ``config``: JSON of :meth:`ModelConfig.to_dict` (includes ``kind``);
- ``sigma_data``: the EDM sigma_data the model was trained with (the original inference uses 1.0);
- ``provenance``: JSON object (training data, steps, base checkpoint hash, converter source, ...);
- ``package_version``.

Weights are never unpickled. Files are written atomically (temporary file in the same folder, then
``os.replace``), so an interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig, config_from_dict
from .errors import CheckpointError, ConfigError
from .models import build_model

__all__ = ["FORMAT", "CheckpointInfo", "file_sha256", "load_checkpoint", "read_info", "save_checkpoint"]

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

    @property
    def kind(self) -> str:
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

    Returns
    -------
    Path
        The written path.
    """
    from safetensors.torch import save_file

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
    return path


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
    except (KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path} has invalid metadata: {exc}") from exc
    if not sigma_data > 0:
        raise CheckpointError(f"{path} has sigma_data {sigma_data}; expected a positive number")
    return CheckpointInfo(path, config, sigma_data, provenance, meta.get("package_version", ""))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    expected_kinds: tuple[str, ...] | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns ``(model in eval mode, info)``.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    device
        Where to put the model.
    expected_kinds
        If given, the model kinds acceptable to the caller (e.g. ``("ctxseg-p", "seg-p")``).

    Raises
    ------
    CheckpointError
        Any problem with the file, its metadata, its tensors (missing, unexpected, wrong shape), or a
        model kind the caller cannot use.
    """
    from safetensors.torch import load_file

    info = read_info(path)
    if expected_kinds is not None and info.kind not in expected_kinds:
        raise CheckpointError(f"{path} holds a {info.kind} model; expected one of {list(expected_kinds)}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: tensors could not be read (corrupt or truncated?): {exc}") from exc
    model = build_model(info.config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match its {info.kind} config: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}, wrong shapes {wrong[:2]}"
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} has non-finite weights in {bad[:3]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.to(device).eval()
    info = CheckpointInfo(
        info.path, info.config, info.sigma_data, info.provenance, info.package_version, file_sha256(path)
    )
    return model, info
