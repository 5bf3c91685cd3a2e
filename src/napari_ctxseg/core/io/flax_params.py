"""Map flattened Flax (nnx) parameters of the original ctxseg onto the PyTorch port, and back.

Keys of the flat Flax dict are nnx paths joined by dots (``x_encoder.layers.2.blocks.1.conv.kernel``);
torch module names mirror those paths, so the mapping is decided per module type:

=================================  ======================  =======================================
Flax parameter                     shape                   PyTorch
=================================  ======================  =======================================
``Linear.kernel``                  (in, out)               ``weight = kernel.T``
``Conv.kernel``                    (kh, kw, in/g, out)     ``weight = kernel.transpose(3, 2, 0, 1)``
``ConvTranspose.kernel``           (kh, kw, in, out)       ``flip(kernel, 0, 1).transpose(2, 3, 0, 1)``
``LayerNorm.scale``                (C,)                    ``weight``
``GRN.gamma / beta``               (1, 1, 1, C)            (C,)
``MultiHeadAttention.*.kernel``    (in, heads, hd)         ``reshape(in, heads * hd).T``
``MultiHeadAttention.out.kernel``  (heads, hd, out)        ``reshape(heads * hd, out).T``
=================================  ======================  =======================================

This module reads no files: it only converts arrays (pickles are handled in :mod:`.flax_pickle`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..nn.layers import GRN, LayerNorm, MultiHeadSelfAttention

__all__ = ["flax_to_state_dict", "state_dict_to_flax"]


def _conv_weight(k: np.ndarray) -> np.ndarray:
    return k.transpose(3, 2, 0, 1)


def _conv_t_weight(k: np.ndarray) -> np.ndarray:
    return np.flip(k, axis=(0, 1)).transpose(2, 3, 0, 1)


def _pairs(model: nn.Module) -> Iterator[tuple[str, str, str, object]]:
    """Yield (torch key, flax key, rule, module) for every parameter of ``model``."""
    mha = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, MultiHeadSelfAttention))
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, MultiHeadSelfAttention):
            for proj in ("query", "key", "value", "out"):
                yield f"{prefix}{proj}.weight", f"{prefix}{proj}.kernel", f"mha_{proj}_kernel", module
                yield f"{prefix}{proj}.bias", f"{prefix}{proj}.bias", f"mha_{proj}_bias", module
            continue
        if name.startswith(mha):  # the projections inside an attention module, handled above
            continue
        direct = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.ConvTranspose2d):
            rules = {"weight": ("kernel", "conv_t"), "bias": ("bias", "same")}
        elif isinstance(module, nn.Conv2d):
            rules = {"weight": ("kernel", "conv"), "bias": ("bias", "same")}
        elif isinstance(module, nn.Linear):
            rules = {"weight": ("kernel", "linear"), "bias": ("bias", "same")}
        elif isinstance(module, LayerNorm):
            rules = {"weight": ("scale", "same"), "bias": ("bias", "same")}
        elif isinstance(module, GRN):
            rules = {"gamma": ("gamma", "grn"), "beta": ("beta", "grn")}
        else:
            rules = {p: (p, "same") for p in direct}
        for pname in direct:
            fname, rule = rules[pname]
            yield f"{prefix}{pname}", f"{prefix}{fname}", rule, module


def _to_torch(rule: str, a: np.ndarray, module: object) -> np.ndarray:
    if rule == "same":
        return a
    if rule == "linear":
        return a.T
    if rule == "conv":
        return _conv_weight(a)
    if rule == "conv_t":
        return _conv_t_weight(a)
    if rule == "grn":
        return a.reshape(-1)
    if rule.startswith("mha_"):
        if rule == "mha_out_kernel":
            return a.reshape(-1, a.shape[-1]).T
        if rule.endswith("_kernel"):
            return a.reshape(a.shape[0], -1).T
        return a.reshape(-1)
    raise AssertionError(rule)


def _to_flax(rule: str, t: np.ndarray, module: object) -> np.ndarray:
    if rule == "same":
        return t
    if rule == "linear":
        return t.T
    if rule == "conv":
        return t.transpose(2, 3, 1, 0)
    if rule == "conv_t":
        return np.flip(t.transpose(2, 3, 0, 1), axis=(0, 1))
    if rule == "grn":
        return t.reshape(1, 1, 1, -1)
    if rule.startswith("mha_"):
        heads = module.num_heads  # type: ignore[attr-defined]
        if rule == "mha_out_kernel":
            return t.T.reshape(heads, -1, t.shape[0])
        if rule.endswith("_kernel"):
            return t.T.reshape(t.shape[1], heads, -1)
        if rule == "mha_out_bias":
            return t
        return t.reshape(heads, -1)
    raise AssertionError(rule)


def flax_to_state_dict(
    model: nn.Module, params: Mapping[str, np.ndarray], *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Convert flat Flax parameters into a ``state_dict`` for ``model``.

    Parameters
    ----------
    model
        A port model built from the matching config (its module names give the Flax paths).
    params
        Flat dict ``{dotted nnx path: array}`` in the original layouts (only ``nnx.Param`` entries).
    strict
        Raise if Flax parameters are left unused.

    Raises
    ------
    CheckpointError
        A missing parameter, a shape mismatch, or (strict) unused parameters; the message lists them.
    """
    state: dict[str, torch.Tensor] = {}
    used = set()
    missing, mismatched = [], []
    expected = dict(model.state_dict())
    for tkey, fkey, rule, module in _pairs(model):
        if fkey not in params:
            missing.append(fkey)
            continue
        used.add(fkey)
        arr = np.ascontiguousarray(_to_torch(rule, np.asarray(params[fkey]), module), dtype=np.float32)
        if tuple(arr.shape) != tuple(expected[tkey].shape):
            mismatched.append(
                f"{fkey}: {tuple(np.shape(params[fkey]))} -> {arr.shape}, "
                f"expected {tuple(expected[tkey].shape)}"
            )
            continue
        state[tkey] = torch.from_numpy(arr)
    unused = sorted(set(params) - used) if strict else []
    if missing or mismatched or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with wrong shapes (e.g. {mismatched[:2]})")
        if unused:
            parts.append(f"{len(unused)} not used by the model (e.g. {unused[:3]})")
        raise CheckpointError(
            f"Flax parameters do not fit a {type(model).__name__} with config "
            f"{model.config}: " + "; ".join(parts)
        )
    return state


def state_dict_to_flax(model: nn.Module) -> dict[str, np.ndarray]:
    """The inverse mapping: the model's parameters as flat Flax arrays (for round-trip tests)."""
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return {
        fkey: np.ascontiguousarray(_to_flax(rule, sd[tkey], module))
        for tkey, fkey, rule, module in _pairs(model)
    }
