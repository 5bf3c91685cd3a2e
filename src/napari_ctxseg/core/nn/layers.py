"""Primitive layers whose semantics follow the original Flax code rather than PyTorch defaults.

Every module here takes and returns NCHW tensors unless its docstring says "channels-last"; the
channels-last helpers exist because LayerNorm, Linear and GRN act on the channel axis, which is cheapest
to reach with a ``permute`` (free for tensors in ``torch.channels_last`` memory format).

Semantic traps handled here (see ``shared/parity/README.md``, items 1-7):

- LayerNorm epsilon is 1e-6 (PyTorch: 1e-5) and may have scale and/or bias switched off;
- GELU is the tanh approximation (``jax.nn.gelu`` default);
- ConvTranspose kernels are spatially flipped relative to ``nn.ConvTranspose2d`` (handled by the converter);
- convolutions use ``'SAME'`` padding (low = total // 2);
- nearest resize is ``nearest-exact`` on every axis, batch axis included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GRN",
    "DropPath",
    "LayerNorm",
    "LayerNorm2d",
    "ModuleSeq",
    "MultiHeadSelfAttention",
    "SameConv2d",
    "gelu",
    "resize_nearest",
    "to_channels_first",
    "to_channels_last",
]

LN_EPS = 1e-6

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ModuleSeq(nn.ModuleList, Generic[ModuleT]):
    """An ``nn.ModuleList`` whose items share one type, so that type checkers know what iteration gives.

    Registration and state-dict keys are those of ``nn.ModuleList`` (``name.0.``, ``name.1.``, ...).
    """

    def __init__(self, modules: Iterable[ModuleT] = ()) -> None:
        super().__init__(modules)

    def __iter__(self) -> Iterator[ModuleT]:
        return super().__iter__()  # type: ignore[return-value]

    @overload
    def __getitem__(self, idx: slice) -> ModuleSeq[ModuleT]: ...

    @overload
    def __getitem__(self, idx: int) -> ModuleT: ...

    def __getitem__(self, idx: int | slice) -> ModuleT | ModuleSeq[ModuleT]:
        return super().__getitem__(idx)  # type: ignore[return-value]


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (the ``jax.nn.gelu`` default)."""
    return F.gelu(x, approximate="tanh")


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """NCHW -> NHWC view."""
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """NHWC -> NCHW view."""
    return x.permute(0, 3, 1, 2)


class LayerNorm(nn.Module):
    """LayerNorm over the last (channel) axis of a channels-last tensor, epsilon 1e-6.

    Parameters
    ----------
    dim
        Number of channels.
    scale, bias
        Whether the affine scale (``weight``) and bias exist. ``DMConvBlock`` uses bias only, its
        ``emb_norm`` neither.

    Notes
    -----
    Flax computes the variance as E[x^2] - E[x]^2 ("fast variance"); PyTorch uses a two-pass variance.
    The two agree to float32 rounding except for ill-conditioned inputs (|mean| >> std), which model
    activations are far from, so the fused ``F.layer_norm`` kernel is used.
    """

    def __init__(self, dim: int, *, scale: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C), normalised over C."""
        if (self.weight is None) == (self.bias is None):
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, LN_EPS)
        # Only one affine parameter: apply it outside the fused kernel. PyTorch 2.11's CUDA backward of
        # layer_norm with a weight but no bias (or the reverse) returns an empty gradient and fails.
        y = F.layer_norm(x, (self.dim,), None, None, LN_EPS)
        if self.weight is not None:
            return y * self.weight
        assert self.bias is not None  # exactly one of weight and bias is set here
        return y + self.bias


class LayerNorm2d(LayerNorm):
    """:class:`LayerNorm` over the channel axis of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), normalised over C."""
        return to_channels_first(super().forward(to_channels_last(x)))


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2), channels-last input.

    Notes
    -----
    mu2 = mean_{H,W}(x^2) clamped at 1e-6; G = sqrt(mu2); N = G / (mean_C(G) + 1e-6);
    y = gamma * (x * N) + beta + x. Flax stores gamma/beta as (1, 1, 1, C); here they are (C,).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        mu2 = x.square().mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        gx = mu2.sqrt()
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Flax ``'SAME'`` padding (asymmetric when needed: low = total // 2).

    Notes
    -----
    Per spatial axis of size n, stride s, kernel k: total = max((ceil(n / s) - 1) * s + k - n, 0),
    low = total // 2, high = total - low. Odd kernels with stride 1 use the symmetric built-in padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if symmetric else 0,
            groups=groups,
            bias=bias,
        )
        self._symmetric = symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        if not self._symmetric:
            pads = []
            for n, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        return super().forward(x)


class DropPath(nn.Module):
    """Whole-sample dropout (stochastic depth), active in training mode only.

    Equals Flax ``nnx.Dropout(rate, broadcast_dims=(-1, -2, -3))`` on a 4D tensor: one Bernoulli draw
    per sample, kept samples scaled by 1 / (1 - rate).
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero whole samples of ``x`` (batch first) with probability ``rate``; rescale the rest."""
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep) / keep


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over tokens, as Flax ``nnx.MultiHeadAttention(num_heads, dim)`` without mask.

    Parameters ``query``, ``key``, ``value``, ``out`` are ``nn.Linear`` with bias; channel order of the
    projected features is (head, head_dim), heads outermost. Input and output are (B, L, C).
    """

    def __init__(self, num_heads: int, dim: int) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        h = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, c // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def resize_nearest(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Nearest resize on every axis (batch included), as ``jax.image.resize(..., 'nearest')``.

    Source index on each axis: floor((i + 0.5) * n_in / n_out), i.e. ``nearest-exact``. Works for any
    dtype (bool stays bool).
    """
    if tuple(x.shape) == tuple(shape):
        return x
    if x.ndim != len(shape):
        raise ValueError(f"cannot resize a {x.ndim}D tensor to shape {tuple(shape)}")
    for axis, (n_in, n_out) in enumerate(zip(x.shape, shape)):
        if n_in != n_out:
            idx = (torch.arange(n_out, device=x.device, dtype=torch.float64) + 0.5) * n_in / n_out
            idx = idx.floor().long().clamp_(max=n_in - 1)
            x = x.index_select(axis, idx)
    return x
