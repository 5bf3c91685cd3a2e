"""Checkpoints: safetensors + JSON config round trip, and a specific error for every bad file."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from napari_ctxseg.core.errors import CheckpointError, ConfigError
from napari_ctxseg.core.io.checkpoint import (
    read_info,
    sampling_advice,
    save_checkpoint,
    set_sampling,
)
from napari_ctxseg.core.nn.config import CtxSegPConfig, SegDConfig, config_from_dict
from napari_ctxseg.core.nn.load import load_checkpoint
from napari_ctxseg.core.nn.models import build_model

TINY = CtxSegPConfig(
    model_dim=8, depths=(1, 1, 1, 1), encoder_depths=(1, 1, 1, 1), mha_head_dim=8, ctx_head_dim=8
)


def _save(tmp_path, **kw):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    path = save_checkpoint(
        tmp_path / "m.safetensors", model, sigma_data=0.7, provenance={"who": "test"}, **kw
    )
    return model, path


def test_round_trip_restores_weights_config_and_metadata(tmp_path) -> None:
    model, path = _save(tmp_path)
    loaded, info = load_checkpoint(path)
    assert info.config == TINY and info.sigma_data == 0.7 and info.provenance == {"who": "test"}
    assert len(info.sha256) == 64 and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


def test_half_storage_is_smaller_and_loads_as_float32(tmp_path) -> None:
    _, full = _save(tmp_path)
    size_full = full.stat().st_size
    _, half = _save(tmp_path, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * size_full
    loaded, _ = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_config_validation_and_round_trip() -> None:
    assert config_from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ConfigError, match="unknown model kind"):
        config_from_dict({"kind": "unet"})
    with pytest.raises(ConfigError, match="unknown ctxseg-p config fields"):
        config_from_dict({**TINY.to_dict(), "colour": 3})
    with pytest.raises(ConfigError, match="dim_multi must have"):
        CtxSegPConfig(dim_multi=(1, 2))
    with pytest.raises(ConfigError, match="not a multiple of mha_head_dim"):
        CtxSegPConfig(model_dim=8, mha_head_dim=48)


def test_missing_empty_truncated_corrupt_and_foreign_files(tmp_path) -> None:
    _, path = _save(tmp_path)
    data = path.read_bytes()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x12\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a napari-ctxseg checkpoint"):
        read_info(tmp_path / "foreign.safetensors")


def test_pickles_are_refused_with_a_hint_to_convert(tmp_path) -> None:
    p = tmp_path / "model.pkl"
    p.write_bytes(pickle.dumps({"x": np.zeros(2)}))
    with pytest.raises(CheckpointError, match="ctxseg convert"):
        load_checkpoint(p)
    torch.save({"x": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "model.pt")


def test_wrong_kind_mismatched_tensors_and_non_finite_weights(tmp_path) -> None:
    _, path = _save(tmp_path)
    with pytest.raises(CheckpointError, match="holds a ctxseg-p model; expected one of \\['seg-d'\\]"):
        load_checkpoint(path, expected_kinds=("seg-d",))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    meta = {
        "format": "napari-ctxseg",
        "format_version": "1",
        "sigma_data": "1.0",
        "config": json.dumps(SegDConfig(encoder_dim=8, encoder_depths=(1, 1, 1, 1), decoder_dim=8).to_dict()),
    }
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="does not match its seg-d config"):
        load_checkpoint(tmp_path / "other.safetensors")
    tensors["ref_emb"] = torch.full_like(tensors["ref_emb"], float("nan"))
    meta["config"] = json.dumps(TINY.to_dict())
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path / "nan.safetensors")
    meta["format_version"] = "99"
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "future.safetensors")


def test_a_header_length_ending_in_0x80_is_not_mistaken_for_a_pickle(tmp_path) -> None:
    """The first byte of a safetensors file is the low byte of its header length: it can be 0x80."""
    from napari_ctxseg.core.io.checkpoint import _looks_like_safetensors

    head = (128 + 256 * 3).to_bytes(8, "little") + b"{"
    assert head[:1] == b"\x80" and _looks_like_safetensors(head, 10_000)
    # and a real checkpoint whose header length is 0x..80 loads: pad the provenance until it is
    model = build_model(TINY)
    for pad in range(256):
        path = save_checkpoint(tmp_path / "m.safetensors", model, sigma_data=1.0, provenance={"p": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            load_checkpoint(path)
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")


SAMPLING = {"solvers": ["euler", "edf"], "max_steps": 2, "evidence": "measured on a test set"}


def test_sampling_declaration_round_trips_and_malformed_ones_are_refused(tmp_path) -> None:
    _, plain = _save(tmp_path)
    assert read_info(plain).sampling is None
    model, path = _save(tmp_path, sampling=SAMPLING)
    assert read_info(path).sampling == SAMPLING
    assert load_checkpoint(path)[1].sampling == SAMPLING  # kept when the weights are loaded too
    for bad in (
        {"solvers": [], "max_steps": 2},
        {"solvers": ["edf"], "max_steps": 0},
        {"solvers": "edf", "max_steps": 2},
        {"solvers": ["edf"], "max_steps": True},
        ["edf"],
        {"solvers": ["eular"], "max_steps": 2},
    ):
        with pytest.raises(CheckpointError, match="sampling"):
            save_checkpoint(tmp_path / "bad.safetensors", model, sigma_data=1.0, sampling=bad)
    # a file whose declaration is not JSON, or not a valid one, is refused on reading
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for text, message in (("{not json", "invalid metadata"), ('{"solvers": ["edf"]}', "max_steps")):
        save_file(tensors, tmp_path / "broken.safetensors", metadata={**meta, "sampling": text})
        with pytest.raises(CheckpointError, match=message):
            read_info(tmp_path / "broken.safetensors")
    # but a solver this version does not know (a later version's) does not stop a file from loading
    later = {"solvers": ["edf", "dpm2"], "max_steps": 4}
    save_file(tensors, tmp_path / "later.safetensors", metadata={**meta, "sampling": json.dumps(later)})
    assert read_info(tmp_path / "later.safetensors").sampling == later


def test_set_sampling_keeps_the_tensors_and_can_remove_the_declaration(tmp_path) -> None:
    from safetensors.torch import load_file

    _, path = _save(tmp_path, dtype=torch.float16)
    before, info = load_file(path), read_info(path)
    set_sampling(path, SAMPLING)
    after = read_info(path)
    assert after.sampling == SAMPLING
    keep = ("config", "sigma_data", "provenance", "package_version")
    assert [getattr(after, k) for k in keep] == [getattr(info, k) for k in keep]
    for k, v in load_file(path).items():
        assert v.dtype == before[k].dtype == torch.float16 and torch.equal(v, before[k])
    set_sampling(path, None)
    assert read_info(path).sampling is None
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(CheckpointError, match="max_steps"):
        set_sampling(path, {"solvers": ["edf"], "max_steps": -1})
    assert read_info(path).sampling is None  # a refused declaration leaves the file as it was


def test_sampling_advice_flags_only_settings_outside_the_declaration(tmp_path) -> None:
    _, path = _save(tmp_path, sampling=SAMPLING)
    info = read_info(path)
    assert sampling_advice(info, 1, "heun") is None  # one step is the same prediction for every solver
    assert sampling_advice(info, 2, "edf") is None and sampling_advice(info, 2, "euler") is None
    for steps, solver in ((3, "edf"), (2, "heun"), (8, "euler")):
        advice = sampling_advice(info, steps, solver)
        assert advice is not None and f"{steps} steps with {solver}" in advice
        assert "1-2 sampler steps with euler or edf" in advice and "measured on a test set" in advice
    _, plain = _save(tmp_path)
    assert sampling_advice(read_info(plain), 50, "heun") is None  # nothing declared, nothing to say
