"""Model config of an original ctxseg (Flax) checkpoint, inferred from the shapes of its parameters.

The parameters are the flat ``{dotted nnx path: array}`` of
:func:`~napari_ctxseg.core.io.flax_unpickle.read_flax_params`; :func:`guess_kind` names the model kind
their top-level groups belong to and :func:`infer_config` reads widths, depths and patch size from their
shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..nn.config import MODEL_KINDS, ModelConfig, config_from_dict

__all__ = ["guess_kind", "infer_config"]

_TOP_LEVEL = {
    "seg-p": {"label_emb", "x_encoder", "y_encoder", "decoder"},
    "ctxseg-p": {"label_emb", "x_encoder", "y_encoder", "decoder", "atts", "ref_emb"},
    "seg-d": {"encoder", "decoder"},
    "ctxseg-d": {"encoder", "decoder", "ref_encoder", "atts"},
}


def guess_kind(params: Mapping[str, Any]) -> str | None:
    """The model kind whose top-level parameter groups match ``params`` exactly, or None."""
    found = {k.split(".", 1)[0] for k in params}
    return next((kind for kind, names in _TOP_LEVEL.items() if names == found), None)


def _shape(params: Mapping[str, np.ndarray], key: str, kind: str) -> tuple[int, ...]:
    if key not in params:
        raise CheckpointError(f"parameter {key!r} is missing; a {kind} checkpoint has it")
    return tuple(np.shape(params[key]))


def _indices(params: Mapping[str, Any], prefix: str, what: str) -> int:
    """Number of list entries ``prefix.<i>.`` (checked to be 0..n-1)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = sorted({int(m.group(1)) for k in params if (m := pattern.match(k))})
    if found != list(range(len(found))):
        raise CheckpointError(f"{what} under {prefix!r} are numbered {found}; expected 0..{len(found) - 1}")
    return len(found)


def _depths(params: Mapping[str, Any], prefix: str, n_levels: int) -> tuple[int, ...]:
    return tuple(_indices(params, f"{prefix}.layers.{k}.blocks", "blocks") for k in range(n_levels))


