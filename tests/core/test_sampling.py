"""Tests of the sigma discretizations (core.discretization), dm_gradient and the samplers (core.sampling)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctxseg.core.diffusion.discretization import (
    DISCRETIZATIONS,
    edm_sigmas,
    get_sigmas,
    iddpm_original_sigmas,
    iddpm_sigmas,
)
from napari_ctxseg.core.diffusion.gradient import dm_gradient, sde_churn
from napari_ctxseg.core.diffusion.sampling import SamplerStep, num_model_calls, sample, sample_steps
from napari_ctxseg.core.errors import ConfigError, InputError

PARITY = Path(__file__).resolve().parents[2].parent / "shared" / "parity"
SAMPLER_JSON = PARITY / "sampler" / "sampler.json"
SAMPLER_NPZ = PARITY / "sampler" / "sampler.npz"
RUNS: dict[str, dict] = json.loads(SAMPLER_JSON.read_text())["runs"] if SAMPLER_JSON.exists() else {}


def nchw(a: np.ndarray) -> torch.Tensor:
    """NHWC fixture array -> NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def linear_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The fixtures' "linear" denoiser, exact for data ~ N(0, 1)."""
    return x / (1 + sigma**2)


def nonlinear_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The fixtures' "nonlinear" denoiser."""
    return x / (1 + sigma**2) + 0.25 * torch.tanh(x) * sigma / (1 + sigma**2)


DENOISERS = {"linear": linear_denoiser, "nonlinear": nonlinear_denoiser}


def halving(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The fixtures' custom discretization sigma_k = 80 / 2**k, k < n."""
    return 80.0 / 2.0 ** np.arange(n)


class Counting:
    """A denoiser that counts its calls and records the sigmas it is called with."""

    def __init__(self, fn: Callable[..., torch.Tensor] = nonlinear_denoiser) -> None:
        self.fn = fn
        self.sigmas: list[float] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: float, **kwargs: object) -> torch.Tensor:
        self.sigmas.append(sigma)
        self.inputs.append(x)
        return self.fn(x, sigma)


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not SAMPLER_NPZ.exists():
        pytest.skip(f"parity fixtures not found at {SAMPLER_NPZ}")
    with np.load(SAMPLER_NPZ) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------- discretizations


def test_sigma_steps_parity(fx: dict[str, np.ndarray]) -> None:
    keys = [k for k in fx if k.startswith("sigma_steps.")]
    assert len(keys) == 10
    for key in keys:
        _, disc, n = key.split(".")
        fn = {"iddpm": "iddpm_original", "halving": halving}.get(disc, disc)
        sig = get_sigmas(fn, 0.002, 80.0, int(n[1:]))
        assert sig.dtype == torch.float64 and sig[-1] == 0, key
        np.testing.assert_allclose(sig[:-1].numpy(), fx[key], rtol=1e-12, atol=0, err_msg=key)


def test_iddpm_original_reproduces_known_issue() -> None:
    expected = [71.2912, 13.343, 7.2458, 4.9863, 3.7551, 2.9915]
    np.testing.assert_allclose(iddpm_original_sigmas(0.002, 80.0, 6).numpy(), expected, atol=1e-4)
    assert iddpm_original_sigmas(0.002, 80.0, 18)[-1].item() == pytest.approx(9.542224229328852, rel=1e-12)


@pytest.mark.parametrize("n", [2, 6, 18, 40])
def test_iddpm_fixed_follows_the_edm_paper(n: int) -> None:
    # EDM paper, Table 1 (iDDPM column), written independently in numpy: u_M = 0,
    # u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C1) - 1), abar_j = sin^2(pi/2 j / (M (C2 + 1)));
    # t_i = u_{floor(j0 + (j1 - j0) / (N - 1) * i + 1/2)} between the first level <= sigma_max (j0)
    # and the last level >= sigma_min (j1).
    M, C1, C2 = 1000, 0.001, 0.008
    abar = np.sin(0.5 * np.pi * np.arange(M + 1) / M / (C2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C1) - 1)
    j0 = int(np.argmax(u <= 80.0))
    j1 = int(np.nonzero(u >= 0.002)[0][-1])
    t = u[np.floor(j0 + (j1 - j0) / (n - 1) * np.arange(n) + 0.5).astype(int)]
    got = iddpm_sigmas(0.002, 80.0, n).numpy()
    np.testing.assert_allclose(got, t, rtol=1e-12)
    assert got[0] <= 80 and got[-1] == pytest.approx(u[j1]) and got[-1] < 0.01
    assert np.all(np.diff(got) < 0)


