"""Tests of EDM preconditioning, the training schedules and the loss (napari_ctxseg.core.diffusion.edm)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctxseg.core.diffusion.edm import EDMDenoiser, edm_loss, edm_precond, edm_scalings
from napari_ctxseg.core.diffusion.train_schedules import (
    SCHEDULES,
    edm_hat_schedule,
    edm_schedule,
    get_schedule,
    ncsn2_schedule,
)
from napari_ctxseg.core.errors import ConfigError, InputError

PARITY = Path(__file__).resolve().parents[2].parent / "shared" / "parity"


def nchw(a: np.ndarray) -> torch.Tensor:
    """NHWC fixture array -> NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def inner_fn(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """The fixtures' known inner network: F(x_in, c_noise) = 2 x_in + c_noise per sample."""
    return 2 * x_in + c_noise[:, None, None, None]


# ---------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def primitives() -> dict[str, np.ndarray]:
    path = PARITY / "modules" / "primitives.npz"
    if not path.exists():
        pytest.skip(f"parity fixtures not found at {path}")
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k.startswith("precond.")}


@pytest.mark.parametrize("sd", ["1", "0.5"])
@pytest.mark.parametrize("which", ["s80", "s0.5", "vec"])
def test_precond_parity(primitives: dict[str, np.ndarray], sd: str, which: str) -> None:
    x = nchw(primitives["precond.x"])
    sigma = {"s80": 80.0, "s0.5": 0.5, "vec": torch.from_numpy(primitives["precond.sigma_vec"])}[which]
    ref = np.moveaxis(primitives[f"precond.sd{sd}.{which}.y"], -1, 1)
    out = EDMDenoiser(inner_fn, sigma_data=float(sd))(x, sigma)
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


# ------------------------------------------------------------------------------------------- scalings


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_scalings_closed_form(sigma_data: float) -> None:
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    var = sigma**2 + sigma_data**2
    torch.testing.assert_close(c_skip, sigma_data**2 / var)
    torch.testing.assert_close(c_in, var**-0.5)
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    # The original's c_out: c_out^2 = sigma * sd * c_in^2, and c_skip = sd^2 c_in^2.
    torch.testing.assert_close(c_out**2, sigma * sigma_data * c_in**2)
    torch.testing.assert_close(c_skip, sigma_data**2 * c_in**2)
    # It is EDM's sigma sd / sqrt(sigma^2 + sd^2) divided by sqrt(sigma sd): equal only where sigma sd = 1.
    c_out_edm = sigma * sigma_data / torch.sqrt(var)
    torch.testing.assert_close(c_out * torch.sqrt(sigma * sigma_data), c_out_edm)
    away = ~torch.isclose(sigma * sigma_data, torch.ones_like(sigma))
    assert torch.all(~torch.isclose(c_out[away], c_out_edm[away]))
    one = torch.tensor(1 / sigma_data, dtype=torch.float64)
    torch.testing.assert_close(
        edm_scalings(one, sigma_data)[1], one * sigma_data / torch.sqrt(one**2 + sigma_data**2)
    )


def test_scalings_keep_dtype() -> None:
    for dtype in (torch.float32, torch.float64):
        out = edm_scalings(torch.tensor([0.5, 2.0], dtype=dtype), 1.0)
        assert all(c.dtype == dtype for c in out)


