"""ConvNeXt-V2 encoder and the convolutional decoder of SegD/CtxSegD (NCHW in and out).

Module and parameter names mirror the original Flax paths (``layers.<k>.down``, ``layers.<k>.blocks.<i>``,
``proj_out`` for the 4x expansion, ``proj_in`` for the projection back) so that converted checkpoints map
one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import (
    GRN,
    DropPath,
    LayerNorm,
    LayerNorm2d,
    ModuleSeq,
    SameConv2d,
    gelu,
    to_channels_first,
    to_channels_last,
)

__all__ = ["ConvBlock", "ConvDecoder", "ConvNeXt"]


class ConvBlock(nn.Module):
    """ConvNeXt-V2 block: x + proj_in(GRN(gelu(proj_out(LN(dwconv7(x)))))).

    Note the original's names: ``proj_out`` is the expansion dim -> 4 dim, ``proj_in`` the projection back.
    """

    def __init__(self, dim: int, drop_rate: float = 0.0, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = SameConv2d(dim, dim, kernel_size, groups=dim)
        self.norm = LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim * 4)
        self.grn = GRN(dim * 4)
        self.proj_in = nn.Linear(dim * 4, dim)
        self.dropout = DropPath(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        h = to_channels_last(self.conv(x))
        h = self.proj_in(self.grn(gelu(self.proj_out(self.norm(h)))))
        return x + self.dropout(to_channels_first(h))


class _EncoderLevel(nn.Module):
    def __init__(self, in_dim: int, dim: int, stride: int, first: bool, depth: int) -> None:
        super().__init__()
        self.down = SameConv2d(in_dim, dim, stride, stride=stride)
        # level 0 normalises after the patchify conv, later levels before the down conv
        self.norm = LayerNorm2d(dim if first else in_dim)
        self.first = first
        self.blocks = ModuleSeq(ConvBlock(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.down(x)) if self.first else self.down(self.norm(x))
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt-V2 feature pyramid: returns one NCHW feature map per level (strides p, 2p, 4p, 8p).

    Parameters
    ----------
    in_dim
        Input channels.
    patch_size
        Stride of the patchify convolution.
    depths
        Blocks per level (original default (3, 3, 27, 3)).
    model_dim, dim_multi
        Level k has ``model_dim * dim_multi[k]`` channels.
    """

    def __init__(
        self,
        in_dim: int = 3,
        patch_size: int = 4,
        depths: Sequence[int] = (3, 3, 27, 3),
        model_dim: int = 128,
        dim_multi: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__()
        dims = [model_dim * m for m in dim_multi]
        self.layers = ModuleSeq(
            _EncoderLevel(
                in_dim if k == 0 else dims[k - 1],
                dims[k],
                patch_size if k == 0 else 2,
                first=k == 0,
                depth=depths[k],
            )
            for k in range(len(depths))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> one (B, C_k, H / s_k, W / s_k) map per level k."""
        skips = []
        for level in self.layers:
            x = level(x)
            skips.append(x)
        return skips


class _DecoderLevel(nn.Module):
    def __init__(
        self, dim: int, out_dim: int, stride: int, depth: int, skip_dim: int | None, drop_rate: float
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, out_dim, stride, stride=stride)
        self.norm = LayerNorm2d(dim)
        self.blocks = ModuleSeq(ConvBlock(dim, drop_rate=drop_rate) for _ in range(depth))
        self.skip_proj = nn.Linear(skip_dim, dim) if skip_dim is not None else None

    def project_skip(self, skip: torch.Tensor) -> torch.Tensor:
        if self.skip_proj is None:
            return skip
        return to_channels_first(self.skip_proj(to_channels_last(skip)))


class ConvDecoder(nn.Module):
    """Decoder of SegD: from the deepest level, x += skip_proj(skip); blocks; x = up(LN(x)).

    Parameters
    ----------
    out_dim, patch_size
        Output channels and the stride of the last transposed convolution.
    model_dim, depths, dim_multi
        Level k works at ``model_dim * dim_multi[k]`` channels with ``depths[k]`` ConvNeXt blocks.
    skip_multi
        Encoder skip widths (``model_dim * skip_multi[k]`` of the encoder's model_dim) projected by a
        Linear, or None for identity.
    skip_dim
        The encoder's model_dim (the original uses the decoder's model_dim: both are 128 there).
    drop_rate
        Whole-sample dropout of the blocks (0.2 in the original, active in training only).
    """

    def __init__(
        self,
        out_dim: int,
        patch_size: int,
        model_dim: int,
        depths: Sequence[int],
        dim_multi: Sequence[int],
        skip_multi: Sequence[int] | None = None,
        skip_dim: int | None = None,
        drop_rate: float = 0.2,
    ) -> None:
        super().__init__()
        dims = [model_dim * m for m in dim_multi]
        skip_dim = model_dim if skip_dim is None else skip_dim
        self.layers = ModuleSeq(
            _DecoderLevel(
                dims[k],
                out_dim if k == 0 else dims[k - 1],
                patch_size if k == 0 else 2,
                depths[k],
                None if skip_multi is None else skip_dim * skip_multi[k],
                drop_rate,
            )
            for k in range(len(depths))
        )

    def level_forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks and up-sampling of level ``k`` (after the skip was added)."""
        level = self.layers[k]
        for block in level.blocks:
            x = block(x)
        return level.up(level.norm(x))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Skips of the levels (shallowest first) -> (B, out_dim, H, W) at the image's resolution."""
        x: torch.Tensor | float = 0.0
        for k in reversed(range(len(self.layers))):
            x = self.level_forward(k, x + self.layers[k].project_skip(skips[k]))
        return x  # type: ignore[return-value]
