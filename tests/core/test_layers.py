"""LayerNorm variants: every affine combination matches the formula and trains its own parameters."""

from __future__ import annotations

import pytest
import torch

from napari_ctxseg.core.nn.layers import LN_EPS, LayerNorm


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


def test_module_seq_is_a_module_list_to_torch() -> None:
    from torch import nn

    from napari_ctxseg.core.nn.layers import ModuleSeq

    typed = ModuleSeq(nn.Linear(2, 2) for _ in range(3))
    plain = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    assert list(typed.state_dict()) == list(plain.state_dict())
    typed.load_state_dict(plain.state_dict())
    assert all(isinstance(m, nn.Linear) for m in typed)
    assert torch.equal(typed[1].weight, plain[1].weight)
    assert isinstance(typed[1:], ModuleSeq) and len(typed[1:]) == 2
