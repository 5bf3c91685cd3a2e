"""The diffusion samplers (probability-flow ODE).

The pieces are kept apart as in k-diffusion: a discretization returns the noise levels
(:func:`~napari_ctxseg.core.diffusion.discretization.get_sigmas` appends the final 0),
:func:`~napari_ctxseg.core.diffusion.gradient.dm_gradient` turns a
denoiser into the ODE's ``dx/dsigma``, and :func:`sample_steps` integrates it over a precomputed sigma
tensor, yielding after each step so that a caller can show progress and stop early (closing the generator
stops the work). :func:`sample` runs it to the end. Everything random comes from an explicit
``torch.Generator``.

Layouts: latents and denoised estimates are NCHW ``(B, C, H, W)`` (``C = 2`` flow channels (dy, dx) in
ctxseg); the batch holds the samples. Sigma tensors are 1-D float64 on the CPU.

References
----------
.. [1] T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based
   Generative Models", NeurIPS 2022, arXiv:2206.00364 (discretizations, Heun solver, churn).
.. [2] arXiv:2306.04848, the reference the original ctxseg code gives for its "edf" solver.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .discretization import Discretization, check_sigma_range, get_sigmas
from .gradient import ChurnFn, Denoiser, DMGradient, GradientFn, dm_gradient, resolve_churn
from .solvers import check_solver

__all__ = ["SamplerStep", "num_model_calls", "sample", "sample_steps"]


@dataclass(frozen=True, eq=False)
class SamplerStep:
    r"""Progress of a sampler after one step.

    Attributes
    ----------
    step : int
        Number of steps done, 1..``num_steps``.
    num_steps : int
        Total number of steps of the run.
    sigma : float
        Noise level of ``x`` after this step (0 after the last one).
    x : Tensor
        Current latent ``(B, C, H, W)``; after the last step, the samples. Do not modify in place.
    denoised : Tensor or None
        Denoised estimate :math:`\hat D` computed at the start of this step (None for a custom
        ``gradient_fn`` that is not a :class:`DMGradient`).
    model_calls : int
        Denoiser evaluations so far.
    """

    step: int
    num_steps: int
    sigma: float
    x: Tensor
    denoised: Tensor | None
    model_calls: int

    @property
    def done(self) -> bool:
        """Whether this is the last step."""
        return self.step == self.num_steps


def num_model_calls(solver: str, num_steps: int) -> int:
    """Denoiser evaluations of a run: N for euler and edf, 2N - 1 for heun, 1 for one_step.

    Raises
    ------
    ConfigError
        Unknown solver or ``num_steps < 1``.
    """
    check_solver(solver)
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if solver == "one_step":
        return 1
    if solver == "heun":
        return 2 * num_steps - 1
    return num_steps


def _initial_latent(
    x_init: Tensor | Sequence[int],
    sigma0: float,
    num_samples: int | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    if isinstance(x_init, Tensor):
        if x_init.ndim < 2:
            raise InputError(
                f"the initial latent must be batched (B, C, H, W), got shape {tuple(x_init.shape)}"
            )
        if num_samples is not None and num_samples != x_init.shape[0]:
            raise InputError(
                f"num_samples={num_samples} does not match the batch of the initial latent "
                f"{tuple(x_init.shape)}; the batch holds the samples"
            )
        return x_init
    shape = tuple(int(s) for s in x_init)
    n = 1 if num_samples is None else num_samples
    if n < 1 or len(shape) < 1 or any(s < 1 for s in shape):
        raise InputError(
            f"expected a per-sample shape such as (C, H, W) and num_samples >= 1, got "
            f"{shape} and {num_samples}"
        )
    if generator is None:
        raise ConfigError("a torch.Generator is needed to draw the initial latent (no global RNG is used)")
    z = torch.randn((n, *shape), generator=generator, device=generator.device, dtype=dtype)
    return (z * sigma0).to(device if device is not None else z.device)


@torch.no_grad()
def sample_steps(
    denoiser: Denoiser | None,
    x_init: Tensor | Sequence[int],
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    solver: Literal["euler", "heun", "edf", "one_step"] = "heun",
    discretization: str | Discretization = "edm",
    sigmas: Tensor | None = None,
    churn: Literal["none", "sde"] | ChurnFn = "none",
    gamma: float = math.sqrt(2) - 1,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    beta: float = 0.0,
    gradient_fn: GradientFn | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    inpaint: Tensor | None = None,
    inpaint_mask: Tensor | None = None,
    **model_kwargs: Any,
) -> Iterator[SamplerStep]:
    r"""Integrate the probability-flow ODE from noise to samples, yielding after every step.

    Parameters
    ----------
    denoiser : callable or None
        ``D(x, sigma, **model_kwargs)``; the gradient is ``dm_gradient(denoiser, beta)``. May be None
        when ``gradient_fn`` is given (not for ``one_step``).
    x_init : Tensor or sequence of int
        Either the initial latent ``(B, C, H, W)``, used **as is** (not multiplied by sigma, as in the
        original), or the shape of **one** sample ``(C, H, W)``: the latent is then
        ``sigmas[0] * N(0, I)`` of shape ``(num_samples, C, H, W)`` drawn from ``generator``.
    num_steps : int
        Number of steps N (ignored by ``one_step`` and when ``sigmas`` is given).
    sigma_min, sigma_max : float
        Range of the discretization (``one_step`` uses ``sigma_max`` only).
    solver : {"euler", "heun", "edf", "one_step"}
        See Notes.
    discretization : str or callable
        A name of :data:`DISCRETIZATIONS` or ``f(sigma_min, sigma_max, N)``.
    sigmas : Tensor, optional
        Precomputed noise levels ``(N + 1,)`` ending with 0 (as :func:`get_sigmas` returns); overrides
        ``discretization``, ``num_steps``, ``sigma_min`` and ``sigma_max``.
    churn : {"none", "sde"} or callable
        Stochastic churn before each step (:func:`sde_churn` with ``gamma``, ``S_min``, ``S_max``,
        ``S_noise`` and ``generator``), or ``f(x, sigma) -> (x_hat, sigma_hat)``.
    beta : float
        Passed to :func:`dm_gradient`.
    gradient_fn : callable, optional
        A custom ``g(x, sigma, *, inpaint, inpaint_mask, **model_kwargs)`` used instead of
        ``dm_gradient(denoiser, beta)``; the steps then report ``denoised=None`` unless it is a
        :class:`DMGradient`.
    num_samples : int, optional
        Samples to draw when ``x_init`` is a shape (default 1); with a latent, None or its batch size.
    generator : torch.Generator, optional
        Source of the initial latent and of the churn noise; required when either is drawn.
    dtype, device
        Of a drawn latent (default float32, the generator's device).
    inpaint, inpaint_mask : Tensor, optional
        Known values and where they apply (bool, broadcastable to the latent); see :class:`DMGradient`.
    **model_kwargs
        Passed to every denoiser call (e.g. image features).

    Yields
    ------
    SamplerStep
        After each step; the last one holds the samples in ``x``. Closing the generator (or breaking out
        of the loop) stops the work: no further denoiser call is made.

    Raises
    ------
    ConfigError
        Unknown solver, discretization or churn; bad sigma range; a missing generator.
    InputError
        An initial latent that does not match ``num_samples``, bad inpainting arguments.

    Notes
    -----
    With :math:`\sigma_0 > ... > \sigma_{N-1} > \sigma_N = 0` and :math:`g` the gradient, each step
    :math:`i` takes (after churn, :math:`(x, \sigma_i) \to (\hat x, \hat\sigma)`)
    :math:`d = g(\hat x, \hat\sigma)` and then :math:`x \leftarrow \hat x + (\sigma_{i+1} -
    \hat\sigma)\, d'` with

    - ``euler``: :math:`d' = d`;
    - ``heun``: :math:`d' = (d + g(\hat x + (\sigma_{i+1} - \hat\sigma) d, \sigma_{i+1}))/2`, except on
      the last step (:math:`\sigma_{i+1} = 0`) where :math:`d' = d`: 2N - 1 denoiser calls;
    - ``edf``: :math:`d' = 2 d - d'_{prev}` from the second step on, where :math:`d'_{prev}` is the
      previous step's **already extrapolated** :math:`d'` (a recursion). This is what the original code
      does, not what its docstring says (extrapolation from the previous raw gradient); the parity fixtures
      confirm the recursive form;
    - ``one_step``: :math:`x = \hat D(x, \sigma_{max})`, a single denoiser call, which is what the
      original ``scripts/inference.py`` does with ``nsteps=1`` (its default fast inference). Mathematically
      an euler step from ``sigma_max`` to 0, without its cancellation error.

    The step sizes are computed in float64 from the sigma tensor; the latent keeps its dtype. The sampler
    runs under ``torch.no_grad()``; a custom ``gradient_fn`` that needs autograd must enable it itself.
    Unlike the original, all samples are one batch (one denoiser call per evaluation for all of them).
    """
    check_solver(solver)
    if gradient_fn is None:
        if denoiser is None:
            raise ConfigError("give a denoiser or a gradient_fn")
        grad: DMGradient | GradientFn = dm_gradient(denoiser, beta=beta)
    else:
        grad = gradient_fn
    if solver == "one_step":
        if denoiser is None:
            raise ConfigError("solver='one_step' needs a denoiser")
        grad = dm_gradient(denoiser, beta=beta)
        sigma_seq = torch.tensor([float(sigma_max), 0.0], dtype=torch.float64)
        check_sigma_range(sigma_min, sigma_max, 1)
    elif sigmas is not None:
        sigma_seq = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        if len(sigma_seq) < 2 or sigma_seq[-1] != 0 or not bool(torch.all(sigma_seq[:-1] > 0)):
            raise ConfigError(
                f"sigmas must be N >= 1 positive values followed by 0, got {sigma_seq.tolist()}"
            )
    else:
        sigma_seq = get_sigmas(discretization, sigma_min, sigma_max, num_steps)

    sig = sigma_seq.tolist()
    n_steps = len(sig) - 1
    x = _initial_latent(x_init, sig[0], num_samples, generator, dtype, device)
    churn_fn = resolve_churn(churn, generator, gamma, S_min, S_max, S_noise)
    kwargs: dict[str, Any] = dict(model_kwargs)
    if inpaint is not None or inpaint_mask is not None:
        kwargs.update(inpaint=inpaint, inpaint_mask=inpaint_mask)

    def evaluate(x_: Tensor, s_: float) -> tuple[Tensor, Tensor | None]:
        if isinstance(grad, DMGradient):
            return grad.evaluate(x_, s_, **kwargs)
        return grad(x_, s_, **kwargs), None

    if solver == "one_step":
        if churn_fn is not None:
            raise ConfigError("solver='one_step' does not support churn; use churn='none'")
        _, denoised = evaluate(x, sig[0])
        assert denoised is not None  # one_step always evaluates a DMGradient (set above)
        yield SamplerStep(1, 1, 0.0, denoised, denoised, 1)
        return

    calls = 0
    d_prev: Tensor | None = None
    for i in range(n_steps):
        s_cur, s_next = sig[i], sig[i + 1]
        x_hat, s_hat = (x, s_cur) if churn_fn is None else churn_fn(x, s_cur)
        d, denoised = evaluate(x_hat, s_hat)
        calls += 1
        if solver == "edf" and d_prev is not None:
            d = 2 * d - d_prev
        elif solver == "heun" and s_next > 0:
            x_euler = x_hat + (s_next - s_hat) * d
            d_euler, _ = evaluate(x_euler, s_next)
            calls += 1
            d = (d + d_euler) / 2
        x = x_hat + (s_next - s_hat) * d
        d_prev = d
        yield SamplerStep(i + 1, n_steps, s_next, x, denoised, calls)


def sample(denoiser: Denoiser | None, x_init: Tensor | Sequence[int], **kwargs: Any) -> Tensor:
    """Run :func:`sample_steps` to the end and return the samples ``(B, C, H, W)``.

    Takes the same arguments as :func:`sample_steps`.
    """
    last: SamplerStep | None = None
    for last in sample_steps(denoiser, x_init, **kwargs):  # noqa: B007
        pass
    if last is None:  # pragma: no cover - sample_steps always yields at least once
        raise RuntimeError("the sampler yielded no step")
    return last.x
