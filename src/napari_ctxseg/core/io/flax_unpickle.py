"""Read the parameters of original ctxseg (JAX/Flax nnx) checkpoints without JAX or Flax.

Accepted files (the format is recognised from the file's first bytes, not its name):

- a flattened ``.npz`` of parameters (``{dotted nnx path: array}``), read with ``allow_pickle=False``;
- a plain ``pickle`` of an ``nnx.State`` written by flax 0.10.x (``VariableState`` leaves with ``.type`` and
  ``.value``) or 0.11.x (``State._mapping`` with ``Param`` leaves holding ``raw_value``);
- a ``cloudpickle`` of the original ``EMAOptimizer`` (its ``.ema_model`` is used, never ``.model``), of an
  ``nnx.Optimizer`` (``.model``) or of an nnx ``Module``.

Only ``nnx.Param`` leaves are returned; RNG keys and counts, optimizer state and non-parameter arrays
(``label_emb.freqs``) are dropped.

Pickles are read by :class:`RestrictedUnpickler`: numpy array/dtype reconstructors are the only real
callables it hands to ``pickle``; jax arrays are rebuilt as numpy arrays; every jax, flax, optax, ctxseg,
cloudpickle and contextlib class or function becomes an inert stub that only records what it is given, and
any other global (``builtins.eval``, ``os.system``, ``subprocess.*``, ...) is refused. Even so, unpickling is
only done for files the caller explicitly trusts (``trust=True``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..nn.config import MODEL_KINDS, ModelConfig, config_from_dict

__all__ = [
    "FlaxParams",
    "RestrictedUnpickler",
    "guess_kind",
    "infer_config",
    "read_flax_checkpoint",
    "read_flax_params",
]

logger = logging.getLogger(__name__)

#: Module prefixes whose globals become inert stubs (never imported, never run).
STUB_PREFIXES = ("jax", "jaxlib", "flax", "ctxseg", "cloudpickle", "optax", "contextlib", "einops", "chex")

# numpy.(_)core.multiarray._reconstruct
_NP_RECONSTRUCT: Any = np.ndarray.__reduce__(np.zeros(1, np.float32))[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
_NP_FROMBUFFER = np.zeros(1, np.float32).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer (protocol 5)
_MAX_DEPTH = 200
_MAX_NODES = 5_000_000
_UNPICKLE_WARNING = (
    "unpickling {path} runs code from the file; only convert checkpoints you trust (a restricted unpickler "
    "that refuses all but numpy and inert jax/flax stand-ins is used, but pickle is not a safe format)"
)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"refusing _codecs.encode with encoding {encoding!r} in a pickle")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "range"): range,
    ("builtins", "object"): object,
}


# ---------------------------------------------------------------------------------------------------------
# Inert stand-ins


class _Stub:
    """Inert stand-in for a class or function of jax/flax/ctxseg/...: records what it receives, runs nothing.

    Attributes set by ``pickle`` (``BUILD`` state) go to ``__dict__`` so the object tree can be walked.
    """

    _stub_name = "stub"  # "module.qualname" of the original global

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_stub_state"] = state
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:  # (dict state, slot state) as pickle produces for classes with __slots__
            if isinstance(part, dict):
                self.__dict__.update({k: v for k, v in part.items() if isinstance(k, str)})

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_stub_list", []).extend(values)

    def add(self, value: Any) -> None:
        self.__dict__.setdefault("_stub_set", []).append(value)

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub(*args)

    def __repr__(self) -> str:
        return f"<inert stand-in for {type(self)._stub_name}>"


def _stub_class(module: str, name: str, base: type = _Stub) -> type:
    qualname = f"{module}.{name}"
    return type(name.rsplit(".", 1)[-1], (base,), {"_stub_name": qualname, "__module__": __name__})


class _DummyModule(_Stub):
    """What ``cloudpickle.subimport(name)`` returns here: a named placeholder, no import."""

    _stub_name = "module"


def _subimport(name: str, *args: Any) -> _DummyModule:
    mod = _DummyModule()
    mod.__dict__["name"] = name
    return mod


def _make_skeleton_class(type_constructor: Any = None, name: Any = "dynamic", *args: Any) -> type:
    """cloudpickle's dynamic classes (pickled by value) become stub classes; instances need a real type."""
    return _stub_class("<cloudpickle>", str(name))


