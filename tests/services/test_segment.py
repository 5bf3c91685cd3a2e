"""The segment service on real tensors (tiny random model: checks plumbing, shapes and errors)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctxseg.core.errors import CheckpointError, ConfigError, InputError
from napari_ctxseg.services.progress import run_to_end
from napari_ctxseg.services.segment import (
    FlowParams,
    SegmentRequest,
    labels_from_flows,
    segment,
    segment_steps,
)
from tests.conftest import blobs


def test_segment_returns_labels_flows_and_provenance(tiny_checkpoint) -> None:
    image, _ = blobs()
    before = image.copy()
    r = segment(image, checkpoint=str(tiny_checkpoint), device="cpu", num_samples=2, steps=2, solver="heun")
    assert r.labels.shape == image.shape and r.labels.dtype == np.uint32
    assert r.flows.shape == (2, 2, *image.shape)
    assert r.sample_labels.shape == (2, *image.shape)
    assert r.disagreement.shape == image.shape and r.disagreement.max() > 0
    assert r.metadata["seed"] == 0 and r.metadata["steps"] == 2 and len(r.metadata["checkpoint_sha256"]) == 64
    np.testing.assert_array_equal(image, before)  # the input is never modified


def test_same_seed_same_result_other_seed_differs(tiny_checkpoint) -> None:
    image, _ = blobs()
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", steps=2, solver="euler")
    a = segment(image, seed=3, **kw).flows
    b = segment(image, seed=3, **kw).flows
    c = segment(image, seed=4, **kw).flows
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_progress_counts_model_calls_and_close_cancels(tiny_checkpoint) -> None:
    image, _ = blobs()
    gen = segment_steps(
        SegmentRequest(
            image, checkpoint=str(tiny_checkpoint), device="cpu", steps=3, solver="heun", diameter=None
        )
    )
    events = [next(gen) for _ in range(2)]
    assert events[0].stage == "encode" and events[1].stage == "denoise"
    assert events[0].total == 1 + 5  # one tile + heun's 2 * 3 - 1 model calls
    gen.close()  # cancel: no result, no error


def test_tiles_cover_the_image_and_agree_with_untiled_on_smooth_input(tiny_checkpoint) -> None:
    image, _ = blobs((160, 200))
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", seed=1)
    tiled = segment(image, tile_size=96, tile_overlap=32, **kw)
    assert tiled.metadata["tiles"] > 1
    assert tiled.flows.shape == (1, 2, 160, 200) and np.isfinite(tiled.flows).all()


def test_result_arrays_do_not_share_memory(tiny_checkpoint) -> None:
    image, _ = blobs((70, 90))
    for diameter in (None, 25.0):  # at the model's scale the full-size flows are not a resize
        r = segment(image, checkpoint=str(tiny_checkpoint), device="cpu", diameter=diameter)
        assert not np.shares_memory(r.flows, r.flows_model_scale)
        assert r.flows.flags.c_contiguous


def test_diameter_rescales_and_labels_come_back_at_input_size(tiny_checkpoint) -> None:
    image, _ = blobs((100, 120))
    r = segment(image, checkpoint=str(tiny_checkpoint), device="cpu", diameter=40)
    assert r.scale == pytest.approx(0.5)
    assert r.labels.shape == (100, 120) and r.flows.shape[-2:] == (100, 120)
    assert r.flows_model_scale.shape[-2:] == (50, 60)


def test_context_path_runs_and_changes_the_prediction(tiny_checkpoint) -> None:
    image, labels = blobs(seed=1)
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", seed=0)
    plain = segment(image, **kw)
    ctx = segment(image, context_image=image, context_labels=labels, **kw)
    assert ctx.metadata["context"] is not None
    assert not np.allclose(plain.flows, ctx.flows)


def test_rethreshold_cached_flows_without_the_network() -> None:
    from napari_ctxseg.core.flows.from_masks import mask_to_flow

    _, labels = blobs()
    flow = mask_to_flow(labels)[None]
    fused, _ = labels_from_flows(flow, FlowParams(min_size=1))
    assert fused.max() == labels.max()
    fused_big, _ = labels_from_flows(flow, FlowParams(min_size=10_000))
    assert fused_big.max() == 0


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((4, 5, 6, 7)), "must be 2D"),
        (np.zeros((0, 10)), "too small|empty"),
        (np.full((32, 32), 7.0), "constant"),
        (np.where(np.eye(32) > 0, np.nan, 1.0), "NaN"),
        (np.zeros((32, 32, 5)), "must be 2D"),
    ],
)
def test_bad_images_raise_input_error(tiny_checkpoint, image, match) -> None:
    with pytest.raises(InputError, match=match):
        segment(image, checkpoint=str(tiny_checkpoint), device="cpu")


def test_bad_context_and_settings(tiny_checkpoint) -> None:
    image, labels = blobs()
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu")
    with pytest.raises(InputError, match="must cover the context image"):
        segment(image, context_image=image, context_labels=labels[:50], **kw)
    with pytest.raises(InputError, match="no annotated object"):
        segment(image, context_image=image, context_labels=np.zeros_like(labels), **kw)
    with pytest.raises(InputError, match="both an image and its labels"):
        segment(image, context_image=image, **kw)
    with pytest.raises(ConfigError, match="unknown solver"):
        segment(image, solver="rk4", **kw)
    with pytest.raises(CheckpointError, match="not found"):
        segment(image, checkpoint="/nonexistent.safetensors", device="cpu")


def test_direct_models_are_refused_for_segmentation_even_when_asked_for(tmp_path) -> None:
    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.config import SegDConfig
    from napari_ctxseg.core.nn.models import build_model
    from napari_ctxseg.services.models import load_model

    path = save_checkpoint(
        tmp_path / "segd.safetensors",
        build_model(SegDConfig(encoder_dim=8, encoder_depths=(1, 1, 1, 1), decoder_dim=8)).eval(),
        sigma_data=0.5,
    )
    with pytest.raises(CheckpointError, match="holds a seg-d model; segmentation needs a ctxseg-p or seg-p"):
        load_model(path, device="cpu", kinds=("seg-d",))
    with pytest.raises(CheckpointError, match="holds a seg-d model; expected one of"):
        segment(blobs()[0], checkpoint=str(path), device="cpu")


def test_flow_threshold_keeps_weak_background_flows_out_of_the_labels() -> None:
    from napari_ctxseg.core.flows.from_masks import mask_to_flow

    _, labels = blobs((96, 96), n=5, seed=4)
    flow = mask_to_flow(labels)
    bg = labels == 0
    flow[:, bg] = 0.15 * np.stack([np.ones(bg.sum()), np.zeros(bg.sum())])  # a weak drift in the background
    plain, _ = labels_from_flows(flow[None], FlowParams(min_size=1, flow_threshold=0.0))
    thresholded, _ = labels_from_flows(flow[None], FlowParams(min_size=1, flow_threshold=0.5))
    from scipy.ndimage import binary_fill_holes

    open_bg = ~binary_fill_holes(labels > 0)  # background not enclosed by touching objects
    assert (thresholded[open_bg] == 0).all()
    assert thresholded.max() == labels.max()
    assert (plain[bg] > 0).any()  # without the threshold background pixels are swept into objects


def test_several_references_of_different_sizes(tiny_checkpoint) -> None:
    image, labels = blobs(seed=1)
    image2, labels2 = blobs((80, 112), seed=2)
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", seed=0)
    one = segment(image, context_image=image, context_labels=labels, **kw)
    two = segment(image, context_image=[image, image2], context_labels=[labels, labels2], **kw)
    same_twice = segment(image, context_image=[image, image], context_labels=[labels, labels], **kw)
    assert not np.allclose(one.flows, two.flows)
    np.testing.assert_allclose(one.flows, same_twice.flows, rtol=1e-4, atol=1e-4)  # an average of equals
    with pytest.raises(InputError, match="differ in length"):
        segment(image, context_image=[image, image2], context_labels=[labels], **kw)


def test_auto_diameter_measures_the_context_labels_without_a_probe_pass(tiny_checkpoint) -> None:
    from napari_ctxseg.core.flows.postprocess import median_diameter
    from napari_ctxseg.services.auto_diameter import (
        AUTO_MIN_RESCALE,
        AUTO_SCALE_RANGE,
        AUTO_TARGET_DIAMETER,
        auto_scale,
    )

    image, labels = blobs((96, 96), seed=1)
    events = []
    r = run_to_end(
        segment_steps(
            SegmentRequest(
                image,
                checkpoint=str(tiny_checkpoint),
                device="cpu",
                context_image=image,
                context_labels=labels,
            )
        ),
        events.append,
    )
    stages = [e.stage for e in events]
    assert "size" not in stages  # the annotated objects tell the size: nothing extra runs
    measured = median_diameter(labels)
    assert r.metadata["diameter"] == "auto" and r.metadata["measured_diameter"] == pytest.approx(measured)
    assert r.scale == pytest.approx(auto_scale(measured))
    lo, hi = AUTO_SCALE_RANGE
    assert auto_scale(AUTO_TARGET_DIAMETER / 1.9) == pytest.approx(min(1.9, hi))
    assert auto_scale(0.0) == 1.0 and auto_scale(1.0) == hi and auto_scale(1e4) == lo
    assert auto_scale(AUTO_TARGET_DIAMETER / (AUTO_MIN_RESCALE * 0.9)) == 1.0  # near the model's scale
    assert auto_scale(AUTO_TARGET_DIAMETER * AUTO_MIN_RESCALE * 0.9) == 1.0  # large, but near enough
    big = 3.0 * AUTO_TARGET_DIAMETER
    assert auto_scale(big) == pytest.approx(1 / 3)  # brought down to the target


def test_auto_diameter_probe_pass_then_rescaled_run(tiny_checkpoint, monkeypatch) -> None:
    import napari_ctxseg.services.auto_diameter as seg

    image, _ = blobs((96, 96), seed=2)
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", seed=0)
    # whatever the (random) model finds, a measured size of 10 px asks for a 2x rescale
    monkeypatch.setattr(seg, "median_diameter", lambda labels: 10.0)
    events = []
    r = run_to_end(segment_steps(SegmentRequest(image, **kw)), events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "size" and "denoise" in stages[stages.count("size") :]
    assert r.scale == pytest.approx(seg.auto_scale(10.0)) == pytest.approx(2.0)
    assert r.metadata["measured_diameter"] == 10.0
    assert r.labels.shape == image.shape and r.flows_model_scale.shape[-2:] == (192, 192)
    # measured at the model's size: the probe already is the one-step result, nothing runs twice
    monkeypatch.setattr(seg, "median_diameter", lambda labels: seg.AUTO_TARGET_DIAMETER)
    auto = segment(image, **kw)
    plain = segment(image, diameter=None, **kw)
    assert auto.scale == 1.0 and auto.metadata["diameter"] == "auto"
    np.testing.assert_array_equal(auto.labels, plain.labels)
    with pytest.raises(ConfigError, match="'auto'"):
        segment(image, diameter="big", **kw)


def test_auto_diameter_finds_objects_too_large_for_the_model_scale(tiny_checkpoint, monkeypatch) -> None:
    """Large objects fall apart into model-sized fragments at the model's scale: the half-scale pass sees
    them whole, its size wins, the downscale is re-measured at the scale it asks for, and the run uses it."""
    import napari_ctxseg.services.auto_diameter as seg

    image, _ = blobs((96, 96), seed=2)
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", seed=0)
    calls = []

    def sizes(values):
        it = iter(values)

        def measure(labels):
            calls.append(labels.shape)
            return next(it)

        return measure

    # model scale: 20 px fragments; half scale: 120 px objects; at the scale for 120 px: 100 px (agrees)
    monkeypatch.setattr(seg, "median_diameter", sizes([20.0, 120.0, 100.0]))
    events = []
    r = run_to_end(segment_steps(SegmentRequest(image, **kw)), events.append)
    assert len(calls) == 3  # three measuring passes, then the run itself
    assert r.metadata["measured_diameter"] == 100.0
    assert r.scale == pytest.approx(seg.AUTO_TARGET_DIAMETER / 100.0)
    assert r.labels.shape == image.shape and "denoise" in [e.stage for e in events if e.stage != "size"]
    # a refined size that disagrees is measured once more (at most AUTO_REFINE_PASSES times)
    calls.clear()
    monkeypatch.setattr(seg, "median_diameter", sizes([20.0, 60.0, 90.0, 95.0]))
    r = segment(image, **kw)
    assert len(calls) == 4 and r.metadata["measured_diameter"] == 95.0
    # small objects that merge at half scale: the half-scale size is not trusted below AUTO_COARSE_MIN
    calls.clear()
    monkeypatch.setattr(seg, "median_diameter", sizes([10.0, seg.AUTO_COARSE_MIN - 1]))
    r = segment(image, **kw)
    assert len(calls) == 2 and r.metadata["measured_diameter"] == 10.0 and r.scale == pytest.approx(2.0)
    # ... and where they merge into larger blobs, the re-measure does not confirm the downscale
    calls.clear()
    monkeypatch.setattr(seg, "median_diameter", sizes([10.0, 35.0, 21.0]))
    r = segment(image, **kw)
    assert len(calls) == 3 and r.metadata["measured_diameter"] == 10.0 and r.scale == pytest.approx(2.0)


def test_median_diameter() -> None:
    from napari_ctxseg.core.flows.postprocess import median_diameter

    lab = np.zeros((40, 40), np.int32)
    lab[2:12, 2:12] = 3  # area 100
    lab[20:24, 20:24] = 9  # area 16
    lab[30:35, 30:35] = 5  # area 25 (the median)
    assert median_diameter(lab) == pytest.approx(2 * np.sqrt(25 / np.pi))
    assert median_diameter(np.zeros((5, 5), np.int32)) == 0.0


def test_tta_averages_the_denoiser_over_the_flips_so_it_commutes_with_them(tiny_checkpoint) -> None:
    import torch

    from napari_ctxseg.core.diffusion.denoisers import TTA_FLIPS
    from napari_ctxseg.core.diffusion.denoisers import ViewDenoiser as _ViewDenoiser
    from napari_ctxseg.core.flows.from_masks import flip_flow, flip_spatial
    from napari_ctxseg.services.models import load_model

    loaded = load_model(str(tiny_checkpoint), device="cpu")
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, 32, 64), generator=g)
    x = torch.randn((2, 2, 32, 64), generator=g) * 5.0

    def commutes(views: tuple[tuple[bool, bool], ...], flip: tuple[bool, bool]) -> bool:
        with torch.inference_mode():
            den = _ViewDenoiser(loaded.model, loaded.sigma_data, image, [], views)
            den_flipped = _ViewDenoiser(
                loaded.model, loaded.sigma_data, flip_spatial(image, *flip), [], views
            )
            return torch.allclose(
                den_flipped(flip_flow(x, *flip), 5.0), flip_flow(den(x, 5.0), *flip), atol=1e-5
            )

    for flip in TTA_FLIPS[1:]:
        assert commutes(TTA_FLIPS, flip)  # the averaged denoiser is exactly flip-equivariant
        assert not commutes(TTA_FLIPS[:1], flip)  # the network alone is not


def test_tta_in_segment_one_step_multi_step_and_auto_size(tiny_checkpoint) -> None:
    image, _ = blobs(seed=2)
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", seed=0)
    for extra in (dict(diameter=None), dict(diameter=None, steps=2, solver="euler", num_samples=2), {}):
        plain, tta = segment(image, **kw, **extra), segment(image, tta=True, **kw, **extra)
        assert tta.metadata["tta"] is True and plain.metadata["tta"] is False
        assert tta.flows.shape == plain.flows.shape and np.isfinite(tta.flows).all()
        assert not np.allclose(plain.flows, tta.flows)  # the auto size's probe pass is not reused as-is
    events = _events(SegmentRequest(image, tta=True, diameter=None, steps=2, solver="euler", **kw))
    # progress still counts tiles and sampler calls (the views are within each)
    assert {e.total for e in events} == {1 + 2} and events[-2].done == 3
    with pytest.raises(ConfigError, match="tta must be True or False"):
        segment(image, tta="yes", **kw)


def _events(req: SegmentRequest) -> list:
    gen, events = segment_steps(req), []
    while True:
        try:
            events.append(next(gen))
        except StopIteration:
            return events


def test_min_contrast_drops_objects_found_in_pure_noise_and_keeps_nuclei() -> None:
    """The bundled model finds 'objects' in an empty, noisy field (per-image normalisation stretches the
    noise); ``min_contrast`` 3 drops them and keeps every nucleus of the sample image."""
    from napari_ctxseg._sample_data import read_sample
    from napari_ctxseg.services.segment import FlowParams, labels_from_flows, segment

    noise = np.random.default_rng(0).poisson(3, (256, 256)).astype(np.float32)
    assert segment(noise).labels.max() > 10
    assert segment(noise, flow=FlowParams(min_contrast=3.0)).labels.max() == 0
    nuclei = read_sample("nuclei")[:256, :256]
    plain = segment(nuclei)
    filtered = segment(nuclei, flow=FlowParams(min_contrast=3.0))
    assert plain.labels.max() > 20
    np.testing.assert_array_equal(filtered.labels, plain.labels)
    with pytest.raises(ConfigError, match="min_contrast needs the image"):
        labels_from_flows(plain.flows_model_scale, FlowParams(min_contrast=3.0))


def test_channel_choice_segments_that_channel_and_is_recorded(tiny_checkpoint) -> None:
    image, _ = blobs()
    noise = np.random.default_rng(1).random(image.shape)
    stack = np.stack([noise, image])  # (C, H, W): the cells are in channel 1
    kw = dict(checkpoint=str(tiny_checkpoint), device="cpu", diameter=None)
    chosen = segment(stack, channel=1, channel_axis=0, **kw)
    plain = segment(image, **kw)
    np.testing.assert_array_equal(chosen.labels, plain.labels)
    assert chosen.metadata["channels"]["channel"] == 1 and plain.metadata["channels"] is None
    both = segment(stack, channel=1, nuclear_channel=0, channel_axis=0, **kw)
    assert both.metadata["channels"]["model_input"] == "(channel, nuclear, 0)"
    with pytest.raises(InputError, match="does not exist"):
        segment(stack, channel=2, channel_axis=0, **kw)
    with pytest.raises(ConfigError, match="nuclear channel needs"):
        segment(image, nuclear_channel=0, **kw)
