"""Find and load models: the bundled default, presets for training, and user checkpoints."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..core.errors import CheckpointError, ConfigError
from ..core.io.checkpoint import CheckpointInfo, read_info, sampling_advice
from ..core.nn.config import CtxSegPConfig, ModelConfig
from ..core.nn.load import load_checkpoint
from ..core.nn.models import SegP
from .devices import resolve_device

__all__ = [
    "PRESETS",
    "LoadedModel",
    "bundled_model_path",
    "load_model",
    "resolve_checkpoint",
    "sampler_warning",
]

#: Model sizes for training. "small" (6.0 M parameters) and "medium" (9.3 M, 18.6 MB in float16) are
#: CPU-friendly (about 0.12 s per 512x512 denoiser call on 2 cores); "original" is the paper's size.
PRESETS: dict[str, ModelConfig] = {
    "tiny": CtxSegPConfig(
        model_dim=8, depths=(1, 1, 1, 1), encoder_depths=(1, 1, 1, 1), mha_head_dim=8, ctx_head_dim=8
    ),
    "small": CtxSegPConfig(
        model_dim=32, depths=(1, 1, 2, 1), encoder_depths=(2, 2, 6, 2), mha_head_dim=32, ctx_head_dim=32
    ),
    "medium": CtxSegPConfig(
        model_dim=40, depths=(1, 1, 2, 1), encoder_depths=(2, 2, 6, 2), mha_head_dim=40, ctx_head_dim=40
    ),
    "original": CtxSegPConfig(),
}

DEFAULT_NAME = "default"


def bundled_model_path() -> Path:
    """Path of the default model shipped inside the package."""
    return Path(str(resources.files("napari_ctxseg") / "models" / "default.safetensors"))


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path:
    """``None`` or ``"default"`` -> the bundled model; otherwise the given path (must exist)."""
    if checkpoint is None or str(checkpoint) == DEFAULT_NAME:
        path = bundled_model_path()
        if not path.is_file():
            raise CheckpointError(f"the bundled default model is missing from the installation ({path})")
        return path
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def sampler_warning(checkpoint: str | os.PathLike | None, steps: int, solver: str) -> str | None:
    """Warn when sampler settings lie outside those a checkpoint was validated with.

    Reads only the checkpoint's header (cheap enough to call whenever a control changes).

    Parameters
    ----------
    checkpoint
        ``"default"``/``None`` (the bundled model) or a path.
    steps, solver
        The sampler settings about to be used.

    Returns
    -------
    str or None
        One line of advice (see :func:`~napari_ctxseg.core.io.checkpoint.sampling_advice`), or ``None`` when
        the settings are fine, the checkpoint declares nothing, or it cannot be read (running it will
        report that error).
    """
    try:
        info = read_info(resolve_checkpoint(checkpoint))
    except CheckpointError:
        return None
    return sampling_advice(info, steps, solver)


@dataclass(frozen=True)
class LoadedModel:
    """A diffusion model (SegP or CtxSegP) in eval mode on its device, with what its checkpoint says."""

    model: SegP
    info: CheckpointInfo
    device: torch.device

    @property
    def sigma_data(self) -> float:
        """The checkpoint's sigma_data (EDM preconditioning)."""
        return self.info.sigma_data

    @property
    def name(self) -> str:
        """File name of the checkpoint (``model`` for an in-memory one)."""
        return self.info.path.name if self.info.path else "model"


_CACHE: dict[tuple[str, float, str], LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(
    checkpoint: str | os.PathLike | None = DEFAULT_NAME,
    *,
    device: str | torch.device = "auto",
    kinds: tuple[str, ...] = ("ctxseg-p", "seg-p"),
) -> LoadedModel:
    """Load a checkpoint (``"default"`` = the bundled model), cached per (file, mtime, device).

    Parameters
    ----------
    checkpoint
        ``"default"``, ``None`` or a path to a ``.safetensors`` checkpoint.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` or a torch device.
    kinds
        Model kinds the caller can use, among the diffusion models ``ctxseg-p`` and ``seg-p`` (what
        segmentation needs).

    Raises
    ------
    CheckpointError
        Missing, corrupt or incompatible checkpoint (including a pickle or a model of another kind).
    """
    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    key = (str(path.resolve()), path.stat().st_mtime, str(dev))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.info.kind in kinds:
            return hit
    try:
        model, info = load_checkpoint(path, device=dev, expected_kinds=kinds)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if not isinstance(model, SegP):
        raise CheckpointError(
            f"{path} holds a {info.kind} model; segmentation needs a ctxseg-p or seg-p model"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    loaded = LoadedModel(model, info, dev)
    with _LOCK:
        _CACHE.clear()  # keep one model in memory
        _CACHE[key] = loaded
    return loaded
