"""The denoising gradient of the probability-flow ODE, and stochastic churn.

:func:`dm_gradient` turns a denoiser ``D(x, sigma)`` into the ODE's ``dx/dsigma`` (with the original's
inpainting and ``beta`` options); :func:`sde_churn` adds noise before a step as in EDM [1]_. The samplers of
:mod:`napari_ctxseg.core.diffusion.sampling` integrate the gradient. Layouts: NCHW ``(B, C, H, W)``.
Everything random comes from an explicit ``torch.Generator``.

References
----------
.. [1] T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based
   Generative Models", NeurIPS 2022, arXiv:2206.00364 (discretizations, Heun solver, churn).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, InputError

__all__ = ["CHURNS", "DMGradient", "dm_gradient", "resolve_churn", "sde_churn"]

Denoiser = Callable[..., Tensor]
"""``D(x, sigma, **kwargs) -> Tensor``: the denoised estimate of ``x`` (same shape)."""
GradientFn = Callable[..., Tensor]
"""``g(x, sigma, *, inpaint=None, inpaint_mask=None, **kwargs) -> Tensor``: ``dx/dsigma`` of the ODE."""
ChurnFn = Callable[[Tensor, float], tuple[Tensor, float]]
"""``f(x, sigma) -> (x_hat, sigma_hat)``."""

CHURNS = ("none", "sde")


def _sigma_like(sigma: float | Tensor, x: Tensor) -> float | Tensor:
    """A Python float stays a float; a tensor becomes a per-sample ``(B, 1, ..., 1)`` tensor of x's dtype."""
    if not isinstance(sigma, Tensor):
        return float(sigma)
    s = sigma.to(x.device, x.dtype)
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() != x.shape[0]:
        raise InputError(
            f"sigma must be a scalar or have one value per sample (B = {x.shape[0]}), "
            f"got shape {tuple(s.shape)}"
        )
    return s.reshape((-1,) + (1,) * (x.ndim - 1))


class DMGradient:
    r"""The probability-flow ODE gradient ``dx/dsigma`` of a denoiser, with optional inpainting.

    Parameters
    ----------
    denoiser : callable
        ``D(x, sigma, **kwargs)``, e.g. :class:`napari_ctxseg.core.diffusion.edm.EDMDenoiser`.
    beta : float
        Extra weight on the denoised estimate (0 gives the plain ODE).

    Notes
    -----
    ``g(x, sigma, *, inpaint=None, inpaint_mask=None, **kwargs)``:

    .. math:: g = \frac{x}{\sigma} - \hat D \left(\frac{1}{\sigma} + \beta\right), \qquad
              \hat D = \mathrm{where}(m, x_{inpaint}, D(x, \sigma))

    with the mask :math:`m` = ``inpaint_mask`` (bool, broadcastable to x) if given, else
    :math:`\hat D = D`. ``sigma`` is a Python float or a tensor with one value or one per sample.
    :meth:`evaluate` returns :math:`(g, \hat D)`.
    """

    def __init__(self, denoiser: Denoiser, *, beta: float = 0.0) -> None:
        if not callable(denoiser):
            raise ConfigError(f"denoiser must be callable, got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"DMGradient(denoiser={self.denoiser!r}, beta={self.beta})"

    def evaluate(
        self,
        x: Tensor,
        sigma: float | Tensor,
        *,
        inpaint: Tensor | None = None,
        inpaint_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(g, D_hat)``; see the class notes."""
        if (inpaint is None) != (inpaint_mask is None):
            raise InputError("inpaint and inpaint_mask must be given together (got only one of them)")
        denoised = self.denoiser(x, sigma, **kwargs)
        if inpaint is not None and inpaint_mask is not None:
            denoised = torch.where(inpaint_mask.to(torch.bool), inpaint.to(denoised.dtype), denoised)
        s = _sigma_like(sigma, x)
        w1 = 1 / s
        w2 = w1 + self.beta
        return x * w1 - denoised * w2, denoised

    def __call__(self, x: Tensor, sigma: float | Tensor, **kwargs: Any) -> Tensor:
        """The gradient ``g`` alone (see :meth:`evaluate`)."""
        return self.evaluate(x, sigma, **kwargs)[0]


def dm_gradient(denoiser: Denoiser, beta: float = 0.0) -> DMGradient:
    """ODE gradient of a denoiser (the original's ``dm_gradient``); see :class:`DMGradient`."""
    return DMGradient(denoiser, beta=beta)


def sde_churn(
    x: Tensor,
    sigma: float,
    *,
    generator: torch.Generator,
    gamma: float = math.sqrt(2) - 1,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
) -> tuple[Tensor, float]:
    r"""Temporarily raise the noise level of ``x`` (EDM's stochastic "churn").

    Parameters
    ----------
    x : Tensor
        Current latent at noise level ``sigma``.
    sigma : float
        Current noise level.
    generator : torch.Generator
        Source of the added noise.
    gamma : float
        Relative increase of sigma.
    S_min, S_max : float
        Churn only when ``S_min <= sigma <= S_max``.
    S_noise : float
        Scale of the added noise.

    Returns
    -------
    x_hat, sigma_hat : Tensor, float

    Notes
    -----
    :math:`\hat\sigma = \sigma (1 + \gamma)`,
    :math:`\hat x = x + S_{noise} \sqrt{\hat\sigma^2 - \sigma^2}\, \epsilon`,
    :math:`\epsilon \sim \mathcal{N}(0, I)` [1]_. The original raised a TypeError here and would
    have used numpy's global RNG; this one draws from ``generator`` in ``x``'s dtype.
    """
    if not (S_min <= sigma <= S_max and gamma > 0):
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return x + S_noise * math.sqrt(sigma_hat**2 - sigma**2) * eps, sigma_hat


def resolve_churn(
    churn: Literal["none", "sde"] | ChurnFn,
    generator: torch.Generator | None,
    gamma: float,
    S_min: float,
    S_max: float,
    S_noise: float,
) -> ChurnFn | None:
    """The churn of a sampler: a callable passes through, ``"none"`` gives None, ``"sde"`` :func:`sde_churn`.

    Raises
    ------
    ConfigError
        For an unknown name (the message lists :data:`CHURNS`), or ``"sde"`` without a generator.
    """
    if callable(churn):
        return churn
    if churn == "none":
        return None
    if churn == "sde":
        if generator is None:
            raise ConfigError("churn='sde' needs a torch.Generator (no global RNG is used)")

        def _sde(x: Tensor, sigma: float) -> tuple[Tensor, float]:
            return sde_churn(
                x, sigma, generator=generator, gamma=gamma, S_min=S_min, S_max=S_max, S_noise=S_noise
            )

        return _sde
    raise ConfigError(f"unknown churn {churn!r}; expected one of {list(CHURNS)} or a callable f(x, sigma)")
