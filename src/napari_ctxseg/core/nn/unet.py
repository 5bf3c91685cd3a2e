"""Noise-conditioned U-Net parts of SegP/CtxSegP: label embedding, DMConvBlock, UNetDown, UNetUp (NCHW)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    DropPath,
    LayerNorm,
    LayerNorm2d,
    ModuleSeq,
    MultiHeadSelfAttention,
    SameConv2d,
    gelu,
    to_channels_first,
    to_channels_last,
)

__all__ = ["DMConvBlock", "LabelEmbedding", "UNetDown", "UNetUp"]


class LabelEmbedding(nn.Module):
    """Fourier embedding of the noise label c_noise, then Linear-SiLU-Linear-SiLU.

    Notes
    -----
    freqs_i = (1 / max_positions) ** (i / (E/2 - 1)) with ``endpoint=True`` (else / (E/2));
    t = c_noise * freqs; features = [cos t, sin t] (cos first). ``freqs`` is a non-persistent buffer:
    it follows from the configuration and is not stored in checkpoints.
    """

    freqs: torch.Tensor

    def __init__(self, emb_dim: int, endpoint: bool = True, max_positions: int = 10000) -> None:
        super().__init__()
        half = emb_dim // 2
        exponent = torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0))
        self.register_buffer("freqs", (1.0 / max_positions) ** exponent, persistent=False)
        self.noise_proj_1 = nn.Linear(emb_dim, emb_dim)
        self.noise_proj_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """Noise labels (B,) -> embeddings (B, emb_dim)."""
        t = noise_labels.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        x = torch.cat([torch.cos(t), torch.sin(t)], dim=-1)
        x = F.silu(self.noise_proj_1(x))
        return F.silu(self.noise_proj_2(x))


class DMConvBlock(nn.Module):
    """Diffusion ConvNeXt block with (scale, shift) modulation by the noise embedding.

    Notes
    -----
    h = dwconv7(x) (no bias) -> LN(bias only) -> Linear(d, 4d) -> GELU -> Linear(4d, d, no bias);
    (scale, shift) = split(Linear(emb)), scale first; h = LN_plain(h) * scale + shift (no "1 + scale");
    with attention, h = MHA(h) replaces h (no residual around it); returns x + h.
    """

    def __init__(
        self, dim: int, emb_dim: int, num_heads: int = 0, drop_rate: float = 0.0, kernel_size: int = 7
    ) -> None:
        super().__init__()
        self.conv = SameConv2d(dim, dim, kernel_size, groups=dim, bias=False)
        self.norm = LayerNorm(dim, scale=False)
        self.mlp_in = nn.Linear(dim, dim * 4)
        self.mlp_out = nn.Linear(dim * 4, dim, bias=False)
        self.emb_norm = LayerNorm(dim, scale=False, bias=False)
        self.emb_proj = nn.Linear(emb_dim, dim * 2)
        self.att = MultiHeadSelfAttention(num_heads, dim) if num_heads > 0 else None
        self.dropout = DropPath(drop_rate)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) modulated by ``emb`` (B, emb_dim) -> (B, C, H, W)."""
        h = to_channels_last(self.conv(x))
        h = self.mlp_out(gelu(self.mlp_in(self.norm(h))))
        scale, shift = self.emb_proj(emb)[:, None, None, :].chunk(2, dim=-1)
        h = self.emb_norm(h) * scale + shift
        if self.att is not None:
            b, hh, ww, c = h.shape
            h = self.att(h.reshape(b, hh * ww, c)).view(b, hh, ww, c)
        return x + self.dropout(to_channels_first(h))


def _heads(dim: int, level: int, att_levels: Sequence[int], head_dim: int) -> int:
    return dim // head_dim if level in att_levels else 0


class _DownLevel(nn.Module):
    def __init__(
        self,
        in_dim: int,
        dim: int,
        stride: int,
        first: bool,
        depth: int,
        emb_dim: int,
        num_heads: int,
        cond_dim: int | None,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.down = SameConv2d(in_dim, dim, stride, stride=stride)
        self.norm = LayerNorm2d(dim if first else in_dim)
        self.first = first
        self.blocks = ModuleSeq(DMConvBlock(dim, emb_dim, num_heads, drop_rate) for _ in range(depth))
        self.merge = nn.Linear(cond_dim, dim) if cond_dim else None

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(x)) if self.first else self.down(self.norm(x))