@pytest.mark.parametrize("name", ["edm", "vp", "ve", "iddpm"])
def test_discretizations_span_the_range(name: str) -> None:
    sig = DISCRETIZATIONS[name](0.002, 80.0, 12)
    assert sig.shape == (12,) and sig.dtype == torch.float64
    assert torch.all(torch.diff(sig) < 0)
    if name != "iddpm":  # iddpm uses its own admissible levels inside the range
        assert sig[0].item() == pytest.approx(80.0, rel=1e-12)
        assert sig[-1].item() == pytest.approx(0.002, rel=1e-9)


def test_edm_sigmas_closed_form() -> None:
    rho = 7.0
    sig = edm_sigmas(0.002, 80.0, 5, rho=rho)
    ramp = np.linspace(80 ** (1 / rho), 0.002 ** (1 / rho), 5)
    np.testing.assert_allclose(sig.numpy() ** (1 / rho), ramp, rtol=1e-13)


def test_discretization_errors_list_choices() -> None:
    with pytest.raises(ConfigError, match=r"'edm'.*'iddpm'.*'iddpm_original'.*'ve'.*'vp'"):
        get_sigmas("karras", 0.002, 80.0, 6)
    with pytest.raises(ConfigError, match="sigma_min"):
        get_sigmas("edm", 80.0, 0.002, 6)
    with pytest.raises(ConfigError, match="num_steps"):
        get_sigmas("edm", 0.002, 80.0, 0)
    with pytest.raises(ConfigError, match="must return 3"):
        get_sigmas(lambda a, b, n: [80.0, 1.0], 0.002, 80.0, 3)


# ------------------------------------------------------------------------------------- dm_gradient


@pytest.mark.parametrize("beta", [0, 0.5])
@pytest.mark.parametrize("inpaint", [False, True])
def test_dm_gradient_parity(fx: dict[str, np.ndarray], beta: float, inpaint: bool) -> None:
    x = nchw(fx["input.x_grad"])
    kwargs = (
        dict(inpaint=nchw(fx["input.inpaint"]), inpaint_mask=nchw(fx["input.inpaint_mask"]))
        if inpaint
        else {}
    )
    ref = np.moveaxis(fx[f"output.dm_gradient{'_inpaint' if inpaint else ''}.beta{beta}.sigma3"], -1, 1)
    g = dm_gradient(nonlinear_denoiser, beta)(x, 3.0, **kwargs)
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_dm_gradient_closed_form_and_inpaint() -> None:
    x = torch.linspace(-2, 2, 16).reshape(1, 1, 4, 4)
    g, denoised = dm_gradient(linear_denoiser, beta=0.5).evaluate(x, 2.0)
    torch.testing.assert_close(g, x / 2 - x / 5 * (1 / 2 + 0.5))
    torch.testing.assert_close(denoised, x / 5)
    mask = x > 0
    g2, d2 = dm_gradient(linear_denoiser).evaluate(x, 2.0, inpaint=torch.ones_like(x), inpaint_mask=mask)
    torch.testing.assert_close(d2, torch.where(mask, 1.0, x / 5))
    torch.testing.assert_close(g2, (x - d2) / 2)
    # A per-sample sigma vector.
    xb = torch.ones(2, 1, 2, 2)
    gb = dm_gradient(linear_denoiser)(xb, torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
    torch.testing.assert_close(gb[:, 0, 0, 0], torch.tensor([0.5, 0.4]))
    with pytest.raises(InputError, match="together"):
        dm_gradient(linear_denoiser)(x, 2.0, inpaint_mask=mask)


# ------------------------------------------------------------------------------------ sampler parity


def test_every_sampler_run_is_covered() -> None:
    if not RUNS:
        pytest.skip("parity fixtures not found")
    assert len(RUNS) == 30


@pytest.mark.parametrize("name", sorted(RUNS))
def test_sampler_parity(fx: dict[str, np.ndarray], name: str) -> None:
    run = RUNS[name]
    n = run["num_steps"]
    disc = run["discretization"]
    if disc.startswith("sigma_k"):
        disc, sigma0 = halving, 80.0
    else:
        sigma0 = 80.0 if run["latent"].endswith("* 80") else float(fx[f"sigma_steps.{disc}.n{n}"][0])
        disc = "iddpm_original" if disc == "iddpm" else disc
    latent = nchw(fx["input.z"]) * sigma0
    kwargs = {}
    if "kwargs" in run:
        kwargs = dict(inpaint=nchw(fx["input.inpaint"]), inpaint_mask=nchw(fx["input.inpaint_mask"]))
    denoiser = Counting(DENOISERS[run["denoiser"]])
    out = sample(
        denoiser,
        latent,
        num_steps=n,
        solver=run["solver"],
        discretization=disc,
        sigma_min=run.get("sigma_min", 0.002),
        sigma_max=run.get("sigma_max", 80.0),
        **kwargs,
    )
    ref = np.moveaxis(fx[f"output.{name}"], -1, 1)
    atol = 1e-6 * latent.abs().max().item() + 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=atol)
    assert len(denoiser.sigmas) == num_model_calls(run["solver"], n)


