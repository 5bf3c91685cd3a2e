"""EDM preconditioning and the denoising loss.

A denoiser ``D(x, sigma)`` is built from a raw network ``F(x_in, c_noise, **kwargs)`` as in Karras et al.
(EDM, 2022), with the scaling functions of the original ctxseg code (see :func:`edm_scalings` for the one
place where they differ from the paper). :func:`edm_loss` draws noise levels and loss weights from a
training schedule (:mod:`napari_ctxseg.core.diffusion.train_schedules`) and weighs the denoiser's error.

Layouts: tensors are NCHW ``(B, C, H, W)``; a per-sample sigma is ``(B,)`` or ``(B, 1, 1, 1)``.

References
----------
.. [1] T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based
   Generative Models", NeurIPS 2022, arXiv:2206.00364.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .train_schedules import Schedule, get_schedule

__all__ = ["EDMDenoiser", "edm_loss", "edm_precond", "edm_scalings"]

ModelFn = Callable[..., Tensor]
"""A raw network ``F(x_in, c_noise, **kwargs) -> Tensor`` with ``c_noise`` of shape ``(B,)``."""


# --------------------------------------------------------------------------------------------------------
# Preconditioning
# --------------------------------------------------------------------------------------------------------


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Preconditioning coefficients of the original ctxseg ``edm_precond``.

    Parameters
    ----------
    sigma : Tensor
        Noise levels, any shape; the coefficients are computed in its dtype.
    sigma_data : float
        Standard deviation of the clean data the network was trained with (1.0 for the released ctxseg
        models at inference; the original code's default 0.5 is not assumed here).

    Returns
    -------
    c_skip, c_out, c_in, c_noise : Tensor
        Each of the shape and dtype of ``sigma``.

    Notes
    -----
    With :math:`\sigma_d` = ``sigma_data``:

    .. math::

        c_{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2}, \quad
        c_{out} = \sqrt{\frac{\sigma \sigma_d}{\sigma^2 + \sigma_d^2}}, \quad
        c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}}, \quad
        c_{noise} = \tfrac{1}{4} \ln \sigma .

    ``c_out`` is the **original ctxseg's**, the square root of the whole ratio. EDM [1]_ uses
    :math:`\sigma \sigma_d / \sqrt{\sigma^2 + \sigma_d^2}` instead; the ratio of the two is
    :math:`\sqrt{\sigma \sigma_d}`, so they agree only where :math:`\sigma \sigma_d = 1`.
    Checkpoints of ctxseg were trained with this ``c_out``, so it is kept.
    """
    sigma_sq = sigma * sigma
    var = sigma_sq + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = torch.sqrt(sigma * sigma_data / var)
    c_in = 1 / torch.sqrt(var)
    c_noise = torch.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def _per_sample_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return sigma as a ``(B,)`` tensor in ``x``'s dtype and device (a scalar is repeated)."""
    if x.ndim < 1:
        raise InputError(f"expected a batched tensor (B, C, H, W), got shape {tuple(x.shape)}")
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    batch = x.shape[0]
    if s.numel() == 1:
        return s.reshape(1).expand(batch)
    if s.numel() != batch or (s.ndim > 1 and any(d != 1 for d in s.shape[1:])):
        raise InputError(
            f"sigma must be a scalar, (B,) or (B, 1, 1, 1) with B = {batch}; got shape {tuple(s.shape)}"
        )
    return s.reshape(batch)


class EDMDenoiser:
    """Preconditioned denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``.

    A stateless wrapper around a raw network; it holds no tensors, so the same instance can be used
    from several threads.

    Parameters
    ----------
    model_fn : callable
        ``F(x_in, c_noise, **kwargs) -> Tensor`` with ``x_in`` of shape ``(B, C, H, W)`` and ``c_noise`` of
        shape ``(B,)``; returns ``(B, C, H, W)``. Typically an ``nn.Module`` or its ``predict`` method.
    sigma_data : float
        Data standard deviation used by the scalings (stored in the checkpoint config; the original
        inference script uses 1.0).

    Raises
    ------
    ConfigError
        If ``sigma_data`` is not a positive finite number.

    Notes
    -----
    ``__call__(x, sigma, *, x_cond=None, **kwargs)``: ``x`` is NCHW ``(B, C, H, W)``; ``sigma`` is a Python
    float, a one-element tensor (repeated over the batch), or one value per sample (``(B,)`` or
    ``(B, 1, 1, 1)``). The coefficients of :func:`edm_scalings` are computed in ``x``'s dtype, as the
    original does. ``x_cond`` (optional, NCHW) is concatenated to ``c_in x`` along the channels before
    ``F``; it is not scaled. Extra keyword arguments go to ``F``.

    Examples
    --------
    >>> import torch
    >>> D = EDMDenoiser(lambda x_in, c_noise: torch.zeros_like(x_in), sigma_data=1.0)
    >>> D(torch.ones(2, 2, 4, 4), 1.0)[0, 0, 0, 0].item()  # c_skip = 1 / 2 when sigma = sigma_data
    0.5
    """

    def __init__(self, model_fn: ModelFn, *, sigma_data: float) -> None:
        if not callable(model_fn):
            raise ConfigError(f"model_fn must be callable, got {type(model_fn).__name__}")
        if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
            raise ConfigError(f"sigma_data must be a positive finite number, got {sigma_data!r}")
        self.model_fn = model_fn
        self.sigma_data = float(sigma_data)

    def __repr__(self) -> str:
        return f"EDMDenoiser(model_fn={self.model_fn!r}, sigma_data={self.sigma_data})"

    def __call__(
        self, x: Tensor, sigma: float | Tensor, *, x_cond: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """``D(x, sigma)`` for ``x`` (B, C, H, W) and ``sigma`` a float or (B,); extra keywords go to F."""
        sigma_b = _per_sample_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma_b, self.sigma_data)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_in = c_in.reshape(shape) * x
        if x_cond is not None:
            x_in = torch.cat([x_in, x_cond], dim=1)
        F_x = self.model_fn(x_in, c_noise, **kwargs)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * F_x