def test_denoiser_sigma_forms_agree() -> None:
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    D = edm_precond(inner_fn, sigma_data=1.0)
    ref = D(x, 2.5)
    for sigma in (
        torch.tensor(2.5),
        torch.tensor([2.5]),
        torch.full((3,), 2.5),
        torch.full((3, 1, 1, 1), 2.5),
    ):
        torch.testing.assert_close(D(x, sigma), ref, rtol=0, atol=0)
    # A per-sample sigma gives each sample its own coefficients.
    vec = D(x, torch.tensor([0.5, 2.5, 7.0]))
    torch.testing.assert_close(vec[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(vec[0], D(x[:1], 0.5)[0], rtol=0, atol=0)


def test_denoiser_passes_c_noise_kwargs_and_x_cond() -> None:
    seen: dict[str, object] = {}

    def fn(x_in: torch.Tensor, c_noise: torch.Tensor, *, image: torch.Tensor) -> torch.Tensor:
        seen.update(x_in=x_in, c_noise=c_noise, image=image)
        return x_in[:, :2]

    x = torch.ones(2, 2, 3, 3)
    cond = torch.full((2, 1, 3, 3), 5.0)
    EDMDenoiser(fn, sigma_data=1.0)(x, torch.tensor([1.0, math.e]), x_cond=cond, image="img")
    assert seen["image"] == "img"
    torch.testing.assert_close(seen["c_noise"], torch.tensor([0.0, 0.25]))
    x_in = seen["x_in"]
    assert isinstance(x_in, torch.Tensor) and x_in.shape == (2, 3, 3, 3)
    torch.testing.assert_close(x_in[0, :2], torch.full((2, 3, 3), 2**-0.5))
    torch.testing.assert_close(x_in[:, 2:], cond)  # the condition is not scaled


def test_perfect_network_gives_clean_data() -> None:
    # If F returns (x0 - c_skip x) / c_out, D returns x0 exactly: the wrapper is the affine map it claims.
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x0 + 3.0 * torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_scalings(torch.tensor(3.0, dtype=torch.float64), 0.5)

    def fn(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return (x0 - c_skip * x_in / c_in) / c_out

    torch.testing.assert_close(EDMDenoiser(fn, sigma_data=0.5)(x, 3.0), x0)


def test_denoiser_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="sigma_data"):
        EDMDenoiser(inner_fn, sigma_data=0.0)
    with pytest.raises(ConfigError, match="sigma_data"):
        EDMDenoiser(inner_fn, sigma_data=float("nan"))
    with pytest.raises(TypeError):
        EDMDenoiser(inner_fn)  # type: ignore[call-arg]  # sigma_data has no hidden default
    with pytest.raises(InputError, match="B = 2"):
        EDMDenoiser(inner_fn, sigma_data=1.0)(torch.ones(2, 2, 3, 3), torch.ones(3))


# ------------------------------------------------------------------------------------------ schedules


def test_edm_schedule_statistics() -> None:
    x = torch.zeros(20000, 2, 1, 1)
    sigma, weight = edm_schedule(x, generator=torch.Generator().manual_seed(0), sigma_data=0.5)
    assert sigma.shape == (20000, 1, 1, 1) and sigma.dtype == torch.float32
    log_sigma = torch.log(sigma).double()
    assert abs(log_sigma.mean().item() - (-1.2)) < 0.03
    assert abs(log_sigma.std().item() - 1.2) < 0.03
    assert sigma.min() >= 0.002 and sigma.max() <= 80
    torch.testing.assert_close(weight, 1 / sigma**2 + 1 / 0.25)


def test_edm_schedule_clips_and_is_deterministic() -> None:
    x = torch.zeros(64, 2, 4, 4)
    a = edm_schedule(x, generator=torch.Generator().manual_seed(3), sigma_data=1.0, p_std=20.0)
    b = edm_schedule(x, generator=torch.Generator().manual_seed(3), sigma_data=1.0, p_std=20.0)
    c = edm_schedule(x, generator=torch.Generator().manual_seed(4), sigma_data=1.0, p_std=20.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])
    assert a[0].min().item() == pytest.approx(0.002) and a[0].max().item() == pytest.approx(80.0)


def test_edm_hat_schedule_weights() -> None:
    sd = 0.5
    x = torch.zeros(4000, 2, 1, 1, dtype=torch.float64)
    sigma, weight = edm_hat_schedule(x, generator=torch.Generator().manual_seed(0), sigma_data=sd)
    base = sd**2 / sigma**2 + 1  # the uncorrected weight (sd^2 x the EDM weight)
    assert sigma.shape == weight.shape == (4000, 1, 1, 1)
    assert torch.all(weight >= base * (1 - 1e-12))
    # Corrections only raise the low-SNR (large sigma) side; the high-SNR side keeps the base weight.
    raised = weight > base * (1 + 1e-9)
    assert raised.any() and (~raised).any()
    assert sigma[raised].min() > sigma[~raised].max()
    # Below the peak, p(snr) x effective weight is flat: the corrected density-weighted loss is constant.
    snr = 1 / sigma[raised] ** 2
    p = torch.exp(-((-torch.log(snr) - 2 * -1.2) ** 2) / (8 * 1.2**2)) / snr
    flat = p * weight[raised]
    assert (flat.max() / flat.min()).item() < 1.01
    # Same draws as edm_schedule with the same seed.
    s_edm, _ = edm_schedule(x, generator=torch.Generator().manual_seed(0), sigma_data=sd)
    torch.testing.assert_close(sigma, s_edm)


def test_ncsn2_schedule_low_discrepancy() -> None:
    x = torch.zeros(8, 2, 4, 4)
    sigma, weight = ncsn2_schedule(x, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (8, 1, 1, 1)
    torch.testing.assert_close(weight, 1 / sigma**2)
    log_sigma = torch.sort(torch.log(sigma.double().flatten())).values
    assert log_sigma[0] >= math.log(0.01) - 1e-6 and log_sigma[-1] <= math.log(80) + 1e-6
    # t = (u + b/B) mod 1: sorted log-sigmas are evenly spaced by (ln smax - ln smin) / B.
    gaps = torch.diff(log_sigma)
    torch.testing.assert_close(
        gaps, torch.full_like(gaps, (math.log(80) - math.log(0.01)) / 8), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------------------------- loss


def test_loss_is_zero_for_a_perfect_denoiser() -> None:
    x_gt = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    for schedule in SCHEDULES:
        loss = edm_loss(
            lambda x, sigma: x_gt.clone(),
            x_gt,
            generator=torch.Generator().manual_seed(1),
            sigma_data=0.5,
            schedule=schedule,
        )
        assert loss.item() == 0.0


def test_loss_value_and_gradient() -> None:
    x_gt = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(0.3, requires_grad=True)
    D = EDMDenoiser(lambda x_in, c_noise, *, k: k * scale * x_in, sigma_data=0.5)
    loss = edm_loss(D, x_gt, generator=torch.Generator().manual_seed(7), sigma_data=0.5, k=2.0)
    # Same computation by hand: sigma first, then the noise, from the same generator.
    g = torch.Generator().manual_seed(7)
    sigma, w = edm_schedule(x_gt, generator=g, sigma_data=0.5)
    noise = torch.randn(x_gt.shape, generator=g)
    expected = (0.5 * w * (D(x_gt + sigma * noise, sigma, k=2.0) - x_gt) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_loss_with_custom_schedule() -> None:
    x_gt = torch.ones(2, 2, 3, 3)

    def fixed(x: torch.Tensor, *, generator: torch.Generator, sigma_data: float):
        return torch.full((x.shape[0], 1, 1, 1), 2.0), torch.full((x.shape[0], 1, 1, 1), 4.0)

    # D = 0: loss = mean(0.5 * 4 * 1) = 2.
    loss = edm_loss(
        lambda x, s: torch.zeros_like(x), x_gt, generator=torch.Generator(), sigma_data=1.0, schedule=fixed
    )
    assert loss.item() == pytest.approx(2.0)


def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"edmhat.*ncsn2"):
        get_schedule("edm_hi")
    with pytest.raises(ConfigError, match="expected one of"):
        edm_loss(
            lambda x, s: x,
            torch.ones(1, 2, 2, 2),
            generator=torch.Generator(),
            sigma_data=1.0,
            schedule="nope",
        )


def test_loss_weights_pixels_and_unit_weighting() -> None:
    x_gt = torch.ones(2, 2, 3, 3)

    def fixed(x: torch.Tensor, *, generator: torch.Generator, sigma_data: float):
        return torch.full((x.shape[0], 1, 1, 1), 2.0), torch.full((x.shape[0], 1, 1, 1), 4.0)

    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    w = torch.zeros(2, 1, 3, 3)
    w[1, :, :2] = 1.0  # 6 of the 18 pixels of sample 1: the mean over them
    g = torch.Generator()
    assert edm_loss(zero, x_gt, generator=g, sigma_data=1.0, schedule=fixed, weight=w).item() == 2.0
    # unit weighting: lambda = 1 / c_out^2 = (sigma^2 + sd^2) / (sigma sd) = 5 / 2 at sigma 2, sd 1
    unit = edm_loss(zero, x_gt, generator=g, sigma_data=1.0, schedule=fixed, weighting="unit")
    assert unit.item() == pytest.approx(0.5 * 5 / 2)
    with pytest.raises(ConfigError, match="expected 'unit' or 'schedule'"):
        edm_loss(zero, x_gt, generator=g, sigma_data=1.0, schedule=fixed, weighting="none")  # type: ignore[arg-type]
