"""Error types shared by every layer of napari-ctxseg.

Widgets show these in the dock and as a notification; the CLI prints one line and exits non-zero.
Every message says what was received and what was expected.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "CtxSegError", "InputError"]


class CtxSegError(Exception):
    """Base class of all napari-ctxseg errors meant to be shown to a user."""


class InputError(CtxSegError, ValueError):
    """An image, mask, flow or context that cannot be processed (shape, dtype, NaN, empty...)."""


class ConfigError(CtxSegError, ValueError):
    """An invalid model or sampler configuration."""


class CheckpointError(CtxSegError):
    """A checkpoint that is missing, corrupt, truncated or incompatible."""
