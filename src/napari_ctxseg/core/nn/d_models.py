"""The direct ctxseg models SegD and CtxSegD: one forward pass from the image to the prediction.

All tensors are NCHW: images (B, C, H, W) float in [0, 1]; reference flows (N, 2, H, W); reference masks
(N, H, W) bool (True = annotated). H and W must be multiples of ``config.stride``. The context is encoded
once into an explicit :class:`DContext` value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .attention import CtxAtt
from .checks import check_context, check_image
from .config import CtxSegDConfig, SegDConfig
from .convnext import ConvDecoder, ConvNeXt
from .layers import ModuleSeq

__all__ = ["CtxSegD", "DContext", "SegD"]


@dataclass
class DContext:
    """Encoded context of CtxSegD: per level concat(image features, flow features) and the mask."""

    kv: list[torch.Tensor]
    mask: torch.Tensor | None


class SegD(nn.Module):
    """Direct model: ConvNeXt encoder and convolutional decoder; returns (B, out_channels, H, W)."""

    def __init__(self, config: SegDConfig | None = None) -> None:
        super().__init__()
        config = config or SegDConfig()
        self.config = config
        c = config
        self.encoder = ConvNeXt(
            c.in_channels, c.patch_size, c.encoder_depths, c.encoder_dim, c.encoder_dim_multi
        )
        # encoder skip k has encoder_dim * encoder_dim_multi[k] channels, projected by a Linear
        self.decoder = ConvDecoder(
            c.out_channels,
            c.patch_size,
            c.decoder_dim,
            c.decoder_depths,
            c.decoder_dim_multi,
            skip_multi=c.encoder_dim_multi,
            skip_dim=c.encoder_dim,
            drop_rate=c.drop_rate,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the prediction (B, out_channels, H, W)."""
        check_image(image, self.config.in_channels, self.config.stride)
        return self.decoder(self.encoder(image))

    def predict(self, image: torch.Tensor, context: DContext | None = None) -> torch.Tensor:
        """The prediction (B, out_channels, H, W) for ``image`` (B, C, H, W); SegD takes no context."""
        if context is not None:
            raise ConfigError("SegD has no context path; use a CtxSegD checkpoint for in-context use")
        return self(image)


class CtxSegD(SegD):
    """SegD whose decoder levels attend to reference features (image and flow, concatenated)."""

    def __init__(self, config: CtxSegDConfig | None = None) -> None:
        config = config or CtxSegDConfig()
        super().__init__(config)
        c = config
        self.ref_encoder = ConvNeXt(2, c.patch_size, c.encoder_depths, c.ref_encoder_dim, c.encoder_dim_multi)
        self.atts: ModuleSeq[CtxAtt] = ModuleSeq()
        for k in range(len(c.encoder_depths)):
            q_dim = c.decoder_dim * c.decoder_dim_multi[k]
            kv_dim = (c.encoder_dim + c.ref_encoder_dim) * c.encoder_dim_multi[k]
            self.atts.append(CtxAtt(q_dim // c.ctx_head_dim, q_dim, kv_dim, kv_dim, kind=c.ctx_att_kinds[k]))

    def encode_context(
        self, image_ref: torch.Tensor, flow_ref: torch.Tensor, ref_mask: torch.Tensor | None = None
    ) -> DContext:
        """Encode references: per level concat(encoder(image_ref), ref_encoder(flow_ref)) on channels."""
        check_context(image_ref, flow_ref, ref_mask, self.config.in_channels, self.config.stride)
        kv = [torch.cat([x, y], dim=1) for x, y in zip(self.encoder(image_ref), self.ref_encoder(flow_ref))]
        return DContext(kv, None if ref_mask is None else ref_mask.bool())

    def _decode(self, image: torch.Tensor, context: DContext | None, paired: bool) -> torch.Tensor:
        check_image(image, self.config.in_channels, self.config.stride)
        skips = self.encoder(image)
        x: torch.Tensor | None = None
        for k in reversed(range(len(skips))):
            skip = self.decoder.layers[k].project_skip(skips[k])
            x = skip if x is None else x + skip
            if context is not None:
                kv = context.kv[k]
                if paired:
                    x = self.atts[k](x, kv, kv, context.mask)
                else:
                    x = self.atts[k].batch_process(x, kv, kv, context.mask)
            x = self.decoder.level_forward(k, x)
        assert x is not None  # the model has at least one level
        return x

    def forward(
        self,
        image: torch.Tensor,
        ref_image: torch.Tensor | None = None,
        ref_flow: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training-style call: reference i is paired with image i."""
        if ref_image is None:
            return self._decode(image, None, paired=True)
        if ref_flow is None:
            raise InputError("a reference image needs its reference flow (ref_flow)")
        return self._decode(image, self.encode_context(ref_image, ref_flow, ref_mask), paired=True)

    def predict(self, image: torch.Tensor, context: DContext | None = None) -> torch.Tensor:
        """Every image attends to every reference separately; results are averaged over references."""
        return self._decode(image, context, paired=False)
