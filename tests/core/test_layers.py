"""LayerNorm variants: every affine combination matches the formula and trains its own parameters."""

from __future__ import annotations

import pytest
import torch

from napari_ctxseg.core.layers import LN_EPS, LayerNorm


@pytest.mark.parametrize("scale,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_layer_norm_affine_variants_match_formula_and_get_gradients(scale: bool, bias: bool) -> None:
    torch.manual_seed(0)
    ln = LayerNorm(40, scale=scale, bias=bias)
    with torch.no_grad():
        for p in ln.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    ln = ln.double()
    y = ln(x)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + LN_EPS)
    if scale:
        ref = ref * ln.weight
    if bias:
        ref = ref + ln.bias
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    for p in ln.parameters():  # (PyTorch 2.11's fused CUDA backward fails with only one of them)
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().sum() > 0
