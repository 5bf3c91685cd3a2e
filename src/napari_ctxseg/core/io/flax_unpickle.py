"""A restricted unpickler for original ctxseg (JAX/Flax nnx) pickles, and the walk of what it unpickles.

:class:`RestrictedUnpickler`: numpy array/dtype reconstructors are the only real callables it hands to
``pickle``; jax arrays are rebuilt as numpy arrays; every jax, flax, optax, ctxseg, cloudpickle and
contextlib class or function becomes an inert stub that only records what it is given, and any other global
(``builtins.eval``, ``os.system``, ``subprocess.*``, ...) is refused. Even so, unpickling is only done for
files the caller explicitly trusts (:func:`~napari_ctxseg.core.io.flax_read.read_flax_checkpoint` with
``trust=True``).

:func:`unpickle_params` then walks the unpickled tree for its ``nnx.Param`` leaves: RNG keys and counts,
optimizer state and other variables are left out; of the original ``EMAOptimizer`` its ``.ema_model`` is
used, never ``.model``.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

__all__ = ["NON_PARAM", "STUB_PREFIXES", "RestrictedUnpickler", "unpickle_params"]

#: Dotted paths of arrays that are not parameters (the label embedding's fixed frequencies, RNG state).
NON_PARAM = re.compile(r"(^|\.)(label_emb\.freqs|rngs(\.[^.]+)*)$")

#: Module prefixes whose globals become inert stubs (never imported, never run).
STUB_PREFIXES = ("jax", "jaxlib", "flax", "ctxseg", "cloudpickle", "optax", "contextlib", "einops", "chex")

# numpy.(_)core.multiarray._reconstruct
_NP_RECONSTRUCT: Any = np.ndarray.__reduce__(np.zeros(1, np.float32))[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
_NP_FROMBUFFER = np.zeros(1, np.float32).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer (protocol 5)
_MAX_DEPTH = 200
_MAX_NODES = 5_000_000


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


def unpickle_params(path: Path) -> tuple[dict[str, Any], str]:
    """Unpickle a trusted Flax checkpoint with :class:`RestrictedUnpickler` and collect its parameters.

    Parameters
    ----------
    path : Path
        A pickled ``nnx.State`` (flax 0.10/0.11), or a cloudpickled ``EMAOptimizer`` / ``nnx.Optimizer`` /
        nnx Module. Unpickling runs code from the file: only call this for files the caller trusts.

    Returns
    -------
    params : dict of str to object
        ``{dotted nnx path: leaf}`` of the ``nnx.Param`` leaves (or, without any, of the floating-point
        arrays of a pure dict), in the original layout and dtype.
    source_format : str
        As :class:`~napari_ctxseg.core.io.flax_read.FlaxParams` names it.

    Raises
    ------
    CheckpointError
        Corrupt or truncated file, a refused global, or no parameters found.
    """
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
        items = {k: v for k, v in walker.arrays.items() if not NON_PARAM.search(k) and v.dtype.kind == "f"}
        fmt = "pure-dict" if fmt == "flax-state" else fmt
    fmt += part
    if not items:
        raise CheckpointError(
            f"{path} holds no nnx.Param parameters (found a {fmt} object); expected an "
            f"nnx.State, an nnx Module, an nnx.Optimizer or the original EMAOptimizer"
        )
    return items, fmt
