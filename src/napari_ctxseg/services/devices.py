"""Pick the torch device a user asked for ("auto", "cpu", "cuda", "cuda:1", "mps")."""

from __future__ import annotations

import torch

from ..core.errors import ConfigError

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device to run on: ``auto`` prefers CUDA, then Apple MPS, then the CPU.

    Raises
    ------
    ConfigError
        Unknown names, or an accelerator that is not available here (the message says which are).
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = spec.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ConfigError(f"unknown device {spec!r}; expected one of {list(DEVICE_CHOICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is available here; use 'auto' or 'cpu'"
        )
    if kind == "mps" and not _mps_available():
        raise ConfigError(
            "device 'mps' was asked for but Apple MPS is not available here; use 'auto' or 'cpu'"
        )
    return torch.device(spec)