def edm_precond(model_fn: ModelFn, *, sigma_data: float) -> EDMDenoiser:
    """Wrap a raw network into a preconditioned denoiser (the original's ``edm_precond``).

    Same as ``EDMDenoiser(model_fn, sigma_data=sigma_data)``; see :class:`EDMDenoiser`.
    """
    return EDMDenoiser(model_fn, sigma_data=sigma_data)


# --------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------


def edm_loss(
    denoiser: Callable[..., Tensor],
    x_gt: Tensor,
    *,
    generator: torch.Generator,
    sigma_data: float,
    schedule: Literal["edm", "edmhat", "ncsn2"] | Schedule = "edm",
    weighting: Literal["schedule", "unit"] = "schedule",
    weight: Tensor | None = None,
    **model_kwargs: Any,
) -> Tensor:
    r"""Weighted denoising loss of one batch (the training loss).

    Parameters
    ----------
    denoiser : callable
        ``D(x, sigma, **model_kwargs)``, e.g. an :class:`EDMDenoiser`; ``sigma`` is ``(B, 1, 1, 1)``.
    x_gt : Tensor
        Clean targets ``(B, C, H, W)`` (flows in ctxseg).
    generator : torch.Generator
        Draws sigma (first) and then the noise ``n``.
    sigma_data : float
        Passed to the schedule's loss weight. (The original's ``Precond`` left the schedule at its own
        default 0.5 whatever the preconditioner used; pass the value you mean.)
    schedule : {"edm", "edmhat", "ncsn2"} or callable
        Training noise schedule (see :mod:`~napari_ctxseg.core.diffusion.train_schedules`).
    weighting : {"schedule", "unit"}
        ``"schedule"``: :math:`\lambda` is the schedule's loss weight; ``"unit"``: :math:`\lambda = 1 /
        c_{out}^2` (:func:`edm_scalings`), a unit-variance target for the raw network at every sigma.
    weight : Tensor, optional
        Per-pixel weights ``w`` broadcastable to ``x_gt`` (e.g. ``(B, 1, H, W)``, 0 on unannotated pixels).
    **model_kwargs
        Passed to the denoiser (e.g. the image).

    Returns
    -------
    Tensor
        Scalar loss (differentiable).

    Raises
    ------
    ConfigError
        For an unknown schedule or weighting; the message lists the choices.

    Notes
    -----
    :math:`(\sigma, \lambda) \sim` schedule, :math:`n \sim \mathcal{N}(0, I)`, :math:`e = \tfrac12
    \lambda (D(x + \sigma n, \sigma) - x)^2`; without ``weight``, :math:`L = \mathrm{mean}(e)` over all
    elements, with it :math:`L = \sum w e / \max(1, C \sum w)` (the mean over the weighted pixels of
    the ``C`` channels).

    Examples
    --------
    >>> x = torch.ones(2, 2, 3, 3)
    >>> zero = lambda x, sigma: torch.zeros_like(x)
    >>> def fixed(x, *, generator, sigma_data):  # sigma 2, loss weight 4
    ...     return torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 4.0)
    >>> edm_loss(zero, x, generator=torch.Generator(), sigma_data=1.0, schedule=fixed).item()
    2.0
    >>> w = torch.zeros(2, 1, 3, 3)
    >>> w[0] = 1  # only the first sample counts
    >>> edm_loss(zero, x, generator=torch.Generator(), sigma_data=1.0, schedule=fixed, weight=w).item()
    2.0
    """
    schedule_fn = get_schedule(schedule)
    if weighting not in ("schedule", "unit"):
        raise ConfigError(f"unknown weighting {weighting!r}; expected 'unit' or 'schedule'")
    sigma, loss_weight = schedule_fn(x_gt, generator=generator, sigma_data=sigma_data)
    if weighting == "unit":
        _, c_out, _, _ = edm_scalings(sigma, sigma_data)
        loss_weight = 1.0 / c_out**2
    noise = torch.randn(x_gt.shape, generator=generator, device=generator.device, dtype=x_gt.dtype)
    noise = noise.to(x_gt.device)
    denoised = denoiser(x_gt + sigma * noise, sigma, **model_kwargs)
    if weight is None:
        return (0.5 * loss_weight * (denoised - x_gt) ** 2).mean()
    return (0.5 * loss_weight * weight * (denoised - x_gt) ** 2).sum() / (
        weight.sum() * x_gt.shape[1]
    ).clamp_min(1.0)
