"""The sampler solvers' names, kept apart from torch so that the command line can list them quickly.

:data:`SOLVERS` are the multi-step solvers a user may pick; :data:`ONE_STEP` names the single denoiser
call that one sampler step makes (no solver is involved). :func:`check_solver` is the one check of a name.
"""

from __future__ import annotations

from typing import Literal, get_args

from ..errors import ConfigError

__all__ = ["ONE_STEP", "SOLVERS", "Solver", "check_solver"]

Solver = Literal["euler", "heun", "edf"]
SOLVERS: tuple[str, ...] = get_args(Solver)
ONE_STEP = "one_step"


def check_solver(solver: str, *, one_step: bool = True) -> str:
    """Return ``solver`` if it names a solver (or, with ``one_step``, :data:`ONE_STEP`), else raise.

    Examples
    --------
    >>> check_solver("edf")
    'edf'
    >>> check_solver("rk4")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_ctxseg.core.errors.ConfigError: unknown solver 'rk4'; expected one of ['euler', ...]
    """
    names = [*SOLVERS, ONE_STEP] if one_step else list(SOLVERS)
    if solver not in names:
        raise ConfigError(f"unknown solver {solver!r}; expected one of {names}")
    return solver