def test_one_step_is_the_inference_default(fx: dict[str, np.ndarray]) -> None:
    # scripts/inference.py with nsteps=1: D(80 z, 80) once; equal to a 1-step euler run up to cancellation.
    latent = nchw(fx["input.z"]) * 80.0
    denoiser = Counting()
    out = sample(denoiser, latent, solver="one_step", sigma_max=80.0)
    torch.testing.assert_close(out, nonlinear_denoiser(latent, 80.0), rtol=0, atol=0)
    assert denoiser.sigmas == [80.0]
    ref = np.moveaxis(fx["output.nonlinear.euler.halving.n1"], -1, 1)
    np.testing.assert_allclose(
        out.numpy(), ref, rtol=0, atol=1e-6 * latent.abs().max().item() + 1e-4 * np.abs(ref).max()
    )


# ---------------------------------------------------------------------------------- sampler behaviour


@pytest.mark.parametrize(("solver", "calls"), [("euler", 6), ("edf", 6), ("heun", 11), ("one_step", 1)])
def test_model_call_count(solver: str, calls: int) -> None:
    denoiser = Counting()
    steps = list(sample_steps(denoiser, torch.ones(1, 2, 4, 4), num_steps=6, solver=solver))
    assert num_model_calls(solver, 6) == calls == len(denoiser.sigmas) == steps[-1].model_calls
    assert [s.step for s in steps] == list(range(1, len(steps) + 1)) and steps[-1].done
    assert steps[-1].sigma == 0.0 and all(s.num_steps == len(steps) for s in steps)


def test_steps_report_sigma_x_and_denoised() -> None:
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
    sig = get_sigmas("edm", 0.002, 80.0, 4)
    steps = list(sample_steps(nonlinear_denoiser, x0, num_steps=4, solver="euler"))
    assert [s.sigma for s in steps] == pytest.approx(sig[1:].tolist())
    torch.testing.assert_close(steps[0].denoised, nonlinear_denoiser(x0, 80.0))
    torch.testing.assert_close(steps[0].x, x0 + (sig[1].item() - 80.0) * (x0 - steps[0].denoised) / 80.0)
    assert isinstance(steps[0], SamplerStep)


@pytest.mark.parametrize(("solver", "calls_after_2"), [("euler", 2), ("heun", 4), ("edf", 2)])
def test_closing_the_generator_stops_the_work(solver: str, calls_after_2: int) -> None:
    denoiser = Counting()
    it = sample_steps(denoiser, torch.ones(1, 2, 4, 4), num_steps=10, solver=solver)
    next(it)
    next(it)
    it.close()
    assert len(denoiser.sigmas) == calls_after_2
    with pytest.raises(StopIteration):
        next(it)


def test_seeded_latent_is_deterministic() -> None:
    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        denoiser = Counting()
        out = sample(
            denoiser,
            (2, 4, 4),
            num_samples=3,
            num_steps=3,
            solver="heun",
            generator=torch.Generator().manual_seed(seed),
        )
        return out, denoiser.inputs[0]

    a, first = run(5)
    b, _ = run(5)
    c, _ = run(6)
    assert a.shape == (3, 2, 4, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    expected = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(5)) * 80.0
    torch.testing.assert_close(first, expected, rtol=0, atol=0)  # N(0, 1) * sigma_max, batch = samples


def test_samples_in_a_batch_are_independent() -> None:
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 80
    batch = sample(nonlinear_denoiser, z, num_steps=5, solver="edf")
    for i in range(3):
        torch.testing.assert_close(
            batch[i : i + 1], sample(nonlinear_denoiser, z[i : i + 1], num_steps=5, solver="edf")
        )


def test_heun_converges_to_the_exact_ode_solution() -> None:
    # Data ~ N(0, 1): D = x / (1 + s^2) is exact and the ODE dx/ds = x s / (1 + s^2) gives
    # x(0) = x(s0) / sqrt(1 + s0^2).
    z = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    exact = z / math.sqrt(1 + 80.0**2)
    exact_max = exact.abs().max().item()

    def err(solver: str, n: int) -> float:
        return (sample(linear_denoiser, z, num_steps=n, solver=solver) - exact).abs().max().item() / exact_max

    # Halving the step size divides the error by ~2 (euler, first order) and by ~4 (heun, second order).
    assert 1.8 < err("euler", 32) / err("euler", 64) < 2.2
    assert 3.6 < err("heun", 32) / err("heun", 64) < 4.8
    assert err("heun", 64) < 5e-3


