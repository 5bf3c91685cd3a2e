"""Convert an original ctxseg (JAX/Flax) checkpoint into a napari-ctxseg ``.safetensors`` checkpoint.

The use case behind ``ctxseg convert SRC -o DST --model KIND [--trust] [--ctx-head-dim N] [--half]``:
read the ``nnx.Param`` leaves (:mod:`napari_ctxseg.core.io.flax_read`), derive the config from their
shapes (:mod:`napari_ctxseg.core.io.flax_config`), map them onto the PyTorch model (strict: every parameter
used, every weight set; :mod:`napari_ctxseg.core.io.flax_params`), write the checkpoint atomically, and
verify it by loading it back. Pickles are only read with ``trust=True``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from napari_ctxseg import __version__
from napari_ctxseg.core.errors import CheckpointError, ConfigError, InputError
from napari_ctxseg.core.io.checkpoint import CheckpointInfo, file_sha256, save_checkpoint
from napari_ctxseg.core.io.flax_config import infer_config
from napari_ctxseg.core.io.flax_params import flax_to_state_dict
from napari_ctxseg.core.io.flax_read import read_flax_checkpoint
from napari_ctxseg.core.nn.load import load_checkpoint
from napari_ctxseg.core.nn.models import build_model

__all__ = ["convert_flax_checkpoint"]

_FP16_MAX = float(torch.finfo(torch.float16).max)


def convert_flax_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    kind: str,
    trust: bool = False,
    overrides: Mapping[str, Any] | None = None,
    sigma_data: float = 1.0,
    half: bool = False,
) -> CheckpointInfo:
    """Convert an original Flax checkpoint of ctxseg into a verified napari-ctxseg checkpoint.

    Parameters
    ----------
    src
        A flattened ``.npz`` of parameters, a pickled ``nnx.State`` (flax 0.10/0.11), or a cloudpickled
        original ``EMAOptimizer`` (its ``ema_model`` is converted), ``nnx.Optimizer`` or nnx Module.
    dst
        The ``.safetensors`` file to write (atomically; its folder is created). Must not be ``src``.
    kind
        The model the weights belong to: ``"ctxseg-p"``, ``"seg-p"``, ``"seg-d"`` or ``"ctxseg-d"``.
    trust
        Must be True to read a pickle: unpickling runs code from the file (a restricted unpickler is used,
        but only convert files whose origin you trust). ``.npz`` files need no trust.
    overrides
        Config fields the weights cannot tell, e.g. ``{"ctx_head_dim": 8}`` (context-attention head width;
        the original models use 128) or ``{"ctx_att_kinds": [...]}``.
    sigma_data
        EDM sigma_data stored in the checkpoint (the original inference uses 1.0).
    half
        Store the weights as float16 (half the file size; loading returns float32).

    Returns
    -------
    CheckpointInfo
        Of the written file (path, config, sigma_data, provenance, sha256). ``provenance`` holds
        ``converted_from``, ``source_sha256``, ``source_format``, ``converter``, ``overrides`` and
        ``stored_dtype``.

    Raises
    ------
    CheckpointError
        Unreadable, truncated or untrusted source; a pickle referring to forbidden globals; parameters that
        do not fit ``kind`` (the message names the kind they look like) or the config; weights outside the
        float16 range with ``half``; a written file that does not load back identically.
    ConfigError
        Unknown ``kind``, unknown override fields, invalid ``sigma_data``.
    InputError
        ``dst`` is the source file.

    Warns
    -----
    UserWarning
        When a pickle is unpickled.

    Examples
    --------
    An original checkpoint (a file from the ctxseg authors, so this example does not run)::

        info = convert_flax_checkpoint("model.pkl", "model.safetensors", kind="ctxseg-p", trust=True)
        info.config.model_dim  # 128
    """
    src, dst = Path(src), Path(dst)
    if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
        raise ConfigError(f"sigma_data must be a positive finite number, got {sigma_data!r}")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InputError(f"the destination {dst} is the source file; choose another output path")
    source = read_flax_checkpoint(src, trust=trust)
    source_format = source.source_format
    config = infer_config(kind, source.params, overrides)
    model = build_model(config).eval()
    state = flax_to_state_dict(model, source.params, strict=True)
    del source  # one copy of the weights less in memory (full-size models have 179 M parameters)
    model.load_state_dict(state, strict=True)
    if half:
        too_big = [k for k, v in state.items() if v.is_floating_point() and v.abs().max().item() > _FP16_MAX]
        if too_big:
            raise CheckpointError(
                f"weights {too_big[:3]} exceed the float16 range (max {_FP16_MAX}); convert without --half"
            )
    provenance = {
        "converted_from": src.name,
        "source_sha256": file_sha256(src),
        "source_format": source_format,
        "converter": f"napari-ctxseg {__version__}",
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in (overrides or {}).items()},
        "stored_dtype": "float16" if half else "float32",
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".converting", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_checkpoint(
            tmp,
            model,
            sigma_data=float(sigma_data),
            provenance=provenance,
            dtype=torch.float16 if half else None,
        )
        info = _verify(tmp, kind, state, half)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dataclasses.replace(info, path=dst)


def _verify(path: Path, kind: str, state: Mapping[str, torch.Tensor], half: bool) -> CheckpointInfo:
    """Load the written file back and compare every tensor with what was meant to be stored."""
    loaded, info = load_checkpoint(path, expected_kinds=(kind,))
    got = loaded.state_dict()
    for key, expected in state.items():
        if half and expected.is_floating_point():
            expected = expected.half().float()
        if not torch.equal(got[key], expected):
            raise CheckpointError(
                f"verification failed: tensor {key!r} read back from {path} differs from "
                f"the converted weights (disk full or a faulty file system?)"
            )
    return info
