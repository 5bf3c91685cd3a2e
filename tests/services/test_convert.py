"""``convert_flax_checkpoint``: original Flax checkpoints -> verified napari-ctxseg safetensors files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctxseg import __version__
from napari_ctxseg.core.errors import CheckpointError, ConfigError, InputError
from napari_ctxseg.core.io.checkpoint import file_sha256
from napari_ctxseg.core.nn.load import load_checkpoint
from napari_ctxseg.core.nn.models import CtxSegP
from napari_ctxseg.services.convert import convert_flax_checkpoint
from tests.core.test_models_parity import CONFIGS, _model, close, t
from tests.parity import load_npz, parity_path

PICKLES = {
    "ctxsegp_small.state.flax-0.11.2.pkl": "flax-state-0.11",
    "ctxsegp_small.state.flax-0.10.7.pkl": "flax-state-0.10",
    "ctxsegp_small.ema_optimizer.flax-0.10.7.pkl": "ema-optimizer",
}
KINDS = {"segp": "seg-p", "ctxsegp": "ctxseg-p", "segd": "seg-d", "ctxsegd": "ctxseg-d"}
SMALL_CTX = {"ctx_head_dim": 8}


def convert_pickle(src: Path, dst: Path, **kwargs):
    with pytest.warns(UserWarning, match="runs code from the file"):
        return convert_flax_checkpoint(src, dst, trust=True, **kwargs)


@pytest.mark.parametrize("name", list(PICKLES))
@torch.inference_mode()
def test_pickle_converts_and_predicts_like_the_original(name: str, tmp_path: Path) -> None:
    src = parity_path("ckpt", name)
    dst = tmp_path / "out" / "ctxsegp.safetensors"
    info = convert_pickle(src, dst, kind="ctxseg-p", overrides=SMALL_CTX)
    assert info.path == dst and info.kind == "ctxseg-p" and info.config == CONFIGS["ctxsegp"]
    assert info.sha256 == file_sha256(dst)
    assert info.provenance == {
        "converted_from": name,
        "source_sha256": file_sha256(src),
        "source_format": PICKLES[name],
        "converter": f"napari-ctxseg {__version__}",
        "overrides": SMALL_CTX,
        "stored_dtype": "float32",
    }
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]  # no temporary files left

    m, loaded = load_checkpoint(dst, expected_kinds=("ctxseg-p",))
    assert isinstance(m, CtxSegP) and loaded.sigma_data == 1.0
    io = load_npz("models", "ctxsegp.io.npz")
    x_t, c, image = t(io["input.x_t"]), t(io["input.noise_labels"]), t(io["input.image"])
    image_ref, flow_ref = t(io["input.image_ref"]), t(io["input.flow_ref"])
    ref_mask = torch.from_numpy(io["input.ref_mask"])
    close(m.predict(x_t, c, m.prepare(image)), io["output.predict_noref"])
    close(
        m.predict(x_t, c, m.prepare(image, m.encode_context(image_ref, flow_ref, ref_mask))),
        io["output.predict_ref_mask"],
    )


@pytest.mark.parametrize("name", list(KINDS))
def test_npz_converts_to_the_same_weights(name: str, tmp_path: Path) -> None:
    dst = tmp_path / f"{name}.safetensors"
    overrides = SMALL_CTX if name.startswith("ctx") else None
    info = convert_flax_checkpoint(
        parity_path("models", f"{name}.params.npz"),
        dst,
        kind=KINDS[name],
        overrides=overrides,
        sigma_data=0.5,
    )
    assert info.config == CONFIGS[name] and info.sigma_data == 0.5
    assert info.provenance["source_format"] == "npz"
    m, _ = load_checkpoint(dst)
    expected = _model(name).state_dict()
    got = m.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_half_precision(tmp_path: Path) -> None:
    src = parity_path("models", "segd.params.npz")
    full = convert_flax_checkpoint(src, tmp_path / "full.safetensors", kind="seg-d")
    half = convert_flax_checkpoint(src, tmp_path / "half.safetensors", kind="seg-d", half=True)
    assert half.provenance["stored_dtype"] == "float16"
    size = {n: (tmp_path / f"{n}.safetensors").stat().st_size for n in ("full", "half")}
    assert size["half"] < 0.6 * size["full"]
    m, _ = load_checkpoint(tmp_path / "half.safetensors")
    for k, v in _model("segd").state_dict().items():
        assert m.state_dict()[k].dtype == torch.float32
        assert torch.equal(m.state_dict()[k], v.half().float()), k
    assert full.provenance["stored_dtype"] == "float32"


def test_half_refuses_weights_outside_float16(tmp_path: Path) -> None:
    params = load_npz("models", "segd.params.npz")
    params["encoder.layers.0.down.bias"] = params["encoder.layers.0.down.bias"] * 0 + 1e6
    src = tmp_path / "big.npz"
    np.savez(src, **params)
    with pytest.raises(CheckpointError, match="float16 range"):
        convert_flax_checkpoint(src, tmp_path / "big.safetensors", kind="seg-d", half=True)
    assert not (tmp_path / "big.safetensors").exists()


def test_untrusted_pickle_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="trust"):
        convert_flax_checkpoint(
            parity_path("ckpt", "ctxsegp_small.state.flax-0.11.2.pkl"),
            dst,
            kind="ctxseg-p",
            overrides=SMALL_CTX,
        )
    assert not dst.exists()


def test_wrong_kind_names_the_problem_and_keeps_an_existing_file(tmp_path: Path) -> None:
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(CheckpointError, match=r"ctxseg-p.*look like a seg-d model"):
        convert_flax_checkpoint(
            parity_path("models", "segd.params.npz"), dst, kind="ctxseg-p", overrides=SMALL_CTX
        )
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_ctx_head_dim_is_asked_for(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="--ctx-head-dim"):
        convert_pickle(
            parity_path("ckpt", "ctxsegp_small.state.flax-0.10.7.pkl"),
            tmp_path / "m.safetensors",
            kind="ctxseg-p",
        )


def test_truncated_pickle(tmp_path: Path) -> None:
    data = parity_path("ckpt", "ctxsegp_small.ema_optimizer.flax-0.10.7.pkl").read_bytes()
    src = tmp_path / "cut.pkl"
    src.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_pickle(src, tmp_path / "m.safetensors", kind="ctxseg-p", overrides=SMALL_CTX)
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "p.npz"
    src.write_bytes(parity_path("models", "segp.params.npz").read_bytes())
    with pytest.raises(InputError, match="is the source"):
        convert_flax_checkpoint(src, src, kind="seg-p")
    with pytest.raises(ConfigError, match="sigma_data"):
        convert_flax_checkpoint(src, tmp_path / "m.safetensors", kind="seg-p", sigma_data=0.0)
    with pytest.raises(ConfigError, match="unknown model kind"):
        convert_flax_checkpoint(src, tmp_path / "m.safetensors", kind="segp")
    with pytest.raises(CheckpointError, match="not found"):
        convert_flax_checkpoint(tmp_path / "nope.npz", tmp_path / "m.safetensors", kind="seg-p")