def test_precomputed_sigmas_and_custom_gradient() -> None:
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 80
    ref = sample(nonlinear_denoiser, z, num_steps=5, solver="heun", discretization="vp")
    sig = get_sigmas("vp", 0.002, 80.0, 5)
    torch.testing.assert_close(sample(nonlinear_denoiser, z, sigmas=sig, solver="heun"), ref, rtol=0, atol=0)
    gradient = dm_gradient(nonlinear_denoiser)
    steps = list(sample_steps(None, z, sigmas=sig, solver="heun", gradient_fn=gradient))
    torch.testing.assert_close(steps[-1].x, ref, rtol=0, atol=0)
    torch.testing.assert_close(steps[0].denoised, nonlinear_denoiser(z, 80.0))  # a DMGradient reports it
    steps = list(sample_steps(None, z, sigmas=sig, solver="heun", gradient_fn=lambda x, s: gradient(x, s)))
    torch.testing.assert_close(steps[-1].x, ref, rtol=0, atol=0)
    assert steps[0].denoised is None  # an opaque gradient function does not
    with pytest.raises(ConfigError, match="followed by 0"):
        sample(nonlinear_denoiser, z, sigmas=sig[:-1])


def test_model_kwargs_and_inpaint_reach_the_denoiser() -> None:
    seen: list[object] = []

    def denoiser(x: torch.Tensor, sigma: float, *, image: object) -> torch.Tensor:
        seen.append(image)
        return torch.zeros_like(x)

    z = torch.ones(1, 2, 4, 4) * 80
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    out = sample(
        denoiser,
        z,
        num_steps=3,
        solver="euler",
        image="img",
        inpaint=torch.full_like(z, 7.0),
        inpaint_mask=mask,
    )
    assert seen == ["img"] * 3
    torch.testing.assert_close(out[mask], torch.full((16,), 7.0))
    torch.testing.assert_close(out[~mask], torch.zeros(16), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ churn


def test_churn_is_reproducible_and_uses_sigma_hat() -> None:
    def run(seed: int, **kw: object) -> tuple[torch.Tensor, list[float]]:
        denoiser = Counting()
        out = sample(
            denoiser,
            (2, 4, 4),
            num_steps=4,
            solver="euler",
            churn="sde",
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )
        return out, denoiser.sigmas

    a, sigmas = run(0, gamma=0.1)
    b, _ = run(0, gamma=0.1)
    c, _ = run(1, gamma=0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    expected = get_sigmas("edm", 0.002, 80.0, 4)[:-1] * 1.1
    assert sigmas == pytest.approx(expected.tolist())
    # No churn when gamma = 0 or when every sigma is outside [S_min, S_max]: same as churn="none".
    plain = sample(
        Counting(), (2, 4, 4), num_steps=4, solver="euler", generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(run(0, gamma=0.0)[0], plain, rtol=0, atol=0)
    torch.testing.assert_close(run(0, gamma=0.1, S_max=1e-3)[0], plain, rtol=0, atol=0)


def test_sde_churn_noise_level() -> None:
    x = torch.zeros(1, 1, 200, 200)
    x_hat, sigma_hat = sde_churn(x, 2.0, generator=torch.Generator().manual_seed(0), gamma=0.5, S_noise=1.0)
    assert sigma_hat == 3.0 and x_hat.dtype == x.dtype
    assert x_hat.std().item() == pytest.approx(math.sqrt(9 - 4), rel=0.02)


# ----------------------------------------------------------------------------------------------- errors


def test_bad_options_raise_config_error() -> None:
    z = torch.ones(1, 2, 4, 4)
    with pytest.raises(ConfigError, match=r"'euler', 'heun', 'edf', 'one_step'"):
        sample(nonlinear_denoiser, z, solver="rk4")
    with pytest.raises(ConfigError, match=r"'iddpm_original'"):
        sample(nonlinear_denoiser, z, discretization="cosine")
    with pytest.raises(ConfigError, match=r"'none', 'sde'"):
        sample(nonlinear_denoiser, z, churn="ode")
    with pytest.raises(ConfigError, match="Generator"):
        sample(nonlinear_denoiser, z, churn="sde")
    with pytest.raises(ConfigError, match="Generator"):
        sample(nonlinear_denoiser, (2, 4, 4))
    with pytest.raises(ConfigError, match="one_step"):
        num_model_calls("rk4", 3)
    with pytest.raises(InputError, match="num_samples=2"):
        sample(nonlinear_denoiser, z, num_samples=2)
