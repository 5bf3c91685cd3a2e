"""Context attention (``CtxAtt``): image features attend to the features of annotated reference images."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .config import AttentionKind
from .layers import resize_nearest, to_channels_first, to_channels_last

__all__ = ["ATTENTION_KINDS", "CtxAtt", "linear_attention", "sigmoid_attention", "softmax_attention"]


_CHUNK_ELEMENTS = 1 << 24  # attention-matrix entries per chunk (64 MB in float32)


def _query_chunks(q: torch.Tensor, n_keys: int) -> list[slice]:
    """Slices of the query axis so that one chunk's attention matrix stays below ``_CHUNK_ELEMENTS``."""
    per_query = q.shape[0] * q.shape[1] * n_keys
    size = max(1, _CHUNK_ELEMENTS // max(1, per_query))
    return [slice(i, i + size) for i in range(0, q.shape[2], size)]


def sigmoid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, temp: float
) -> torch.Tensor:
    """A = sigmoid(q k^T / temp), normalised by the number of (valid) keys; returns A v.

    Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), mask (B, 1, 1, Lk) bool or None. Rows of A do not
    sum to 1 (this is not a softmax). Large inputs are processed in query chunks (same result).
    """
    kt = k.transpose(-1, -2)
    if mask is not None:
        norm = mask / (1e-6 + mask.sum(dim=-1, keepdim=True))
    else:
        norm = None
    out = []
    for sl in _query_chunks(q, k.shape[-2]):
        attn = torch.sigmoid(q[:, :, sl] @ kt / temp)
        attn = attn * norm if norm is not None else attn / attn.shape[-1]
        out.append(attn @ v)
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, temp: float
) -> torch.Tensor:
    """Softmax attention; masked logits are set to -1e6 (so a fully masked row becomes uniform)."""
    kt = k.transpose(-1, -2)
    out = []
    for sl in _query_chunks(q, k.shape[-2]):
        logits = q[:, :, sl] @ kt / temp
        if mask is not None:
            logits = torch.where(mask, logits, torch.full_like(logits, -1e6))
        out.append(logits.softmax(dim=-1) @ v)
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, temp: float
) -> torch.Tensor:
    """Linear attention: softmax(q, features) / temp @ (softmax(k, tokens)^T v).

    Notes
    -----
    As in the original, masked keys are replaced by ``k.min()`` taken over the whole tensor (every
    sample, head and token) and masked values by 0. The global minimum couples the samples of a batch
    (a known quirk of the original, kept because checkpoints were trained with it); with the context
    encoded once per image this only couples the references of one image.
    """
    if mask is not None:
        mask_t = mask.transpose(-1, -2)  # (B, 1, Lk, 1)
        k = torch.where(mask_t, k, k.min())
        v = torch.where(mask_t, v, torch.zeros((), dtype=v.dtype, device=v.device))
    q = q.softmax(dim=-1) / temp
    k = k.softmax(dim=-2)
    return q @ (k.transpose(-1, -2) @ v)


ATTENTION_KINDS = {"sigmoid": sigmoid_attention, "softmax": softmax_attention, "linear": linear_attention}


class CtxAtt(nn.Module):
    """Cross attention of query features to reference features, with a residual on the query.

    Parameters
    ----------
    num_heads
        Heads; the head width ``hidden_dim // num_heads`` sets temp = sqrt(head width).
    in_dim
        Query channels (and output channels).
    k_dim, v_dim
        Key / value input channels (default ``in_dim``).
    kind
        ``"sigmoid"``, ``"softmax"`` or ``"linear"``.

    Notes
    -----
    Inputs are NCHW: q (B, C, H, W), k/v (B, Ck, h, w) with h*w tokens (the original requires the same
    token count only for masks). The mask (any resolution, bool) is nearest-resized to (B, h, w) of the
    keys, batch axis included. The original resizes it to the query's shape, which is the same thing
    when, as in all its callers, queries and keys have the same size; resizing to the keys also allows a
    context image of another size than the image. Output = proj_out(attention) + q.
    """

    def __init__(
        self,
        num_heads: int,
        in_dim: int,
        k_dim: int | None = None,
        v_dim: int | None = None,
        kind: AttentionKind = "sigmoid",
    ) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention kind {kind!r}; expected one of {sorted(ATTENTION_KINDS)}")
        if num_heads < 1 or in_dim % num_heads:
            raise ConfigError(f"in_dim {in_dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.kind = kind
        self.temp = float((in_dim // num_heads) ** 0.5)
        self.proj_q = nn.Linear(in_dim, in_dim)
        self.proj_k = nn.Linear(k_dim or in_dim, in_dim)
        self.proj_v = nn.Linear(v_dim or in_dim, in_dim)
        self.proj_out = nn.Linear(in_dim, in_dim)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return x.reshape(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q`` (B, C, H, W) attends to ``k``/``v`` (B, C', h, w; default ``q``); returns (B, C, H, W).

        ``mask`` (B, h, w) marks the keys that may be attended to (True).
        """
        b, _, h, w = q.shape
        k = q if k is None else k
        v = q if v is None else v
        if mask is not None:  # the mask belongs to the keys (the original: to the query, same size there)
            kh, kw = k.shape[-2:]
            mask = resize_nearest(mask.bool(), (b, kh, kw)).reshape(b, 1, 1, kh * kw)
        q_in = to_channels_last(q)
        qt = self._tokens(self.proj_q(q_in))
        kt = self._tokens(self.proj_k(to_channels_last(k)))
        vt = self._tokens(self.proj_v(to_channels_last(v)))
        x = ATTENTION_KINDS[self.kind](qt, kt, vt, mask, self.temp)
        x = x.transpose(1, 2).reshape(b, h, w, -1)
        return to_channels_first(self.proj_out(x) + q_in)

    def batch_process(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each of the B queries attends to each of the N references separately; results are averaged.

        q (B, C, H, W); k, v (N, ., H, W); mask (N, h, w) or None. Returns (B, C, H, W).
        """
        b, n = q.shape[0], k.shape[0]
        qq = q.repeat_interleave(n, dim=0)
        kk = k.repeat(b, 1, 1, 1)
        vv = v.repeat(b, 1, 1, 1)
        mm = None if mask is None else mask.repeat(b, *([1] * (mask.ndim - 1)))
        out = self(qq, kk, vv, mm)
        return out.view(b, n, *out.shape[1:]).mean(dim=1)