def _factor(widths: tuple[int, ...], preferred: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Split level widths into (dim, multipliers), preferring the original multipliers."""
    if len(preferred) == len(widths) and widths[0] % preferred[0] == 0:
        dim = widths[0] // preferred[0]
        if all(dim * m == w for m, w in zip(preferred, widths)):
            return dim, preferred
    dim = math.gcd(*widths)
    return dim, tuple(w // dim for w in widths)


def _mha_head_dim(
    params: Mapping[str, np.ndarray], prefixes: tuple[str, ...]
) -> tuple[tuple[int, ...], int | None]:
    """Levels whose U-Net blocks hold multi-head attention, and its head width (from (in, heads, hd))."""
    levels, head_dims = set(), set()
    pattern = re.compile(
        r"(?:" + "|".join(map(re.escape, prefixes)) + r")\.layers\.(\d+)\.blocks\.\d+\.att\.query\.kernel$"
    )
    for key, value in params.items():
        if m := pattern.match(key):
            levels.add(int(m.group(1)))
            head_dims.add(int(np.shape(value)[-1]))
    if len(head_dims) > 1:
        raise CheckpointError(
            f"the U-Net attention layers use different head widths {sorted(head_dims)}; "
            f"this port supports one head width for all levels"
        )
    return tuple(sorted(levels)), (head_dims.pop() if head_dims else None)


def _infer_p(kind: str, params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    n = _indices(params, "y_encoder.layers", "levels")
    if n == 0 or _indices(params, "x_encoder.layers", "levels") != n:
        raise CheckpointError(
            f"the flow encoder has {n} levels and the image encoder "
            f"{_indices(params, 'x_encoder.layers', 'levels')}; expected the same "
            f"number >= 1"
        )
    model_dim = _shape(params, "label_emb.noise_proj_1.kernel", kind)[1]
    widths = tuple(_shape(params, f"y_encoder.layers.{k}.down.kernel", kind)[3] for k in range(n))
    if any(w % model_dim for w in widths):
        raise CheckpointError(f"level widths {widths} are not multiples of the embedding width {model_dim}")
    patch = _shape(params, "x_encoder.layers.0.down.kernel", kind)
    fields: dict[str, Any] = dict(
        model_dim=model_dim,
        patch_size=patch[0],
        depths=_depths(params, "y_encoder", n),
        dim_multi=tuple(w // model_dim for w in widths),
        encoder_depths=_depths(params, "x_encoder", n),
        in_channels=patch[2],
    )
    att_levels, head_dim = _mha_head_dim(params, ("y_encoder", "decoder"))
    fields["att_levels"] = att_levels
    if head_dim is not None:
        fields["mha_head_dim"] = head_dim
    return fields


def _infer_d(kind: str, params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    n = _indices(params, "encoder.layers", "levels")
    if n == 0 or _indices(params, "decoder.layers", "levels") != n:
        raise CheckpointError(
            f"the encoder has {n} levels and the decoder "
            f"{_indices(params, 'decoder.layers', 'levels')}; expected the same "
            f"number >= 1"
        )
    patch = _shape(params, "encoder.layers.0.down.kernel", kind)
    enc = tuple(_shape(params, f"encoder.layers.{k}.down.kernel", kind)[3] for k in range(n))
    dec = tuple(_shape(params, f"decoder.layers.{k}.norm.scale", kind)[0] for k in range(n))
    encoder_dim, encoder_multi = _factor(enc, (1, 2, 4, 8))
    decoder_dim, decoder_multi = _factor(dec, (4, 4, 4, 8))
    fields: dict[str, Any] = dict(
        patch_size=patch[0],
        in_channels=patch[2],
        encoder_dim=encoder_dim,
        encoder_dim_multi=encoder_multi,
        encoder_depths=_depths(params, "encoder", n),
        decoder_dim=decoder_dim,
        decoder_dim_multi=decoder_multi,
        decoder_depths=_depths(params, "decoder", n),
        out_channels=_shape(params, "decoder.layers.0.up.kernel", kind)[3],
    )
    if kind == "ctxseg-d":
        fields["ref_encoder_dim"] = _shape(params, "ref_encoder.layers.0.down.kernel", kind)[3]
    return fields


def infer_config(
    kind: str, params: Mapping[str, np.ndarray], overrides: Mapping[str, Any] | None = None
) -> ModelConfig:
    """Derive a model config from the shapes of original (Flax) parameters.

    Read from shapes: widths (``model_dim`` from the label embedding, ``dim_multi`` from the level widths;
    SegD/CtxSegD encoder/decoder/ref-encoder widths), block counts per level, ``patch_size`` and
    ``in_channels`` from the patchify convolution, ``out_channels``, the levels with U-Net multi-head
    attention and its head width (kernel ``(in, heads, head_dim)``).

    Not readable from shapes, hence defaults unless overridden: ``ctx_head_dim`` (context-attention heads
    are plain ``Linear(dim, dim)`` layers; the original uses 128), ``ctx_att_kinds`` and ``drop_rate``.

    Parameters
    ----------
    kind
        ``"seg-p"``, ``"ctxseg-p"``, ``"seg-d"`` or ``"ctxseg-d"``.
    params
        Flat ``{dotted nnx path: array}`` as returned by :func:`read_flax_params`.
    overrides
        Config fields to set explicitly (e.g. ``{"ctx_head_dim": 8}``); they win over inferred values.

    Returns
    -------
    ModelConfig
        The validated config of ``kind``.

    Raises
    ------
    CheckpointError
        The parameters do not belong to a ``kind`` model (the message names the kind they look like), are
        inconsistent, or the defaults/overrides give an invalid config (e.g. widths that the default
        ``ctx_head_dim`` of 128 does not divide: pass the right ``ctx_head_dim``).
    ConfigError
        Unknown kind or unknown override fields.
    """
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    found = {k.split(".", 1)[0] for k in params}
    if found != _TOP_LEVEL[kind]:
        guess = guess_kind(params)
        hint = f"; they look like a {guess} model (use kind {guess!r})" if guess else ""
        raise CheckpointError(
            f"these parameters do not fit a {kind} model: top-level groups {sorted(found)}, expected "
            f"{sorted(_TOP_LEVEL[kind])} (missing {sorted(_TOP_LEVEL[kind] - found)}, unexpected "
            f"{sorted(found - _TOP_LEVEL[kind])}){hint}"
        )
    fields = _infer_p(kind, params) if kind.endswith("-p") else _infer_d(kind, params)
    overrides = dict(overrides or {})
    names = {f for f in MODEL_KINDS[kind].__dataclass_fields__}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"unknown {kind} config fields {unknown} in overrides; expected some of {sorted(names)}"
        )
    fields.update(overrides)
    try:
        return config_from_dict({"kind": kind, **fields})
    except ConfigError as exc:
        hint = ""
        if "ctx_head_dim" in str(exc):
            hint = (
                f" The context-attention head width cannot be read from the weights: pass the width the "
                f"model was built with (ctx_head_dim override, CLI --ctx-head-dim N; the original models "
                f"use 128, the reduced parity fixtures 8). Got ctx_head_dim="
                f"{fields.get('ctx_head_dim', 128)}."
            )
        raise CheckpointError(f"the parameters give an invalid {kind} config: {exc}.{hint}") from exc