def _reconstruct_array(fun: Any, args: Any, state: Any, aval: Any = None) -> np.ndarray:
    """``jax._src.array._reconstruct_array``: rebuild the numpy array (jax arrays pickle their numpy copy)."""
    if fun is not _NP_RECONSTRUCT:
        raise CheckpointError(
            f"a jax array in the pickle uses the reconstructor {fun!r}; expected numpy's _reconstruct"
        )
    try:
        arr = fun(*args)
        arr.__setstate__(state)
    except Exception as exc:
        raise CheckpointError(f"a jax array in the pickle could not be rebuilt: {exc}") from exc
    return arr


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that never imports or runs jax/flax/ctxseg code and refuses every unknown global.

    ``find_class`` returns: numpy's array/dtype/scalar reconstructors (and a few harmless builtins); a numpy
    re-implementation of ``jax._src.array._reconstruct_array``; placeholders for cloudpickle's
    ``subimport`` and dynamic classes; inert :class:`_Stub` subclasses for every other global of
    :data:`STUB_PREFIXES`. Anything else raises :class:`CheckpointError` before it can run.
    """

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file)
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        """The allowed numpy/builtin global, or a stub for jax/flax names; anything else is refused."""
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        top = module.split(".", 1)[0]
        if top not in STUB_PREFIXES:
            raise CheckpointError(
                f"refusing to load global {module}.{name} from a pickle (only numpy arrays "
                f"and inert stand-ins for jax/flax/ctxseg objects are allowed)"
            )
        if (module, name) == ("jax._src.array", "_reconstruct_array"):
            return _reconstruct_array
        if top == "cloudpickle" and name in ("subimport", "dynamic_subimport"):
            return _subimport
        if top == "cloudpickle" and name in ("_make_skeleton_class", "_make_skeleton_enum"):
            return _make_skeleton_class
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = _stub_class(module, name)
        return self._stubs[key]

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (never written by pickle.dump or cloudpickle)."""
        raise CheckpointError(
            f"refusing persistent id {pid!r} in a pickle (pickle.dump and cloudpickle never write one)"
        )


# ---------------------------------------------------------------------------------------------------------
# Walking the unpickled tree


def _short(obj: Any) -> str:
    return type(obj)._stub_name.rsplit(".", 1)[-1] if isinstance(obj, _Stub) else ""


def _is_param_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, _Stub) and cls._stub_name.rsplit(".", 1)[-1] == "Param"


class _Walker:
    """Collect ``nnx.Param`` leaves (and, as a fallback, bare arrays) with their dotted paths."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.leaf_kinds: set[str] = set()
        self._nodes = 0

    def _add(self, table: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
        key = ".".join(path)
        if key in table:
            raise CheckpointError(f"parameter path {key!r} occurs twice in the pickle")
        table[key] = value

    def walk(self, node: Any, path: tuple[str, ...] = (), stack: frozenset[int] = frozenset()) -> None:
        self._nodes += 1
        if self._nodes > _MAX_NODES or len(path) > _MAX_DEPTH:
            raise CheckpointError(f"the pickled object tree is too large or too deep (at {'.'.join(path)!r})")
        if id(node) in stack:  # a reference cycle: not a parameter tree
            return
        stack = stack | {id(node)}
        if isinstance(node, np.ndarray):
            self._add(self.arrays, path, node)
        elif isinstance(node, dict):
            for k, v in node.items():
                self.walk(v, (*path, str(k)), stack)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                self.walk(v, (*path, str(i)), stack)
        elif isinstance(node, _Stub):
            self._walk_stub(node, path, stack)

    def _walk_stub(self, node: _Stub, path: tuple[str, ...], stack: frozenset[int]) -> None:
        short, attrs = _short(node), node.__dict__
        if short == "VariableState":  # flax 0.10: .type is the Variable class, .value the array
            if _is_param_class(attrs.get("type")):
                self.leaf_kinds.add("VariableState")
                self._add(self.params, path, attrs.get("value"))
            return
        if short == "Param":  # flax Variable (0.10 modules, 0.11 states): the array is raw_value
            self.leaf_kinds.add("Param")
            self._add(self.params, path, attrs.get("raw_value", attrs.get("value")))
            return
        if "raw_value" in attrs or short.endswith(("Variable", "VariableState")) or short in _OTHER_VARIABLES:
            return  # RNG keys/counts, optimizer state, batch stats, caches...
        if short == "State" and isinstance(attrs.get("_mapping"), dict):
            self.walk(attrs["_mapping"], path, stack)
            return
        public = {k: v for k, v in attrs.items() if isinstance(k, str) and not k.startswith("_")}
        for name, child in public.items():
            self.walk(child, (*path, name), stack)
        # entries that pickle gave a mapping/list-like stub through SETITEM(S) / APPEND(S)
        for key in ("_stub_items", "_stub_list"):
            if key in attrs:
                self.walk(attrs[key], path, stack)
        args = attrs.get("_stub_args", ())
        if not public and "_stub_items" not in attrs and len(args) == 1 and isinstance(args[0], dict):
            self.walk(args[0], path, stack)  # mapping types reduced as Cls(dict), e.g. FrozenDict


_OTHER_VARIABLES = frozenset(
    {
        "RngKey",
        "RngCount",
        "RngState",
        "BatchStat",
        "Cache",
        "Intermediate",
        "OptState",
        "OptArray",
        "Perturbation",
    }
)
_NON_PARAM = re.compile(r"(^|\.)(label_emb\.freqs|rngs(\.[^.]+)*)$")


def _root(obj: Any, path: Path) -> tuple[Any, str]:
    """The part of the unpickled object that holds the model's variables, and the source format name."""
    if isinstance(obj, _Stub):
        attrs = obj.__dict__
        if "ema_model" in attrs:  # the original EMAOptimizer: .model is NOT the EMA weights
            return attrs["ema_model"], "ema-optimizer"
        if _short(obj) == "State" and isinstance(attrs.get("_mapping"), dict):
            return attrs["_mapping"], "flax-state"
        if "model" in attrs and ("opt_state" in attrs or "Optimizer" in _short(obj)):
            return attrs["model"], "optimizer"
        if "Optimizer" in _short(obj):
            raise CheckpointError(
                f"{path} holds a {type(obj)._stub_name} without a model (flax >= 0.11 nnx.Optimizer keeps no "
                f"reference to it); save nnx.state(model) or the model instead"
            )
        return obj, "module"
    if isinstance(obj, dict):
        return obj, "pure-dict"
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}; expected an nnx.State, a model, an "
        f"optimizer or a dict of parameters"
    )


