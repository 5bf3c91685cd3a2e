"""The four ctxseg models: SegP, CtxSegP (diffusion, predict flows) here, and SegD, CtxSegD (direct).

The direct models live in :mod:`napari_ctxseg.core.nn.d_models`; :func:`build_model` builds any of the
four from its config.

All tensors are NCHW: images (B, C, H, W) float in [0, 1]; flows and noisy latents (B, 2, H, W) with
channels (dy, dx); reference masks (N, H, W) bool (True = annotated). H and W must be multiples of
``config.stride`` (the services pad).

Models are stateless: the context (reference images with their flows) is encoded once into an explicit
:class:`PContext` / :class:`DContext` value, image features into :class:`ImageFeatures`, and both are
passed to every denoiser call, so a model is safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .attention import CtxAtt
from .checks import check_context, check_image
from .config import CtxSegDConfig, CtxSegPConfig, ModelConfig, SegDConfig, SegPConfig
from .convnext import ConvNeXt
from .d_models import CtxSegD, DContext, SegD
from .layers import ModuleSeq, resize_nearest
from .unet import LabelEmbedding, UNetDown, UNetUp

#: On CUDA the number of references a mixed batch encodes is rounded up to a multiple of this (see
#: :func:`reference_rows`): cuDNN picks and builds its kernels again for every new batch size.
CUDA_REFERENCE_BUCKET = 16


def _reference_bucket(device: torch.device) -> int:
    return CUDA_REFERENCE_BUCKET if device.type == "cuda" else 1  # on CPUs every reference costs


def reference_rows(weight: torch.Tensor, bucket: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch rows whose references a mixed batch encodes, and their context weights.

    Parameters
    ----------
    weight
        (B,) context weights; rows of weight 0 need no reference.
    bucket
        Round the number of rows up to a multiple of this (at most B) by repeating used rows with
        weight 0, so that batches with different numbers of context samples share a few shapes.

    Returns
    -------
    rows, row_weight, used
        Indices into the batch (the ``used`` rows of non-zero weight first, then the repeats) and the
        weight of each (0 for the repeats).
    """
    used_rows = torch.nonzero(weight != 0).flatten()
    used = len(used_rows)
    pad = min(-used % max(1, bucket), len(weight) - used) if used else 0
    if not pad:
        return used_rows, weight[used_rows], used
    repeats = used_rows[torch.arange(pad, device=weight.device) % used]
    rows = torch.cat([used_rows, repeats])
    return rows, torch.cat([weight[used_rows], weight.new_zeros(pad)]), used


__all__ = [
    "CtxSegD",
    "CtxSegP",
    "DContext",
    "ImageFeatures",
    "PContext",
    "SegD",
    "SegP",
    "build_model",
]


@dataclass
class PContext:
    """Encoded context of a P model: reference image features, reference flow skips and the mask."""

    x_ref: list[torch.Tensor]
    y_ref: list[torch.Tensor]
    mask: torch.Tensor | None

    @property
    def num_refs(self) -> int:
        """Number of reference images N."""
        return self.x_ref[0].shape[0]


@dataclass
class ImageFeatures:
    """What a P model needs of an image for every denoiser call (independent of x_t and sigma).

    ``ref_features`` holds the per-attention context features averaged over references, or None.
    """

    x_skips: list[torch.Tensor]
    ref_features: list[torch.Tensor] | None = None


