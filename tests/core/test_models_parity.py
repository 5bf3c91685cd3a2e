"""Parity of the four models with the original Flax code (reduced sizes, ``shared/parity/models``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_ctxseg.core.diffusion.edm import EDMDenoiser
from napari_ctxseg.core.io.flax_params import flax_to_state_dict, state_dict_to_flax
from napari_ctxseg.core.nn.config import CtxSegDConfig, CtxSegPConfig, SegDConfig, SegPConfig
from napari_ctxseg.core.nn.models import CtxSegD, CtxSegP, SegD, SegP, build_model
from tests.parity import load_json, load_npz, nhwc_to_nchw

P_SMALL = dict(
    model_dim=8,
    patch_size=4,
    depths=(2, 1, 1, 2),
    dim_multi=(1, 2, 4, 8),
    encoder_depths=(1, 1, 2, 1),
    mha_head_dim=16,
)
D_SMALL = dict(encoder_dim=8, encoder_depths=(1, 1, 2, 1), decoder_dim=8)
CONFIGS = {
    "segp": SegPConfig(**P_SMALL),
    "ctxsegp": CtxSegPConfig(**P_SMALL, ctx_head_dim=8),
    "segd": SegDConfig(**D_SMALL),
    "ctxsegd": CtxSegDConfig(**D_SMALL, ref_encoder_dim=4, ctx_head_dim=8),
}


def _model(name: str) -> torch.nn.Module:
    model = build_model(CONFIGS[name]).eval()
    params = load_npz("models", f"{name}.params.npz")
    model.load_state_dict(flax_to_state_dict(model, params), strict=True)
    return model


def t(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.ndim == 4:
        a = nhwc_to_nchw(a)
    return torch.from_numpy(np.ascontiguousarray(a))


def close(out: torch.Tensor, ref: np.ndarray) -> None:
    out = out.detach().numpy()
    if out.ndim == 4:
        out = np.moveaxis(out, 1, -1)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_and_roundtrip(name: str) -> None:
    spec = load_json("models", f"{name}.json")
    model = _model(name)
    assert sum(p.numel() for p in model.parameters()) == spec["n_params"]
    params = load_npz("models", f"{name}.params.npz")
    back = state_dict_to_flax(model)
    assert set(back) == set(params)
    for k, v in params.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_full_size_ctxsegp_has_the_original_parameter_count() -> None:
    with torch.device("meta"):
        model = CtxSegP()
    assert sum(p.numel() for p in model.parameters()) == 179_331_842


@torch.inference_mode()
def test_segp() -> None:
    io = load_npz("models", "segp.io.npz")
    m: SegP = _model("segp")
    x_t, c, image = t(io["input.x_t"]), t(io["input.noise_labels"]), t(io["input.image"])
    close(m.label_emb(c), io["inter.emb"])
    np.testing.assert_allclose(m.label_emb.freqs.numpy(), io["inter.label_emb_freqs"], rtol=1e-6)
    feats = m.prepare(image)
    for k, f in enumerate(feats.x_skips):
        close(f, io[f"inter.x_skips.{k}"])
    for k, f in enumerate(m.y_encoder(x_t, m.label_emb(c))):
        close(f, io[f"inter.y_skips.{k}"])
    close(m(x_t, c, image=image), io["output.call"])
    close(m.predict(x_t, c, feats), io["output.predict"])
    den = EDMDenoiser(lambda x, cn: m.predict(x, cn, feats), sigma_data=1.0)
    for s in ("80", "0.5"):
        close(den(t(io[f"input.precond_x.sigma_{s}"]), float(s)), io[f"output.precond_predict.sigma_{s}"])
    den_call = EDMDenoiser(lambda x, cn: m(x, cn, image=image), sigma_data=1.0)
    close(
        den_call(t(io["input.precond_x.sigma_vec"]), t(io["input.precond_sigma_vec"])),
        io["output.precond_call.sigma_vec"],
    )


@torch.inference_mode()
def test_ctxsegp() -> None:
    io = load_npz("models", "ctxsegp.io.npz")
    m: CtxSegP = _model("ctxsegp")
    x_t, c, image = t(io["input.x_t"]), t(io["input.noise_labels"]), t(io["input.image"])
    image_ref, flow_ref = t(io["input.image_ref"]), t(io["input.flow_ref"])
    ref_mask = torch.from_numpy(io["input.ref_mask"])
    close(m.label_emb(c), io["inter.emb"])
    close(m(x_t, c, image=image), io["output.call_noref"])
    close(
        m(x_t, c, image=image, image_ref=image_ref, flow_ref=flow_ref, ref_mask=ref_mask),
        io["output.call_ref"],
    )
    close(
        m(x_t, c, image=image, image_ref=image_ref, flow_ref=flow_ref, ref_mask=torch.ones_like(ref_mask)),
        io["output.call_ref_maskones"],
    )
    # the mask-less training call is defined (the original fails) and equals an all-True mask
    close(m(x_t, c, image=image, image_ref=image_ref, flow_ref=flow_ref), io["output.call_ref_maskones"])
    ctx = m.encode_context(image_ref, flow_ref, ref_mask)
    for k, f in enumerate(ctx.x_ref):
        close(f, io[f"inter.x_ref.{k}"])
    for k, f in enumerate(ctx.y_ref):
        close(f, io[f"inter.y_ref.{k}"])
    feats = m.prepare(image, ctx)
    for k, f in enumerate(feats.x_skips):
        close(f, io[f"inter.x_skips.{k}"])
    for k, f in enumerate(feats.ref_features):
        close(f, io[f"inter.ref_features_mask.{k}"])
    close(m.predict(x_t, c, feats), io["output.predict_ref_mask"])
    close(m.predict(x_t, c, m.prepare(image)), io["output.predict_noref"])
    close(
        m.predict(x_t, c, m.prepare(image, m.encode_context(image_ref, flow_ref))),
        io["output.predict_ref_nomask"],
    )
    close(
        m.predict(x_t, c, m.prepare(image, m.encode_context(image_ref[:1], flow_ref[:1]))),
        io["output.predict_ref1_nomask"],
    )
    for name, f in (("ref_mask", feats), ("noref", m.prepare(image))):
        den = EDMDenoiser(lambda x, cn, f=f: m.predict(x, cn, f), sigma_data=1.0)
        for s in ("80", "0.5"):
            close(
                den(t(io[f"input.precond_x.sigma_{s}"]), float(s)),
                io[f"output.precond_predict_{name}.sigma_{s}"],
            )


@torch.inference_mode()
def test_ctxsegp_context_weight_zero_is_no_context_and_one_image_serves_many_samples() -> None:
    io = load_npz("models", "ctxsegp.io.npz")
    m: CtxSegP = _model("ctxsegp")
    x_t, c, image = t(io["input.x_t"]), t(io["input.noise_labels"]), t(io["input.image"])
    image_ref, flow_ref = t(io["input.image_ref"]), t(io["input.flow_ref"])
    out = m(
        x_t, c, image=image, image_ref=image_ref, flow_ref=flow_ref, context_weight=torch.tensor([0.0, 1.0])
    )
    close(out[:1], io["output.call_noref"][:1])
    close(out[1:], io["output.call_ref_maskones"][1:])
    # one image's features broadcast over two samples == the image repeated
    feats1 = m.prepare(image[:1], m.encode_context(image_ref, flow_ref))
    feats2 = m.prepare(image[:1].repeat(2, 1, 1, 1), m.encode_context(image_ref, flow_ref))
    torch.testing.assert_close(m.predict(x_t, c, feats1), m.predict(x_t, c, feats2), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_segd() -> None:
    io = load_npz("models", "segd.io.npz")
    m: SegD = _model("segd")
    image = t(io["input.image"])
    for k, f in enumerate(m.encoder(image)):
        close(f, io[f"inter.skips.{k}"])
    close(m(image), io["output.call"])
    close(m.predict(image), io["output.predict"])


@torch.inference_mode()
def test_ctxsegd() -> None:
    io = load_npz("models", "ctxsegd.io.npz")
    m: CtxSegD = _model("ctxsegd")
    image, image_ref, flow_ref = t(io["input.image"]), t(io["input.image_ref"]), t(io["input.flow_ref"])
    ref_mask = torch.from_numpy(io["input.ref_mask"])
    for k, f in enumerate(m.encoder(image)):
        close(f, io[f"inter.skips.{k}"])
    for k, f in enumerate(m.encoder(image_ref)):
        close(f, io[f"inter.x_ref.{k}"])
    for k, f in enumerate(m.ref_encoder(flow_ref)):
        close(f, io[f"inter.y_ref.{k}"])
    close(m(image), io["output.call_noref"])
    close(m(image, image_ref, flow_ref, ref_mask), io["output.call_ref_mask"])
    close(m(image, image_ref, flow_ref), io["output.call_ref_nomask"])
    close(m.predict(image), io["output.predict_noref"])
    close(m.predict(image, m.encode_context(image_ref, flow_ref, ref_mask)), io["output.predict_ref_mask"])
    close(m.predict(image, m.encode_context(image_ref, flow_ref)), io["output.predict_ref_nomask"])
    close(m.predict(image, m.encode_context(image_ref[:1], flow_ref[:1])), io["output.predict_ref1_nomask"])


def test_segd_decoder_dropout_only_in_training() -> None:
    io = load_npz("models", "segd.io.npz")
    m: SegD = _model("segd")
    image = t(io["input.image"])
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = m.train()(image), m(image)
        c = m.eval()(image)
    assert not torch.allclose(a, b)
    close(c, io["output.call"])


def test_ctxsegp_skips_the_references_of_no_context_samples() -> None:
    """Mixed batches: weight-0 samples equal the no-context call; the others equal a batch of just them."""
    io = load_npz("models", "ctxsegp.io.npz")
    m: CtxSegP = _model("ctxsegp")
    x_t, c, image = t(io["input.x_t"]), t(io["input.noise_labels"]), t(io["input.image"])
    image_ref, flow_ref = t(io["input.image_ref"]), t(io["input.flow_ref"])
    rep = [0, 1, 1, 0]  # four samples from the two of the reference file
    x4, c4, im4, ir4, fr4 = (v[rep] for v in (x_t, c, image, image_ref, flow_ref))
    mask4 = torch.zeros(ir4.shape[0], *ir4.shape[-2:], dtype=torch.bool)
    mask4[:, : mask4.shape[1] // 2] = True
    weight = torch.tensor([1.0, 0.0, 0.5, 0.0])
    with torch.inference_mode():
        out = m(x4, c4, image=im4, image_ref=ir4, flow_ref=fr4, ref_mask=mask4, context_weight=weight)
        none = m(x4, c4, image=im4)
        dense = m(
            x4[[0, 2]],
            c4[[0, 2]],
            image=im4[[0, 2]],
            image_ref=ir4[[0, 2]],
            flow_ref=fr4[[0, 2]],
            ref_mask=mask4[[0, 2]],
            context_weight=weight[[0, 2]],
        )
        zero = m(x4, c4, image=im4, image_ref=ir4, flow_ref=fr4, context_weight=torch.zeros(4))
    torch.testing.assert_close(out[[1, 3]], none[[1, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[[0, 2]], dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[[0, 2]], none[[0, 2]], atol=1e-3)  # the context does act
    torch.testing.assert_close(zero, none)
    # gradients reach the context attention through the samples that use it
    m.zero_grad()
    m(x4, c4, image=im4, image_ref=ir4, flow_ref=fr4, context_weight=weight).square().mean().backward()
    grads = [p.grad for p in m.atts.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_reference_rows_round_up_with_weight_zero_repeats_and_give_the_same_output(monkeypatch) -> None:
    """On CUDA a mixed batch encodes a multiple of CUDA_REFERENCE_BUCKET references (fewer shapes for
    cuDNN to build kernels for): the repeats carry weight 0 and leave the output unchanged."""
    from napari_ctxseg.core.nn import models

    rows, w, used = models.reference_rows(torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0]), bucket=4)
    assert used == 2 and rows.tolist() == [1, 3, 1, 3] and w.tolist() == [1.0, 0.5, 0.0, 0.0]
    rows, w, used = models.reference_rows(torch.tensor([1.0, 1.0, 0.0]), bucket=16)  # at most B rows
    assert used == 2 and rows.tolist() == [0, 1, 0] and w.tolist() == [1.0, 1.0, 0.0]
    rows, _, used = models.reference_rows(torch.zeros(5), bucket=16)
    assert used == 0 and len(rows) == 0
    assert models.reference_rows(torch.tensor([0.0, 2.0]))[0].tolist() == [1]  # bucket 1: used rows only
    assert models._reference_bucket(torch.device("cpu")) == 1
    assert models._reference_bucket(torch.device("cuda")) == models.CUDA_REFERENCE_BUCKET

    io = load_npz("models", "ctxsegp.io.npz")
    m: CtxSegP = _model("ctxsegp")
    rep = [0, 1, 1, 0, 1]
    x5, c5, im5, ir5, fr5 = (
        t(io[k])[rep]
        for k in ("input.x_t", "input.noise_labels", "input.image", "input.image_ref", "input.flow_ref")
    )
    weight = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0])
    with torch.inference_mode():
        plain = m(x5, c5, image=im5, image_ref=ir5, flow_ref=fr5, context_weight=weight)
        monkeypatch.setattr(models, "_reference_bucket", lambda device: 4)
        padded = m(x5, c5, image=im5, image_ref=ir5, flow_ref=fr5, context_weight=weight)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
