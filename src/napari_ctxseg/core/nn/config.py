"""Frozen, validated configurations of the four ctxseg models.

Defaults are the original sizes (model_dim 128, ConvNeXt depths (3, 3, 27, 3), patch 4, ...). Every size
the original hard-codes is a field here so that reduced models (parity fixtures, the bundled CPU model)
can be built. Checkpoints store ``config.to_dict()`` as JSON and rebuild models with :func:`config_from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from ..errors import ConfigError

__all__ = [
    "MODEL_KINDS",
    "AttentionKind",
    "CtxSegDConfig",
    "CtxSegPConfig",
    "ModelConfig",
    "SegDConfig",
    "SegPConfig",
    "config_from_dict",
]

ModelKind = Literal["seg-p", "ctxseg-p", "seg-d", "ctxseg-d"]
#: The context attention's normalisation (see :mod:`.attention`).
AttentionKind = Literal["sigmoid", "softmax", "linear"]
_ATT: tuple[str, ...] = get_args(AttentionKind)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _tuple_of_positive(name: str, value: tuple, length: int | None = None, allow_zero: bool = False) -> None:
    if not isinstance(value, tuple) or not value:
        raise ConfigError(f"{name} must be a non-empty tuple of integers, got {value!r}")
    low = 0 if allow_zero else 1
    if any(not isinstance(v, int) or v < low for v in value):
        raise ConfigError(f"{name} must hold integers >= {low}, got {value!r}")
    if length is not None and len(value) != length:
        raise ConfigError(f"{name} must have {length} entries (one per level), got {len(value)}: {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Base class: common serialisation. ``kind`` names the model class."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including ``kind``."""
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"kind": self.kind, **d}

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def stride(self) -> int:
        """Total down-sampling factor: input sizes must be multiples of it (each model class defines it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class SegPConfig(ModelConfig):
    """SegP: diffusion model of flows conditioned on the image.

    Parameters
    ----------
    model_dim, patch_size, depths, dim_multi
        The flow U-Net (UNetDown/UNetUp); original (128, 4, (2, 2, 2, 2), (1, 2, 4, 8)).
    encoder_depths
        ConvNeXt image encoder blocks per level; original (3, 3, 27, 3). Its widths are
        ``model_dim * dim_multi``.
    att_levels, mha_head_dim
        Levels with multi-head self-attention in the U-Net blocks, and the head width (original 64).
    in_channels
        Image channels (3: grey images are repeated, as the original's ``pad_channel``).
    drop_rate
        Whole-sample dropout of the U-Net blocks during training (original 0).
    """

    kind: ClassVar[str] = "seg-p"
    model_dim: int = 128
    patch_size: int = 4
    depths: tuple[int, ...] = (2, 2, 2, 2)
    dim_multi: tuple[int, ...] = (1, 2, 4, 8)
    encoder_depths: tuple[int, ...] = (3, 3, 27, 3)
    att_levels: tuple[int, ...] = (2, 3)
    mha_head_dim: int = 64
    in_channels: int = 3
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("depths", "dim_multi", "encoder_depths", "att_levels"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _positive("model_dim", self.model_dim)
        _positive("patch_size", self.patch_size)
        _positive("mha_head_dim", self.mha_head_dim)
        _positive("in_channels", self.in_channels)
        _tuple_of_positive("depths", self.depths, allow_zero=True)
        _tuple_of_positive("dim_multi", self.dim_multi, len(self.depths))
        _tuple_of_positive("encoder_depths", self.encoder_depths, len(self.depths), allow_zero=True)
        if any(lvl < 0 or lvl >= len(self.depths) for lvl in self.att_levels):
            raise ConfigError(f"att_levels {self.att_levels} must be levels in 0..{len(self.depths) - 1}")
        for lvl in self.att_levels:
            dim = self.model_dim * self.dim_multi[lvl]
            if dim % self.mha_head_dim:
                raise ConfigError(
                    f"level {lvl} width {dim} is not a multiple of mha_head_dim {self.mha_head_dim}"
                )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def stride(self) -> int:
        """Total down-sampling factor: input sizes must be multiples of it (or are padded)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)