class UNetDown(nn.Module):
    """Encoder of the noisy flow. Returns sum(depths + 1) skips: each level's down output, then each block's.

    Parameters
    ----------
    in_dim, patch_size, model_dim, emb_dim, depths, dim_multi
        As the original; level k has ``model_dim * dim_multi[k]`` channels.
    att_levels
        Levels whose blocks end with multi-head self-attention of ``dim // head_dim`` heads.
    head_dim
        Attention head width (original: 64).
    cond_dim
        If > 0, a ``merge`` Linear adds ``conds[k]`` (width ``cond_dim * dim_multi[k]``) after the down layer.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        patch_size: int,
        model_dim: int,
        emb_dim: int,
        depths: Sequence[int],
        dim_multi: Sequence[int],
        att_levels: Sequence[int] = (),
        head_dim: int = 64,
        cond_dim: int = -1,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [model_dim * m for m in dim_multi]
        self.layers = ModuleSeq(
            _DownLevel(
                in_dim if k == 0 else dims[k - 1],
                dims[k],
                patch_size if k == 0 else 2,
                k == 0,
                depths[k],
                emb_dim,
                _heads(dims[k], k, att_levels, head_dim),
                cond_dim * dim_multi[k] if cond_dim > 0 else None,
                drop_rate,
            )
            for k in range(len(depths))
        )

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, conds: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Noisy flow (B, in_dim, H, W), embedding (B, emb_dim) and image features per level -> the skips."""
        skips = []
        for k, level in enumerate(self.layers):
            x = level.stem(x)
            if conds is not None and level.merge is not None:
                x = x + to_channels_first(level.merge(to_channels_last(conds[k])))
            skips.append(x)
            for block in level.blocks:
                x = block(x, emb)
                skips.append(x)
        return skips


class _UpLevel(nn.Module):
    def __init__(
        self,
        dim: int,
        out_dim: int,
        stride: int,
        depth: int,
        emb_dim: int,
        num_heads: int,
        cond_dim: int | None,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, out_dim, stride, stride=stride)
        self.norm = LayerNorm2d(dim)
        self.blocks = ModuleSeq(DMConvBlock(dim, emb_dim, num_heads, drop_rate) for _ in range(depth))
        self.merge = nn.Linear(cond_dim, dim) if cond_dim else None


class UNetUp(nn.Module):
    """Decoder of SegP: from the deepest level, x += merge(cond); x = block(x + skip); x = up(LN(x + skip)).

    Consumes the skips of :class:`UNetDown` in reverse order; ``conds`` (the image features) broadcast
    over the batch, so one image may condition several samples.
    """

    def __init__(
        self,
        *,
        out_dim: int,
        patch_size: int,
        model_dim: int,
        emb_dim: int,
        depths: Sequence[int],
        dim_multi: Sequence[int],
        att_levels: Sequence[int] = (),
        head_dim: int = 64,
        cond_dim: int = -1,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [model_dim * m for m in dim_multi]
        self.layers = ModuleSeq(
            _UpLevel(
                dims[k],
                out_dim if k == 0 else dims[k - 1],
                patch_size if k == 0 else 2,
                depths[k],
                emb_dim,
                _heads(dims[k], k, att_levels, head_dim),
                cond_dim * dim_multi[k] if cond_dim > 0 else None,
                drop_rate,
            )
            for k in range(len(depths))
        )

    def forward(
        self, skips: Sequence[torch.Tensor], emb: torch.Tensor, conds: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The skips of :class:`UNetDown`, embedding (B, emb_dim) and image features -> (B, out_dim, H, W)."""
        skips = list(skips)
        x: torch.Tensor | float = 0.0
        for k, level in reversed(list(enumerate(self.layers))):
            if conds is not None and level.merge is not None:
                x = x + to_channels_first(level.merge(to_channels_last(conds[k])))
            for block in level.blocks:
                x = block(x + skips.pop(), emb)
            x = level.up(level.norm(x + skips.pop()))
        if skips:
            raise RuntimeError(f"{len(skips)} skips left unused: encoder and decoder depths differ")
        return x  # type: ignore[return-value]
