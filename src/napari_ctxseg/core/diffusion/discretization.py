"""Sigma discretizations: the noise levels of a sampler run (edm, vp, ve, iddpm).

:func:`get_sigmas` resolves a discretization by name (or takes a callable) and appends the final 0;
:mod:`napari_ctxseg.core.diffusion.sampling` integrates the probability-flow ODE over those levels.
Sigma tensors
are 1-D float64 on the CPU.

References
----------
.. [1] T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based
   Generative Models", NeurIPS 2022, arXiv:2206.00364 (the discretizations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, resolve_named

__all__ = [
    "DISCRETIZATIONS",
    "Discretization",
    "check_sigma_range",
    "edm_sigmas",
    "get_discretization",
    "get_sigmas",
    "iddpm_original_sigmas",
    "iddpm_sigmas",
    "ve_sigmas",
    "vp_sigmas",
]

Discretization = Callable[[float, float, int], Any]
"""``f(sigma_min, sigma_max, num_steps)`` -> ``num_steps`` decreasing positive sigmas (tensor or sequence)."""


def check_sigma_range(sigma_min: float, sigma_max: float, num_steps: int) -> None:
    """Raise :class:`ConfigError` unless ``num_steps >= 1`` and ``0 < sigma_min < sigma_max < inf``."""
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ConfigError(f"expected 0 < sigma_min < sigma_max < inf, got {sigma_min=}, {sigma_max=}")


def edm_sigmas(sigma_min: float, sigma_max: float, num_steps: int, *, rho: float = 7.0) -> Tensor:
    r"""EDM noise levels, uniform in :math:`\sigma^{1/\rho}`.

    Notes
    -----
    :math:`\sigma_i = (\sigma_{max}^{1/\rho} + \tfrac{i}{N-1}(\sigma_{min}^{1/\rho} -
    \sigma_{max}^{1/\rho}))^\rho`, :math:`i = 0..N-1` [1]_; ``(N,)`` float64, without the final 0.
    """
    check_sigma_range(sigma_min, sigma_max, num_steps)
    ramp = torch.linspace(sigma_max ** (1 / rho), sigma_min ** (1 / rho), num_steps, dtype=torch.float64)
    return ramp**rho


def vp_sigmas(sigma_min: float, sigma_max: float, num_steps: int, *, epsilon_s: float = 1e-3) -> Tensor:
    r"""Variance-preserving (VP) noise levels at uniform times from 1 to ``epsilon_s``.

    Notes
    -----
    :math:`\sigma(t) = \sqrt{e^{\beta_d t^2/2 + \beta_{min} t} - 1}` with :math:`\beta_d, \beta_{min}`
    chosen so that :math:`\sigma(1) = \sigma_{max}` and :math:`\sigma(\epsilon_s) = \sigma_{min}` [1]_;
    :math:`t_i` = linspace(1, :math:`\epsilon_s`, N). ``(N,)`` float64.
    """
    check_sigma_range(sigma_min, sigma_max, num_steps)
    log_max = math.log(sigma_max**2 + 1)
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - log_max) / (epsilon_s - 1)
    beta_min = log_max - 0.5 * beta_d
    t = torch.linspace(1, epsilon_s, num_steps, dtype=torch.float64)
    return torch.sqrt(torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


def ve_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> Tensor:
    r"""Variance-exploding (VE) noise levels: a geometric sequence from ``sigma_max`` to ``sigma_min``.

    Notes
    -----
    :math:`\sigma_i = \sigma_{max} (\sigma_{min}/\sigma_{max})^{i/(N-1)}` [1]_. ``(N,)`` float64.
    """
    check_sigma_range(sigma_min, sigma_max, num_steps)
    frac = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return (sigma_min / sigma_max) ** frac * sigma_max


@lru_cache(maxsize=8)
def _iddpm_admissible(C_1: float, C_2: float, M: int) -> tuple[float, ...]:
    """The iDDPM noise levels :math:`u_0 > u_1 > ... > u_M = 0` (float64)."""

    def alpha_bar(j: int) -> float:
        return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return tuple(u)


def _iddpm_in_range(
    sigma_min: float, sigma_max: float, num_steps: int, C_1: float, C_2: float, M: int
) -> Tensor:
    """The admissible iDDPM levels in ``[sigma_min, sigma_max]`` (descending), after checking the range."""
    check_sigma_range(sigma_min, sigma_max, num_steps)
    u = torch.tensor(_iddpm_admissible(C_1, C_2, M), dtype=torch.float64)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(u) == 0:
        raise ConfigError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]")
    return u


def iddpm_sigmas(
    sigma_min: float,
    sigma_max: float,
    num_steps: int,
    *,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
) -> Tensor:
    r"""iDDPM noise levels spread over the whole admissible range (as NVlabs/edm does).

    Notes
    -----
    :math:`u_M = 0`,
    :math:`u_{j-1} = \sqrt{(u_j^2 + 1) / \max(\bar\alpha_{j-1}/\bar\alpha_j, C_1) - 1}`,
    :math:`\bar\alpha_j = \sin^2(\tfrac{\pi}{2} \tfrac{j}{M (C_2 + 1)})`. Of the :math:`L` levels in
    ``[sigma_min, sigma_max]`` (descending), step :math:`i` takes index
    :math:`\lfloor \tfrac{L-1}{N-1} i + \tfrac12 \rfloor` [1]_, so the schedule runs from the largest
    level below ``sigma_max`` to the smallest above ``sigma_min``. The original ctxseg code stops far
    above ``sigma_min``; that behaviour is :func:`iddpm_original_sigmas`. ``(N,)`` float64.
    """
    u = _iddpm_in_range(sigma_min, sigma_max, num_steps, C_1, C_2, M)
    if num_steps == 1:
        return u[:1].clone()
    index = torch.floor((len(u) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64) + 0.5)
    return u[index.long()]


def iddpm_original_sigmas(
    sigma_min: float,
    sigma_max: float,
    num_steps: int,
    *,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
) -> Tensor:
    r"""iDDPM noise levels exactly as the original ctxseg computes them (a known defect, kept for parity).

    Notes
    -----
    Same admissible levels as :func:`iddpm_sigmas`, but indexed with
    :math:`\lfloor \tfrac{L-1}{N-1} t_i \rfloor` for :math:`t_i` = linspace(0, 1, N) instead of
    :math:`i = 0..N-1`: only the first :math:`1/(N-1)` of the range is used, so with ``sigma_max = 80``,
    ``sigma_min = 0.002`` the schedule ends at 2.99 for N = 6 and at 9.54 for N = 18. ``(N,)`` float64.
    """
    u = _iddpm_in_range(sigma_min, sigma_max, num_steps, C_1, C_2, M)
    if num_steps == 1:
        return u[:1].clone()
    frac = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return u[((len(u) - 1) / (num_steps - 1) * frac).long()]


DISCRETIZATIONS: dict[str, Discretization] = {
    "edm": edm_sigmas,
    "vp": vp_sigmas,
    "ve": ve_sigmas,
    "iddpm": iddpm_sigmas,
    "iddpm_original": iddpm_original_sigmas,
}
"""Discretizations by name."""


def get_discretization(discretization: str | Discretization) -> Discretization:
    """Resolve a discretization name or pass a callable through.

    Raises
    ------
    ConfigError
        For an unknown name; the message lists the choices.
    """
    return resolve_named(
        discretization, DISCRETIZATIONS, "discretization", "a callable f(sigma_min, sigma_max, num_steps)"
    )


def get_sigmas(
    discretization: str | Discretization, sigma_min: float, sigma_max: float, num_steps: int
) -> Tensor:
    """Noise levels of a sampler run, with the final 0 appended.

    Parameters
    ----------
    discretization : str or callable
        A name of :data:`DISCRETIZATIONS` or ``f(sigma_min, sigma_max, num_steps)``.
    sigma_min, sigma_max : float
        Range handed to the discretization.
    num_steps : int
        Number of steps N.

    Returns
    -------
    Tensor
        ``(N + 1,)`` float64 on the CPU: N positive sigmas, then 0.

    Raises
    ------
    ConfigError
        Unknown name, bad range, or a custom discretization that does not return N positive finite values.
    """
    fn = get_discretization(discretization)
    check_sigma_range(sigma_min, sigma_max, num_steps)
    sigmas = torch.as_tensor(fn(sigma_min, sigma_max, num_steps), dtype=torch.float64).detach().cpu()
    if sigmas.shape != (num_steps,) or not bool(torch.all(torch.isfinite(sigmas) & (sigmas > 0))):
        raise ConfigError(
            f"discretization {discretization!r} must return {num_steps} positive finite sigmas, "
            f"got {sigmas.tolist()}"
        )
    return torch.cat([sigmas, sigmas.new_zeros(1)])
