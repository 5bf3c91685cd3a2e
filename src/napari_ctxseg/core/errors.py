"""Error types shared by every layer of napari-ctxseg.

Widgets show these in the dock and as a notification; the CLI prints one line and exits non-zero.
Every message says what was received and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CtxSegError",
    "CtxSegWarning",
    "InputError",
    "resolve_named",
]

F = TypeVar("F", bound=Callable)


class CtxSegError(Exception):
    """Base class of all napari-ctxseg errors meant to be shown to a user."""


class InputError(CtxSegError, ValueError):
    """An image, mask, flow or context that cannot be processed (shape, dtype, NaN, empty...)."""


class ConfigError(CtxSegError, ValueError):
    """An invalid model or sampler configuration."""


class CheckpointError(CtxSegError):
    """A checkpoint that is missing, corrupt, truncated or incompatible."""


class CtxSegWarning(UserWarning):
    """Something a user should know that does not stop the work (a slow run, a file left out).

    The CLI prints it as one line (``ctxseg <command>: warning: ...``).
    """


def resolve_named(
    value: str | F, registry: Mapping[str, F], what: str, callable_hint: str = "a callable"
) -> F:
    """``registry[value]``, or ``value`` itself when it is callable.

    Raises
    ------
    ConfigError
        For an unknown name: "unknown <what> <value>; expected one of <names> or <callable_hint>".
    """
    if callable(value):
        return value
    try:
        return registry[value]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown {what} {value!r}; expected one of {sorted(registry)} or {callable_hint}"
        ) from None
