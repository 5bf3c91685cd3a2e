"""Context attention details beyond the parity fixtures: chunking and masks of another size."""

from __future__ import annotations

import pytest
import torch

from napari_ctxseg.core.errors import ConfigError
from napari_ctxseg.core.nn import attention
from napari_ctxseg.core.nn.attention import CtxAtt


@pytest.mark.parametrize("kind", ["sigmoid", "softmax", "linear"])
def test_chunked_attention_equals_one_pass(monkeypatch, kind) -> None:
    torch.manual_seed(0)
    att = CtxAtt(2, 16, kind=kind).eval()
    q, k = torch.randn(2, 16, 12, 10), torch.randn(2, 16, 6, 7)
    mask = torch.rand(2, 12, 14) > 0.3
    with torch.no_grad():
        full = att(q, k, k, mask)
        monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", 50)
        chunked = att(q, k, k, mask)
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-6)


def test_masked_keys_are_ignored_by_sigmoid_attention() -> None:
    torch.manual_seed(0)
    att = CtxAtt(1, 8, kind="sigmoid").eval()
    q, k = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    k2 = k.clone()
    k2[..., 2:, :] = 100.0  # change only masked-out keys
    with torch.no_grad():
        torch.testing.assert_close(att(q, k, k, mask), att(q, k2, k2, mask))


def test_bad_attention_settings() -> None:
    with pytest.raises(ConfigError, match="unknown attention kind"):
        CtxAtt(1, 8, kind="cosine")
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        CtxAtt(3, 8)
