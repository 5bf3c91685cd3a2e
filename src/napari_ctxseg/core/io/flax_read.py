"""Read the parameters of original ctxseg (JAX/Flax nnx) checkpoints without JAX or Flax.

Accepted files (the format is recognised from the file's first bytes, not its name):

- a flattened ``.npz`` of parameters (``{dotted nnx path: array}``), read with ``allow_pickle=False``;
- a plain ``pickle`` of an ``nnx.State`` written by flax 0.10.x (``VariableState`` leaves with ``.type`` and
  ``.value``) or 0.11.x (``State._mapping`` with ``Param`` leaves holding ``raw_value``);
- a ``cloudpickle`` of the original ``EMAOptimizer`` (its ``.ema_model`` is used, never ``.model``), of an
  ``nnx.Optimizer`` (``.model``) or of an nnx ``Module``.

Only ``nnx.Param`` leaves are returned; RNG keys and counts, optimizer state and non-parameter arrays
(``label_emb.freqs``) are dropped. Pickles are read only when the caller trusts the file (``trust=True``),
and then by the restricted unpickler of :mod:`napari_ctxseg.core.io.flax_unpickle`.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .flax_unpickle import NON_PARAM, unpickle_params

__all__ = ["FlaxParams", "read_flax_checkpoint", "read_flax_params"]

logger = logging.getLogger(__name__)

_UNPICKLE_WARNING = (
    "unpickling {path} runs code from the file; only convert checkpoints you trust (a restricted unpickler "
    "that refuses all but numpy and inert jax/flax stand-ins is used, but pickle is not a safe format)"
)


@dataclass(frozen=True)
class FlaxParams:
    """Parameters read from an original checkpoint.

    Attributes
    ----------
    params
        ``{dotted nnx path: float32 array in the original (Flax) layout}``, only ``nnx.Param`` leaves.
    source_format
        ``"npz"``, ``"flax-state-0.10"``, ``"flax-state-0.11"``, ``"ema-optimizer"``, ``"optimizer"``,
        ``"module"`` or ``"pure-dict"`` (plain nested dict of arrays); a pickled *state* of an optimizer adds
        ``"-ema-model"`` or ``"-model"`` (the part that was read).
    """

    params: dict[str, np.ndarray]
    source_format: str


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); expected a .npz of parameters or a Flax pickle")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        raise CheckpointError(
            f"{path} is a single .npy array; expected a .npz of all parameters "
            f"(np.savez(path, **flat_params))"
        )
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        raise CheckpointError(
            f"{path} looks like a safetensors file; napari-ctxseg checkpoints need no "
            f"conversion (load them directly)"
        )
    return "pickle"


def _as_float32(key: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise CheckpointError(
            f"parameter {key!r} is not an array (got {value!r}); the file may hold "
            f"parameters in a form this reader does not know"
        )
    if value.dtype.kind not in "fiu":
        raise CheckpointError(
            f"parameter {key!r} has dtype {value.dtype} (shape {value.shape}); expected a "
            f"floating-point array (bfloat16 is not supported: save as float32)"
        )
    return np.asarray(value, dtype=np.float32)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # our own handle: np.load leaves the file it opened open when the zip turns out corrupt
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"{path} is not a readable .npz of parameters (object arrays are refused; "
            f"corrupt or truncated?): {exc}"
        ) from exc
    params = {}
    for key, value in raw.items():
        key = key.replace("/", ".")
        if not NON_PARAM.search(key):
            params[key] = _as_float32(key, value)
    return params


def read_flax_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> FlaxParams:
    """Read the ``nnx.Param`` leaves of an original ctxseg checkpoint, with its format.

    Parameters
    ----------
    path
        A flattened ``.npz`` of parameters, a pickled ``nnx.State`` (flax 0.10/0.11), or a cloudpickled
        ``EMAOptimizer`` / ``nnx.Optimizer`` / nnx Module.
    trust
        Required (``True``) for pickles: unpickling runs code from the file. ``.npz`` files need no trust.

    Returns
    -------
    FlaxParams
        The flat parameters (float32, original layout) and the detected source format.

    Raises
    ------
    CheckpointError
        Missing, empty, corrupt or truncated file; a pickle without ``trust=True``; a pickle referring to a
        global outside numpy/jax/flax/ctxseg/optax/cloudpickle (e.g. ``os.system``); no parameters found.

    Warns
    -----
    UserWarning
        Whenever a pickle is unpickled (even with the restricted unpickler).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = _sniff(path)
    if kind == "npz":
        params = _read_npz(path)
        if not params:
            raise CheckpointError(f"{path} holds no parameter arrays")
        return FlaxParams(dict(sorted(params.items())), "npz")
    if not trust:
        raise CheckpointError(
            f"{path} is a pickle. Unpickling can run arbitrary code from the file, so it is refused unless "
            f"you trust where the file comes from: pass trust=True (CLI: --trust) to convert it with the "
            f"restricted unpickler, or export the parameters to a flattened .npz in a trusted environment."
        )
    message = _UNPICKLE_WARNING.format(path=path)
    warnings.warn(message, UserWarning, stacklevel=2)
    logger.info(message)
    params, fmt = unpickle_params(path)
    return FlaxParams({k: _as_float32(k, v) for k, v in sorted(params.items())}, fmt)


def read_flax_params(path: str | os.PathLike, *, trust: bool = False) -> dict[str, np.ndarray]:
    """Flat ``{dotted nnx path: float32 array}`` of an original checkpoint (see :func:`read_flax_checkpoint`).

    A pickle (``read_flax_params("ema_optimizer.pkl", trust=True)``) is read the same way, once trusted.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "params.npz"
    >>> np.savez(path, **{"x_encoder.layers.0.down.kernel": np.zeros((4, 4, 3, 128), np.float32)})
    >>> read_flax_params(path)["x_encoder.layers.0.down.kernel"].shape
    (4, 4, 3, 128)
    """
    return read_flax_checkpoint(path, trust=trust).params
