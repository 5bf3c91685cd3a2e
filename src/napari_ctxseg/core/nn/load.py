"""A model from a safetensors checkpoint: the weights must fit the architecture of the checkpoint's config."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.checkpoint import CheckpointInfo, read_checkpoint
from .models import build_model

__all__ = ["load_checkpoint"]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    expected_kinds: tuple[str, ...] | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint written by :func:`~napari_ctxseg.core.io.checkpoint.save_checkpoint`.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    device
        Where to put the model.
    expected_kinds
        If given, the model kinds acceptable to the caller (e.g. ``("ctxseg-p", "seg-p")``).

    Returns
    -------
    tuple
        ``(model in eval mode, info)``.

    Raises
    ------
    CheckpointError
        Any problem with the file, its metadata, its tensors (missing, unexpected, wrong shape), or a
        model kind the caller cannot use.

    Examples
    --------
    >>> from importlib import resources
    >>> model, info = load_checkpoint(resources.files("napari_ctxseg") / "models" / "default.safetensors")
    >>> info.kind, model.training
    ('ctxseg-p', False)
    """
    tensors, info = read_checkpoint(path, expected_kinds=expected_kinds)
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
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.to(device).eval()
    return model, info