# ---------------------------------------------------------------------------------------------------------
# Public reading API


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
        if not _NON_PARAM.search(key):
            params[key] = _as_float32(key, value)
    return params


def _read_pickle(path: Path) -> FlaxParams:
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # EOFError, UnpicklingError, TypeError, ... from truncated or foreign files
        raise CheckpointError(
            f"{path} could not be unpickled (truncated, corrupt, or not a Flax "
            f"checkpoint): {type(exc).__name__}: {exc}"
        ) from exc
    root, fmt = _root(obj, path)
    part = ""
    if isinstance(root, dict) and "ema_model" in root:  # nnx.state(EMAOptimizer) and the like
        root, part = root["ema_model"], "-ema-model"
    elif isinstance(root, dict) and "model" in root and "opt_state" in root:
        root, part = root["model"], "-model"
    walker = _Walker()
    walker.walk(root)
    items: dict[str, Any] = walker.params
    if items and fmt == "flax-state":
        fmt = "flax-state-0.10" if "VariableState" in walker.leaf_kinds else "flax-state-0.11"
    elif not items:  # no nnx.Param wrappers: a pure dict of arrays (nnx.State.to_pure_dict() and the like)
        items = {k: v for k, v in walker.arrays.items() if not _NON_PARAM.search(k) and v.dtype.kind == "f"}
        fmt = "pure-dict" if fmt == "flax-state" else fmt
    fmt += part
    if not items:
        raise CheckpointError(
            f"{path} holds no nnx.Param parameters (found a {fmt} object); expected an "
            f"nnx.State, an nnx Module, an nnx.Optimizer or the original EMAOptimizer"
        )
    return FlaxParams({k: _as_float32(k, v) for k, v in sorted(items.items())}, fmt)


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
    return _read_pickle(path)


def read_flax_params(path: str | os.PathLike, *, trust: bool = False) -> dict[str, np.ndarray]:
    """Flat ``{dotted nnx path: float32 array}`` of an original checkpoint (see :func:`read_flax_checkpoint`).

    Examples
    --------
    >>> params = read_flax_params("ctxsegp.params.npz")                       # doctest: +SKIP
    >>> params = read_flax_params("ema_optimizer.pkl", trust=True)           # doctest: +SKIP
    >>> params["x_encoder.layers.0.down.kernel"].shape                       # doctest: +SKIP
    (4, 4, 3, 128)
    """
    return read_flax_checkpoint(path, trust=trust).params


# ---------------------------------------------------------------------------------------------------------
# Config from parameter shapes

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