@dataclass(frozen=True)
class CtxSegPConfig(SegPConfig):
    """CtxSegP: SegP plus context attention to annotated reference images.

    Parameters
    ----------
    ctx_head_dim
        Head width of the context attention (original 128: heads = dim // 128).
    ctx_att_kinds
        Attention kind per level (original: linear at level 0, sigmoid elsewhere).
    """

    kind: ClassVar[str] = "ctxseg-p"
    ctx_head_dim: int = 128
    ctx_att_kinds: tuple[AttentionKind, ...] = field(default=("linear", "sigmoid", "sigmoid", "sigmoid"))

    def __post_init__(self) -> None:
        if isinstance(self.ctx_att_kinds, list):
            object.__setattr__(self, "ctx_att_kinds", tuple(self.ctx_att_kinds))
        super().__post_init__()
        _positive("ctx_head_dim", self.ctx_head_dim)
        if len(self.ctx_att_kinds) != len(self.depths) or any(k not in _ATT for k in self.ctx_att_kinds):
            raise ConfigError(
                f"ctx_att_kinds must give one of {_ATT} per level ({len(self.depths)}), "
                f"got {self.ctx_att_kinds!r}"
            )
        for m in self.dim_multi:
            if (self.model_dim * m) % self.ctx_head_dim:
                raise ConfigError(
                    f"width {self.model_dim * m} is not a multiple of ctx_head_dim {self.ctx_head_dim}"
                )


@dataclass(frozen=True)
class SegDConfig(ModelConfig):
    """SegD: direct (non-diffusion) predictor; ConvNeXt encoder and convolutional decoder, 3 outputs."""

    kind: ClassVar[str] = "seg-d"
    patch_size: int = 4
    encoder_dim: int = 128
    encoder_depths: tuple[int, ...] = (3, 3, 27, 3)
    encoder_dim_multi: tuple[int, ...] = (1, 2, 4, 8)
    decoder_dim: int = 128
    decoder_depths: tuple[int, ...] = (2, 2, 2, 1)
    decoder_dim_multi: tuple[int, ...] = (4, 4, 4, 8)
    out_channels: int = 3
    in_channels: int = 3
    drop_rate: float = 0.2

    def __post_init__(self) -> None:
        for name in ("encoder_depths", "encoder_dim_multi", "decoder_depths", "decoder_dim_multi"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("patch_size", "encoder_dim", "decoder_dim", "out_channels", "in_channels"):
            _positive(name, getattr(self, name))
        n = len(self.encoder_depths)
        _tuple_of_positive("encoder_depths", self.encoder_depths, allow_zero=True)
        _tuple_of_positive("encoder_dim_multi", self.encoder_dim_multi, n)
        _tuple_of_positive("decoder_depths", self.decoder_depths, n, allow_zero=True)
        _tuple_of_positive("decoder_dim_multi", self.decoder_dim_multi, n)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def stride(self) -> int:
        """Total down-sampling factor: input sizes must be multiples of it (or are padded)."""
        return self.patch_size * 2 ** (len(self.encoder_depths) - 1)


@dataclass(frozen=True)
class CtxSegDConfig(SegDConfig):
    """CtxSegD: SegD whose decoder attends to a reference image and its flow.

    Parameters
    ----------
    ref_encoder_dim
        Width of the flow encoder (original 64); its depths equal ``encoder_depths``.
    ctx_head_dim, ctx_att_kinds
        Context attention head width (original 128) and kind per level (linear, linear, sigmoid, sigmoid).
    """

    kind: ClassVar[str] = "ctxseg-d"
    ref_encoder_dim: int = 64
    ctx_head_dim: int = 128
    ctx_att_kinds: tuple[AttentionKind, ...] = ("linear", "linear", "sigmoid", "sigmoid")

    def __post_init__(self) -> None:
        if isinstance(self.ctx_att_kinds, list):
            object.__setattr__(self, "ctx_att_kinds", tuple(self.ctx_att_kinds))
        super().__post_init__()
        _positive("ref_encoder_dim", self.ref_encoder_dim)
        _positive("ctx_head_dim", self.ctx_head_dim)
        if len(self.ctx_att_kinds) != len(self.encoder_depths) or any(
            k not in _ATT for k in self.ctx_att_kinds
        ):
            raise ConfigError(f"ctx_att_kinds must give one of {_ATT} per level, got {self.ctx_att_kinds!r}")
        for m in self.decoder_dim_multi:
            if (self.decoder_dim * m) % self.ctx_head_dim:
                raise ConfigError(
                    f"decoder width {self.decoder_dim * m} is not a multiple of ctx_head_dim "
                    f"{self.ctx_head_dim}"
                )


MODEL_KINDS: dict[str, type[ModelConfig]] = {
    c.kind: c for c in (SegPConfig, CtxSegPConfig, SegDConfig, CtxSegDConfig)
}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from :meth:`ModelConfig.to_dict` output.

    Raises
    ------
    ConfigError
        Unknown kind, unknown fields or invalid values.
    """
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    cls = MODEL_KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {kind} config fields {unknown}; expected a subset of {sorted(names)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except TypeError as exc:  # wrong value types that dataclasses reject
        raise ConfigError(f"invalid {kind} config: {exc}") from exc
