"""The widgets' pure logic (no Qt, no viewer): snapshots, planes, context, requests, results as layer data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from napari.layers import Image, Labels, Shapes

from napari_ctxseg._widgets import _results
from napari_ctxseg._widgets._layer_io import (
    RunSettings,
    context_from_layers,
    crop_to_view,
    current_plane,
    embed_labels,
    layer_plane,
    make_context,
    shapes_mask,
    snapshot_layer,
)
from napari_ctxseg.core.errors import CtxSegError, InputError
from napari_ctxseg.core.flows.from_masks import mask_to_flow
from napari_ctxseg.services.segment import FlowParams, SegmentResult


def squares() -> np.ndarray:
    """Three objects of 100, 225 and 36 pixels."""
    m = np.zeros((40, 40), np.uint32)
    m[5:15, 5:15], m[20:35, 20:35], m[28:34, 2:8] = 1, 2, 3
    return m


def fake_result(labels: np.ndarray, n_samples: int = 1) -> SegmentResult:
    """A SegmentResult whose flows are the exact flows of ``labels`` (as a perfect network would give)."""
    flows = np.repeat(mask_to_flow(labels.astype(np.int32))[None], n_samples, axis=0).astype(np.float32)
    meta = {"checkpoint": "fake", "device": "cpu", "seed": 0, "flow_params": {}}
    samples = np.repeat(labels[None], n_samples, 0)
    return SegmentResult(labels, flows, samples, np.zeros(labels.shape, np.float32), 1.0, meta, flows)


def planes_result(n_planes: int = 2, **snap: Any) -> _results.PlanesResult:
    data = np.random.default_rng(0).random((n_planes, 40, 40)).astype(np.float32)
    snapshot = snapshot_layer(Image(data, name="stack", **snap))
    return _results.PlanesResult(snapshot, [fake_result(squares()) for _ in range(n_planes)], FlowParams())


def test_snapshot_is_a_copy_with_placement() -> None:
    layer = Image(
        np.ones((2, 16, 20, 3), np.uint8), name="rgb", rgb=True, scale=(3, 2, 2), translate=(0, 5, 6)
    )
    snap = snapshot_layer(layer)
    layer.data[...] = 0
    assert snap.data.max() == 1 and snap.rgb and snap.name == "rgb"
    assert snap.leading_shape == (2,) and snap.plane_shape == (16, 20) and snap.planes() == [(0,), (1,)]
    assert snap.scale == (3.0, 2.0, 2.0) and snap.translate == (0.0, 5.0, 6.0)
    grey = snapshot_layer(Image(np.zeros((16, 20))))
    assert grey.leading_shape == () and grey.planes() == [()]


def test_crop_to_view_places_the_crop() -> None:
    data = np.arange(3 * 50 * 60).reshape(3, 50, 60)
    snap = snapshot_layer(Image(data, scale=(1, 0.5, 2), translate=(0, 1, 2)))
    crop, box = crop_to_view(snap, np.array([[0, 10, 20], [2, 29, 49]]))
    assert box == (10, 20, 30, 50) and crop.data.shape == (3, 20, 30)
    np.testing.assert_array_equal(crop.data, snap.data[:, 10:30, 20:50])
    assert crop.translate == (0.0, 1 + 10 * 0.5, 2 + 20 * 2.0)
    _, box = crop_to_view(snap, np.array([[0, -5, -5], [0, 500, 500]]))
    assert box == (0, 0, 50, 60)
    with pytest.raises(InputError, match="only 4 x 30 pixels"):
        crop_to_view(snap, np.array([[0, 10, 20], [0, 13, 49]]))


def test_planes_at_the_viewer_position() -> None:
    stack = np.arange(4 * 8 * 8).reshape(4, 8, 8)
    np.testing.assert_array_equal(current_plane(stack, False, (2,)), stack[2])
    np.testing.assert_array_equal(current_plane(stack, False, (9,)), stack[3])  # clipped
    np.testing.assert_array_equal(current_plane(stack[0], False, (2,)), stack[0])  # 2D: the image itself
    layer = Image(stack, scale=(2, 1, 1))
    np.testing.assert_array_equal(layer_plane(layer, (4.2, 0, 0)), stack[2])  # world z 4.2 -> plane 2


def test_embed_labels_and_errors() -> None:
    full, region = embed_labels(np.full((2, 3), 7), (1, 2), (5, 6))
    assert full.sum() == 7 * 6 and region.sum() == 6 and full[1, 2] == 7 and region[2, 4]
    with pytest.raises(InputError, match="do not fit"):
        embed_labels(np.ones((2, 3), int), (4, 0), (5, 6))


def test_make_context_says_what_is_wrong() -> None:
    img, lab = np.zeros((20, 30)), np.zeros((20, 30), np.uint16)
    lab[2:5, 2:5] = 1
    ctx = make_context(img, lab)
    assert ctx.region is None and ctx.labels is not lab
    with pytest.raises(InputError, match=r"'L' has shape \(10, 30\) but 'I' has \(20, 30\)"):
        make_context(img, lab[:10], names=("I", "L"))
    with pytest.raises(InputError, match="integer"):
        make_context(img, lab.astype(float))
    with pytest.raises(InputError, match="region is empty"):
        make_context(img, lab, np.zeros((20, 30), bool))
    with pytest.raises(InputError, match="no annotated object inside the region"):
        make_context(img, lab, np.pad(np.ones((5, 5), bool), ((15, 0), (25, 0))))
    with pytest.raises(InputError, match="one 2D plane"):
        make_context(np.zeros((2, 20, 30)), lab)


def test_shapes_region_goes_through_world_coordinates() -> None:
    image = Image(np.zeros((40, 40)), scale=(0.5, 0.5), translate=(10, 10))
    rect = Shapes([np.array([[12, 12], [12, 15], [15, 15], [15, 12]])], shape_type="rectangle")  # world units
    mask = shapes_mask(rect, image, (40, 40))
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 10, 4, 10)  # world 12..15 -> pixels 4..10
    assert not shapes_mask(Shapes(ndim=2), image, (40, 40)).any()


def test_context_from_a_field_of_view_output_is_pasted_in_place() -> None:
    image = Image(np.zeros((40, 50)), name="img", scale=(2, 2), translate=(1, 1))
    crop = np.zeros((10, 20), np.uint32)
    crop[2:6, 2:6] = 1
    fov = Labels(
        crop,
        name="out",
        scale=(2, 2),
        translate=(1 + 2 * 5, 1 + 2 * 8),
        metadata={"ctxseg": {"field_of_view": (5, 8, 15, 28)}},
    )
    ctx = context_from_layers(image, fov)
    assert ctx.labels.shape == (40, 50) and ctx.labels[7:11, 10:14].all() and ctx.labels.sum() == 16
    assert ctx.region.sum() == 200 and ctx.region[5:15, 8:28].all()
    stranger = Labels(crop, name="stranger")  # same shape but not ours: no guessing
    with pytest.raises(InputError, match=r"'stranger' has shape \(10, 20\) but 'img' has \(40, 50\)"):
        context_from_layers(image, stranger)
    region = Labels(np.ones((40, 51), np.uint8), name="reg")
    with pytest.raises(InputError, match="region layer 'reg'"):
        context_from_layers(image, Labels(np.pad(crop, ((0, 30), (0, 30))), name="l"), region)


def test_run_settings_build_a_request() -> None:
    s = RunSettings(checkpoint="x.safetensors", steps=4, solver="heun", num_samples=3, seed=5, diameter=0)
    req = s.request(np.zeros((16, 16)))
    assert req.diameter == "auto" and req.steps == 4 and req.solver == "heun" and req.context_image is None
    ctx = make_context(np.zeros((16, 16)), np.pad(np.ones((4, 4), np.uint8), 6))
    req = replace(s, diameter=30.0).request(np.zeros((16, 16)), ctx)
    assert req.diameter == 30.0 and req.context_labels is ctx.labels and req.seed == 5


def test_segment_planes_on_a_stack(tiny_checkpoint: Path) -> None:
    snap = snapshot_layer(Image(np.random.default_rng(0).random((2, 32, 32)).astype(np.float32), name="s"))
    gen = _results.segment_planes(snap, RunSettings(checkpoint=str(tiny_checkpoint), steps=2, solver="euler"))
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            res = stop.value
            break
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {p.plane for p in progress} == {0, 1} and progress[0].message.startswith("plane 1/2: ")
    assert len(res.results) == 2 and res.results[0].labels.shape == (32, 32)
    gen = _results.segment_planes(snap, RunSettings(checkpoint=str(tiny_checkpoint)))
    next(gen)
    gen.close()  # cancelling between steps is clean


def test_segment_planes_on_an_rgb_time_series(tiny_checkpoint: Path) -> None:
    rgb = (np.random.default_rng(1).random((2, 32, 40, 3)) * 255).astype(np.uint8)
    snap = snapshot_layer(Image(rgb, rgb=True, name="rgb"))
    res = list_result(_results.segment_planes(snap, RunSettings(checkpoint=str(tiny_checkpoint))))
    assert [r.labels.shape for r in res.results] == [(32, 40)] * 2
    assert _results.plane_labels(res).shape == (2, 32, 40)
    assert _results.result_layer_data(res, flow=True)[1][0].shape == (2, 32, 40, 3)


def list_result(gen: Any) -> Any:
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_runtime_errors_surface_as_ctxseg_errors(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_ctxseg.services.stack as seg  # the planes run through the stack service

    def oom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("CUDA out of memory")
        yield

    monkeypatch.setattr(seg, "segment_steps", oom)
    snap = snapshot_layer(Image(np.zeros((32, 32))))
    with pytest.raises(CtxSegError, match="RuntimeError: CUDA out of memory"):
        list(_results.segment_planes(snap, RunSettings(checkpoint=str(tiny_checkpoint))))


def test_plane_labels_are_unique_and_features_follow() -> None:
    res = planes_result(3, scale=(5, 1, 1))
    labels = _results.plane_labels(res)
    assert labels.shape == (3, 40, 40) and labels.dtype == np.uint32
    assert [sorted(np.unique(p))[1:] for p in labels] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    feats = _results.stack_features(res)
    assert feats["index"].tolist() == list(range(1, 10))
    assert feats["plane"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert feats["area"].tolist() == [100, 225, 36] * 3 and feats["agreement"].tolist() == [1.0] * 9


def test_stitched_planes_give_one_label_and_one_row_per_object() -> None:
    from dataclasses import replace

    res = replace(planes_result(3), stitch_threshold=0.25)  # the same three squares in every plane
    labels = _results.plane_labels(res)
    assert [sorted(np.unique(p))[1:] for p in labels] == [[1, 2, 3]] * 3
    feats = _results.stack_features(res)
    assert feats["index"].tolist() == feats["label"].tolist() == [1, 2, 3]
    assert feats["n_planes"].tolist() == [3, 3, 3] and feats["plane"].tolist() == [0, 0, 0]
    assert feats["area"].tolist() == [300, 675, 108] and feats["agreement"].tolist() == [1.0] * 3
    per_plane = _results.stack_features(planes_result(3))
    for name in ("centroid-0", "bbox-0", "bbox-3", "intensity_max", "solidity"):
        assert feats[name].dtype == per_plane[name].dtype
    np.testing.assert_allclose(feats["centroid-1"], per_plane["centroid-1"][:3])  # same square each plane
    np.testing.assert_array_equal(feats["bbox-2"], per_plane["bbox-2"][:3])
    np.testing.assert_allclose(feats["intensity_max"], per_plane["intensity_max"].reshape(3, 3).max(0))
    np.testing.assert_allclose(
        feats["intensity_mean"], per_plane["intensity_mean"].reshape(3, 3).mean(0), rtol=1e-6
    )  # equal areas: the area-weighted mean is the plain mean


def test_result_layer_data() -> None:
    res = planes_result(2, scale=(5, 2, 2), translate=(0, 3, 4))
    out = _results.result_layer_data(res, flow=True, disagreement=True)
    assert [(kw["name"], kind) for _, kw, kind in out] == [
        ("stack ctxseg labels", "labels"),
        ("stack ctxseg flow", "image"),
        ("stack ctxseg disagreement", "image"),
    ]
    (labels, kw, _), (flow, fkw, _), (dis, _, _) = out
    assert labels.shape == (2, 40, 40) and flow.shape == (2, 40, 40, 3) and dis.shape == (2, 40, 40)
    assert kw["scale"] == fkw["scale"] == (5.0, 2.0, 2.0) and kw["translate"] == (0.0, 3.0, 4.0)
    meta = kw["metadata"]["ctxseg"]
    assert meta["planes"] == 2 and meta["source_layer"] == "stack" and meta["napari_ctxseg_version"]
    assert flow.dtype == np.uint8 and fkw["rgb"] and flow[:, 0, 0].max() == 0  # no flow in the background
    assert len(_results.result_layer_data(res)) == 1


def test_rethreshold_uses_the_cached_flows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_ctxseg.services.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the network was loaded"))
    res = planes_result(2)
    gen = _results.rethreshold_steps(res, replace(res.flow, min_size=50))
    assert next(gen) == 1 and next(gen) == 2
    with pytest.raises(StopIteration) as stop:
        next(gen)
    new = stop.value.value
    assert new.flow.min_size == 50 and new.results[0].metadata["flow_params"]["min_size"] == 50
    assert [np.bincount(r.labels.ravel())[1:].tolist() for r in new.results] == [[100, 225]] * 2
    assert _results.provenance(new)["flow_params"]["min_size"] == 50
    assert res.results[0].labels.max() == 3  # the cached result is not modified
