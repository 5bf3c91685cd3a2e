"""Reading original Flax checkpoints without jax/flax (``shared/parity/ckpt`` and ``models/*.params.npz``)."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctxseg.core.errors import CheckpointError, ConfigError
from napari_ctxseg.core.io.flax_config import guess_kind, infer_config
from napari_ctxseg.core.io.flax_params import _pairs, _to_flax
from napari_ctxseg.core.io.flax_read import read_flax_checkpoint, read_flax_params
from napari_ctxseg.core.io.flax_unpickle import RestrictedUnpickler, _Walker
from napari_ctxseg.core.nn.config import MODEL_KINDS, config_from_dict
from napari_ctxseg.core.nn.models import build_model
from tests.core.test_models_parity import CONFIGS
from tests.parity import load_npz, parity_path

PICKLES = {
    "ctxsegp_small.state.flax-0.11.2.pkl": "flax-state-0.11",
    "ctxsegp_small.state.flax-0.10.7.pkl": "flax-state-0.10",
    "ctxsegp_small.ema_optimizer.flax-0.10.7.pkl": "ema-optimizer",
}
KINDS = {"segp": "seg-p", "ctxsegp": "ctxseg-p", "segd": "seg-d", "ctxsegd": "ctxseg-d"}
CTX_OVERRIDES = {"segp": {}, "ctxsegp": {"ctx_head_dim": 8}, "segd": {}, "ctxsegd": {"ctx_head_dim": 8}}


def read_trusted(path: Path):
    with pytest.warns(UserWarning, match="runs code from the file"):
        return read_flax_checkpoint(path, trust=True)


def assert_same_params(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == np.float32, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)  # bit-exact


@pytest.mark.parametrize("name", list(PICKLES))
def test_pickles_give_the_fixture_params_bit_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("jax", "jaxlib", "flax", "cloudpickle", "optax", "ctxseg", "einops"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import mod` fails: nothing real may be needed
    result = read_trusted(parity_path("ckpt", name))
    assert result.source_format == PICKLES[name]
    assert len(result.params) == 323
    assert_same_params(result.params, load_npz("models", "ctxsegp.params.npz"))
    assert "label_emb.freqs" not in result.params
    assert not any("rngs" in k for k in result.params)


@pytest.mark.parametrize("name", list(KINDS))
def test_npz_files_are_read_without_pickle(name: str) -> None:
    path = parity_path("models", f"{name}.params.npz")
    result = read_flax_checkpoint(path)  # no trust needed, no warning
    assert result.source_format == "npz"
    assert_same_params(result.params, load_npz("models", f"{name}.params.npz"))
    assert read_flax_params(path).keys() == result.params.keys()


def test_ema_optimizer_gives_ema_model_not_model() -> None:
    path = parity_path("ckpt", "ctxsegp_small.ema_optimizer.flax-0.10.7.pkl")
    with open(path, "rb") as f:
        opt = RestrictedUnpickler(f).load()
    walker = _Walker()
    walker.walk(opt.model)
    ref = load_npz("models", "ctxsegp.params.npz")
    assert sorted(walker.params) == sorted(ref)
    differ = [k for k in ref if not np.array_equal(walker.params[k], ref[k])]
    assert len(differ) > 300  # one adamw step moved (almost) every weight of .model
    assert_same_params(read_trusted(path).params, ref)


def test_pickles_need_explicit_trust() -> None:
    path = parity_path("ckpt", "ctxsegp_small.state.flax-0.11.2.pkl")
    with pytest.raises(CheckpointError, match=r"arbitrary code.*trust=True"):
        read_flax_params(path)


def _evil_pickles(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}"

    class Evil:
        def __reduce__(self):
            return os.system, (cmd,)

    return {
        "os.system (protocol 0)": f"cos\nsystem\n(S'{cmd}'\ntR.".encode(),
        "posix.system (protocol 5)": pickle.dumps(Evil(), protocol=5),
        "builtins.eval": f'cbuiltins\neval\n(S\'__import__("os").system("{cmd}")\'\ntR.'.encode(),
        "builtins.exec": f'cbuiltins\nexec\n(S\'open("{marker}", "w")\'\ntR.'.encode(),
        "subprocess.call": f"csubprocess\ncall\n((lS'touch'\naS'{marker}'\natR.".encode(),
        "numpy method by dotted name": f"cnumpy\nndarray.tofile\n(S'{marker}'\ntR.".encode(),
        "numpy.load": f"cnumpy\nload\n(S'{marker}'\ntR.".encode(),
        "next to an array": pickle.dumps([np.zeros(2, np.float32), Evil()], protocol=4),
        "inside a flax object": f"cflax.nnx.statelib\nState\n(cos\nsystem\n(S'{cmd}'\ntRtR.".encode(),
        "getattr": b"cbuiltins\ngetattr\n(cos\nsystem\nS'x'\ntR.",
    }


@pytest.mark.parametrize("case", list(_evil_pickles(Path("x"))))
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_evil_pickles(marker)[case])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="refusing to load global"):
        read_flax_params(path, trust=True)
    assert not marker.exists()


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pid.pkl"
    path.write_bytes(b"Pfoo\n.")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="persistent id"):
        read_flax_params(path, trust=True)


def test_stubs_are_inert_and_record_what_they_get() -> None:
    data = b"cflax.nnx.fake\nThing\n(S'arg'\nI3\ntR(dS'attr'\nI7\nsb."
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    assert type(obj).__name__ == "Thing" and obj._stub_args == ("arg", 3) and obj.attr == 7


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    src = parity_path("ckpt", "ctxsegp_small.state.flax-0.11.2.pkl").read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(src[: len(src) // 2])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="truncated"):
        read_flax_params(cut, trust=True)
    npz = parity_path("models", "segd.params.npz").read_bytes()
    cut_npz = tmp_path / "cut.npz"
    cut_npz.write_bytes(npz[: len(npz) // 2])
    with pytest.raises(CheckpointError, match="npz"):
        read_flax_params(cut_npz)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_flax_params(empty, trust=True)
    with pytest.raises(CheckpointError, match="not found"):
        read_flax_params(tmp_path / "missing.pkl", trust=True)


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, weird=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="object arrays are refused"):
        read_flax_params(path)


def test_pure_dict_pickle(tmp_path: Path) -> None:
    ref = load_npz("models", "segp.params.npz")
    tree: dict = {}
    for key, value in ref.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    tree["label_emb"]["freqs"] = np.ones(4, np.float32)
    path = tmp_path / "pure.pkl"
    path.write_bytes(pickle.dumps(tree, protocol=4))
    result = read_trusted(path)
    assert result.source_format == "pure-dict"
    assert_same_params(result.params, ref)


@pytest.mark.parametrize("name", list(KINDS))
def test_infer_config_recovers_the_fixture_configs(name: str) -> None:
    params = load_npz("models", f"{name}.params.npz")
    assert guess_kind(params) == KINDS[name]
    config = infer_config(KINDS[name], params, CTX_OVERRIDES[name])
    assert config == CONFIGS[name]
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_infer_config_recovers_the_full_size_original_defaults(kind: str) -> None:
    with torch.device("meta"):  # shapes only: zero-stride arrays stand in for the 179 M weights
        model = build_model(MODEL_KINDS[kind]())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    params = {
        fkey: _to_flax(rule, np.broadcast_to(np.float32(0), shapes[tkey]), module)
        for tkey, fkey, rule, module in _pairs(model)
    }
    assert infer_config(kind, params) == MODEL_KINDS[kind]()


@pytest.mark.parametrize("name", ["ctxsegp", "ctxsegd"])
def test_ctx_head_dim_default_that_does_not_divide_asks_for_it(name: str) -> None:
    params = load_npz("models", f"{name}.params.npz")
    with pytest.raises(CheckpointError, match="--ctx-head-dim"):
        infer_config(KINDS[name], params)


def test_wrong_kind_is_named() -> None:
    with pytest.raises(CheckpointError, match=r"do not fit a ctxseg-p model.*look like a seg-d model"):
        infer_config("ctxseg-p", load_npz("models", "segd.params.npz"), {"ctx_head_dim": 8})
    with pytest.raises(CheckpointError, match=r"missing \['atts', 'ref_emb'\].*seg-p"):
        infer_config("ctxseg-p", load_npz("models", "segp.params.npz"))
    with pytest.raises(ConfigError, match="unknown model kind"):
        infer_config("ctxsegp", load_npz("models", "segp.params.npz"))
    with pytest.raises(ConfigError, match="unknown seg-p config fields"):
        infer_config("seg-p", load_npz("models", "segp.params.npz"), {"ctx_head_dim": 8})


def test_inconsistent_params_are_reported() -> None:
    params = load_npz("models", "segp.params.npz")
    del params["label_emb.noise_proj_1.kernel"]
    with pytest.raises(CheckpointError, match=r"label_emb\.noise_proj_1\.kernel.*missing"):
        infer_config("seg-p", params)
    params = load_npz("models", "segp.params.npz")
    params = {k.replace("y_encoder.layers.3.", "y_encoder.layers.5."): v for k, v in params.items()}
    with pytest.raises(CheckpointError, match="numbered"):
        infer_config("seg-p", params)


def _fake_flax_pickle(path: Path, monkeypatch: pytest.MonkeyPatch, root: str) -> dict:
    """Pickle nnx-like objects whose classes claim flax/ctxseg modules (registered only while dumping)."""
    modules: dict[str, types.ModuleType] = {}

    def cls(module: str, name: str) -> type:
        c = type(name, (), {"__module__": module, "__qualname__": name})
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # the module and its parent packages
            modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(modules[module], name, c)
        return c

    Param, RngKey = cls("flax.nnx.variablelib", "Param"), cls("flax.nnx.rnglib", "RngKey")
    Module, Optimizer = cls("ctxseg.modeling.fake", "Net"), cls("flax.nnx.training.optimizer", "Optimizer")

    def make(c: type, **attrs) -> object:
        obj = c()
        obj.__dict__.update(attrs)
        return obj

    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 4), np.float32)
    net = make(
        Module,
        layers=[make(Module, kernel=make(Param, raw_value=a, _var_metadata={}))],
        ref_emb=make(Param, raw_value=b),
        freqs=np.ones(2, np.float32),
        rngs=make(Module, key=make(RngKey, raw_value=np.zeros(2, np.uint32))),
        _object__state=None,
    )
    opt_state = (make(Module, mu=make(Param, raw_value=a + 1)),)
    obj = {
        "optimizer": make(Optimizer, model=net, opt_state=opt_state),
        "module": net,
        "optimizer without model": make(Optimizer, opt_state=opt_state),
    }[root]
    with monkeypatch.context() as m:
        for name, mod in modules.items():
            m.setitem(sys.modules, name, mod)
        path.write_bytes(pickle.dumps(obj, protocol=5))
    return {"layers.0.kernel": a, "ref_emb": b}


@pytest.mark.parametrize("root", ["optimizer", "module"])
def test_optimizer_and_module_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    path = tmp_path / "opt.pkl"
    expected = _fake_flax_pickle(path, monkeypatch, root)
    for mod in ("flax", "ctxseg"):
        monkeypatch.setitem(sys.modules, mod, None)
    result = read_trusted(path)
    assert result.source_format == root
    assert_same_params(result.params, expected)  # not opt_state, RNG keys or plain arrays


def test_optimizer_without_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "opt.pkl"
    _fake_flax_pickle(path, monkeypatch, "optimizer without model")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="without a model"):
        read_flax_params(path, trust=True)
