"""Training noise schedules: one noise level per sample, and the loss weight that goes with it.

Each schedule draws ``sigma`` from a ``torch.Generator`` and returns ``(sigma, loss_weight)``, both
``(B, 1, 1, 1)``, for :func:`~napari_ctxseg.core.diffusion.edm.edm_loss`. The names are the original
code's (:data:`SCHEDULES`).

References
----------
.. [1] T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based
   Generative Models", NeurIPS 2022, arXiv:2206.00364.
.. [2] Y. Song, S. Ermon, "Improved Techniques for Training Score-Based Generative Models",
   NeurIPS 2020, arXiv:2006.09011.
.. [3] D. Kingma, T. Salimans, B. Poole, J. Ho, "Variational Diffusion Models", arXiv:2107.00630.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Protocol

import torch
from torch import Tensor

from ..errors import resolve_named

__all__ = ["SCHEDULES", "Schedule", "edm_hat_schedule", "edm_schedule", "get_schedule", "ncsn2_schedule"]


class Schedule(Protocol):
    """A training noise schedule: ``(x, *, generator, sigma_data) -> (sigma, loss_weight)``."""

    def __call__(self, x: Tensor, *, generator: torch.Generator, sigma_data: float) -> tuple[Tensor, Tensor]:
        """Draw ``(sigma, loss_weight)``, each (B,), for the batch ``x``."""
        ...


def _randn_like_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal of shape ``(B, 1, ..., 1)`` drawn on the generator's device, moved to ``x``."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def edm_schedule(
    x: Tensor,
    *,
    generator: torch.Generator,
    sigma_data: float,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> tuple[Tensor, Tensor]:
    r"""EDM training noise levels: log-normal sigma with the EDM loss weight.

    Parameters
    ----------
    x : Tensor
        Clean batch ``(B, C, H, W)``; only its batch size, ndim, dtype and device are used.
    generator : torch.Generator
        Source of randomness (one normal draw per sample).
    sigma_data : float
        Data standard deviation in the loss weight.
    sigma_min, sigma_max : float
        Clipping range of sigma.
    p_mean, p_std : float
        Mean and standard deviation of :math:`\ln \sigma`.

    Returns
    -------
    sigma, loss_weight : Tensor
        Both ``(B, 1, 1, 1)`` in ``x``'s dtype.

    Notes
    -----
    :math:`\ln \sigma \sim \mathcal{N}(P_{mean}, P_{std}^2)`, clipped to ``[sigma_min, sigma_max]``;
    :math:`\lambda(\sigma) = 1/\sigma^2 + 1/\sigma_d^2` (EDM [1]_, Table 1).
    """
    log_sigma = _randn_like_batch(x, generator) * p_std + p_mean
    sigma = torch.exp(log_sigma).clamp(sigma_min, sigma_max)
    loss_weight = 1 / sigma**2 + 1 / sigma_data**2
    return sigma, loss_weight


@lru_cache(maxsize=16)
def _edm_hat_table(
    sigma_data: float, sigma_min: float, sigma_max: float, p_mean: float, p_std: float
) -> tuple[Tensor, Tensor]:
    """SNR bins and per-bin weight corrections of :func:`edm_hat_schedule` (float64, CPU)."""
    snr_min, snr_max = 1 / sigma_max**2, 1 / sigma_min**2
    snrs = torch.logspace(math.log10(snr_min), math.log10(snr_max), 10000, dtype=torch.float64)
    p_snr = torch.exp(-((-torch.log(snrs) - 2 * p_mean) ** 2) / (8 * p_std**2)) / snrs
    effective = p_snr * (sigma_data**2 * snrs + 1)
    max_weight, argmax = effective.max(dim=0)
    corrections = torch.where(snrs < snrs[argmax], max_weight / effective, torch.ones_like(snrs))
    return snrs, corrections


def edm_hat_schedule(
    x: Tensor,
    *,
    generator: torch.Generator,
    sigma_data: float,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> tuple[Tensor, Tensor]:
    r"""EDM noise levels with loss weights raised at low SNR (the original's ``edm_hat_schedule``).

    Parameters are those of :func:`edm_schedule`.

    Returns
    -------
    sigma, loss_weight : Tensor
        Both ``(B, 1, 1, 1)`` in ``x``'s dtype.

    Notes
    -----
    sigma is drawn as in :func:`edm_schedule`. With :math:`s = 1/\sigma^2` (the SNR), the effective weight
    of a noise level is :math:`p(s) (\sigma_d^2 s + 1)` with
    :math:`p(s) = \exp(-(-\ln s - 2 P_{mean})^2 / (8 P_{std}^2)) / s`, tabulated on 10000
    geometric bins from :math:`1/\sigma_{max}^2` to :math:`1/\sigma_{min}^2`. Below the SNR of the maximal
    effective weight, the weight is multiplied by (max / effective), flattening the low-SNR side:
    :math:`\lambda = (\sigma_d^2 s + 1) \cdot \mathrm{corr}[\mathrm{digitize}(s)]`, the bin index clamped
    to the last bin as JAX's gather does. The table is computed in float64 (the original: float32).
    Note this weight is :math:`\sigma_d^2` times the EDM weight of :func:`edm_schedule`, as in the original.
    """
    sigma = torch.exp(_randn_like_batch(x, generator) * p_std + p_mean).clamp(sigma_min, sigma_max)
    bins, corrections = _edm_hat_table(float(sigma_data), float(sigma_min), float(sigma_max), p_mean, p_std)
    snr = 1 / sigma.double() ** 2
    idx = torch.bucketize(snr.cpu(), bins, right=True).clamp(max=len(bins) - 1)
    loss_weight = (snr * sigma_data**2 + 1) * corrections[idx].to(snr.device)
    return sigma, loss_weight.to(x.dtype)


def ncsn2_schedule(
    x: Tensor,
    *,
    generator: torch.Generator,
    sigma_data: float | None = None,
    sigma_min: float = 0.01,
    sigma_max: float = 80.0,
) -> tuple[Tensor, Tensor]:
    r"""NCSNv2-style log-uniform noise levels with low-discrepancy sampling and ELBO weight.

    Parameters
    ----------
    x : Tensor
        Clean batch ``(B, C, H, W)``; only its batch size, ndim, dtype and device are used.
    generator : torch.Generator
        Source of randomness (a single uniform draw for the whole batch).
    sigma_data : float, optional
        Ignored; accepted so that every schedule has the same signature.
    sigma_min, sigma_max : float
        Range of sigma (note the original's default ``sigma_min`` of 0.01 here).

    Returns
    -------
    sigma, loss_weight : Tensor
        Both ``(B, 1, 1, 1)`` in ``x``'s dtype.

    Notes
    -----
    :math:`t_b = (u + b / B) \bmod 1` with one :math:`u \sim U[0, 1)` (low-discrepancy sampling [3]_);
    :math:`\gamma = 2 \ln\sigma_{min} + t (2 \ln\sigma_{max} - 2 \ln\sigma_{min})`,
    :math:`\sigma = e^{\gamma/2}`, :math:`\lambda = 1/\sigma^2` [2]_.
    """
    del sigma_data
    batch = x.shape[0]
    u = torch.rand(1, generator=generator, device=generator.device, dtype=torch.float64).to(x.device)
    t = (u + torch.arange(batch, dtype=torch.float64, device=x.device) / batch) % 1
    gamma_min, gamma_max = 2 * math.log(sigma_min), 2 * math.log(sigma_max)
    gamma = gamma_min + t * (gamma_max - gamma_min)
    sigma = torch.exp(gamma / 2).reshape((batch,) + (1,) * (x.ndim - 1)).to(x.dtype)
    loss_weight = 1 / (sigma * sigma)
    return sigma, loss_weight


SCHEDULES: dict[str, Schedule] = {
    "edm": edm_schedule,
    "edmhat": edm_hat_schedule,
    "ncsn2": ncsn2_schedule,
}
"""Training schedules by the names the original code uses."""


def get_schedule(schedule: str | Schedule) -> Schedule:
    """Resolve a schedule name (``"edm"``, ``"edmhat"``, ``"ncsn2"``) or pass a callable through.

    Raises
    ------
    ConfigError
        For an unknown name; the message lists the choices.
    """
    return resolve_named(schedule, SCHEDULES, "training schedule")