class SegP(nn.Module):
    """Flow diffusion model conditioned on the image (the denoiser F of EDM)."""

    def __init__(self, config: SegPConfig | None = None) -> None:
        super().__init__()
        config = config or SegPConfig()
        self.config = config
        c = config
        self.label_emb = LabelEmbedding(c.model_dim, endpoint=True)
        self.x_encoder = ConvNeXt(c.in_channels, c.patch_size, c.encoder_depths, c.model_dim, c.dim_multi)
        unet: dict[str, Any] = dict(
            patch_size=c.patch_size,
            model_dim=c.model_dim,
            emb_dim=c.model_dim,
            depths=c.depths,
            dim_multi=c.dim_multi,
            att_levels=c.att_levels,
            head_dim=c.mha_head_dim,
            drop_rate=c.drop_rate,
        )
        self.y_encoder = UNetDown(in_dim=2, **unet)
        self.decoder = UNetUp(out_dim=2, cond_dim=c.model_dim, **unet)

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """ConvNeXt features of the image, one per level."""
        check_image(image, self.config.in_channels, self.config.stride)
        return self.x_encoder(image)

    def prepare(self, image: torch.Tensor, context: PContext | None = None) -> ImageFeatures:
        """Everything the denoiser needs of ``image`` (and the context); compute once per image."""
        if context is not None:
            raise ConfigError("SegP has no context path; use a CtxSegP checkpoint for in-context use")
        return ImageFeatures(self.encode_image(image))

    def forward(self, x_t: torch.Tensor, noise_labels: torch.Tensor, *, image: torch.Tensor) -> torch.Tensor:
        """F(x_t, c_noise | image), the original ``__call__``. Returns (B, 2, H, W)."""
        return self.predict(x_t, noise_labels, self.prepare(image))

    def predict(self, x_t: torch.Tensor, noise_labels: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """F(x_t, c_noise) with precomputed features; features of one image broadcast over samples."""
        emb = self.label_emb(noise_labels)
        y_skips = self._encode_flow(x_t, emb, features.ref_features)
        return self.decoder(y_skips, emb, conds=features.x_skips)

    def _encode_flow(
        self, y: torch.Tensor, emb: torch.Tensor, ref_features: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        if ref_features is None:
            return self.y_encoder(y, emb)
        feats = iter(ref_features)
        skips = []
        for level in self.y_encoder.layers:
            y = level.stem(y) + next(feats)
            skips.append(y)
            for block in level.blocks:
                y = block(y, emb) + next(feats)
                skips.append(y)
        return skips


class CtxSegP(SegP):
    """SegP with context attention: the flow encoder attends to annotated reference images.

    Without a context it is exactly SegP.
    """

    def __init__(self, config: CtxSegPConfig | None = None) -> None:
        config = config or CtxSegPConfig()
        super().__init__(config)
        c = config
        self.ref_emb = nn.Parameter(torch.zeros(1, c.model_dim))
        self.atts = ModuleSeq(
            ModuleSeq(
                CtxAtt((c.model_dim * m) // c.ctx_head_dim, c.model_dim * m, kind=c.ctx_att_kinds[k])
                for _ in range(c.depths[k] + 1)
            )
            for k, m in enumerate(c.dim_multi)
        )

    def encode_context(
        self, image_ref: torch.Tensor, flow_ref: torch.Tensor, ref_mask: torch.Tensor | None = None
    ) -> PContext:
        """Encode N reference images (N, C, H, W) with flows (N, 2, H, W) and masks (N, H, W) or None.

        The reference flow goes through the same flow encoder with the learned ``ref_emb`` as its
        embedding; the image through the same image encoder.
        """
        check_context(image_ref, flow_ref, ref_mask, self.config.in_channels, self.config.stride)
        x_ref = self.x_encoder(image_ref)
        y_ref = self.y_encoder(flow_ref, self.ref_emb.expand(image_ref.shape[0], -1))
        return PContext(x_ref, y_ref, None if ref_mask is None else ref_mask.bool())

    def prepare(self, image: torch.Tensor, context: PContext | None = None) -> ImageFeatures:
        """Image features, and the context features averaged over references (original ``set_image``)."""
        x_skips = self.encode_image(image)
        if context is None:
            return ImageFeatures(x_skips)
        n = context.num_refs
        y_ref = iter(context.y_ref)
        ref_features = []
        for k, atts in enumerate(self.atts):
            x_ref = context.x_ref[k]
            if context.mask is None:
                mask = torch.ones((n, *x_ref.shape[-2:]), dtype=torch.bool, device=x_ref.device)
            else:
                mask = resize_nearest(context.mask, (n, *x_ref.shape[-2:]))
            for att in atts:
                yy = att.batch_process(x_skips[k], x_ref, next(y_ref), mask)
                ref_features.append(yy)
        return ImageFeatures(x_skips, ref_features)

    def forward(
        self,
        x_t: torch.Tensor,
        noise_labels: torch.Tensor,
        *,
        image: torch.Tensor,
        image_ref: torch.Tensor | None = None,
        flow_ref: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
        context_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training-style call: reference i is paired with image i (the original ``__call__``).

        Parameters
        ----------
        ref_mask
            (B, H, W) bool; None means the whole reference is annotated (the original fails there).
        context_weight
            Optional (B,) weights multiplying the context features per sample: 0 gives exactly the
            no-context output, so one batch can mix samples with and without context (training).
        """
        if image_ref is None:
            return super().forward(x_t, noise_labels, image=image)
        if flow_ref is None:
            raise InputError("a reference image needs its reference flow (flow_ref)")
        if image_ref.shape[0] != image.shape[0]:
            raise InputError(
                f"training-style calls pair reference i with image i: got "
                f"{image_ref.shape[0]} references for {image.shape[0]} images"
            )
        # samples whose context weight is 0 get exactly zero context features (the output without
        # context): their references are neither encoded nor attended to, which saves half the context
        # work at a no-context probability of 0.5 (on CUDA a few are, with weight 0: reference_rows)
        weight = rows = None
        used = image.shape[0]
        if context_weight is not None:
            weight = context_weight.reshape(-1)
            rows, row_weight, used = reference_rows(weight, _reference_bucket(image.device))
            if used == 0:
                return super().forward(x_t, noise_labels, image=image)
            if used == len(weight):
                rows = None
            else:
                image_ref, flow_ref, weight = image_ref[rows], flow_ref[rows], row_weight
                ref_mask = None if ref_mask is None else ref_mask[rows]
        emb = self.label_emb(noise_labels)
        x_skips = self.encode_image(image)
        ctx = self.encode_context(image_ref, flow_ref, ref_mask)
        y_ref = iter(ctx.y_ref)
        features = []
        for k, atts in enumerate(self.atts):
            x_img = x_skips[k] if rows is None else x_skips[k][rows]
            shape = (x_img.shape[0], *x_img.shape[-2:])
            mask = (
                torch.ones(shape, dtype=torch.bool, device=image.device)
                if ctx.mask is None
                else resize_nearest(ctx.mask, shape)
            )
            for att in atts:
                f = att(x_img, ctx.x_ref[k], next(y_ref), mask)
                if weight is not None:
                    f = f * weight.to(f.dtype).view(-1, 1, 1, 1)
                if rows is not None:  # the used rows come first; repeats (weight 0) are dropped
                    f = f.new_zeros((image.shape[0], *f.shape[1:])).index_copy(0, rows[:used], f[:used])
                features.append(f)
        y_skips = self._encode_flow(x_t, emb, features)
        return self.decoder(y_skips, emb, conds=x_skips)


_CLASSES: dict[type[ModelConfig], type[nn.Module]] = {
    SegPConfig: SegP,
    CtxSegPConfig: CtxSegP,
    SegDConfig: SegD,
    CtxSegDConfig: CtxSegD,
}


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the model class of ``config`` (randomly initialised)."""
    try:
        cls = _CLASSES[type(config)]
    except KeyError:
        raise ConfigError(f"no model for config type {type(config).__name__}") from None
    return cls(config)
