"""The Segment dock widget in a real viewer, with the threaded path run for real (tiny random checkpoint)."""

from __future__ import annotations

import pickle
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from napari.layers import Labels
from napari.utils.notifications import notification_manager

from napari_ctxseg._widgets import _results

from .conftest import nuclei_crop, run_and_wait


def _labels_layers(viewer: Any) -> list[Labels]:
    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


@pytest.fixture
def slow_segment(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The real segment_planes, with a pause at every yield (so a run can be cancelled mid-way)."""
    seen = {"yields": 0}
    real = _results.segment_planes

    def slow(*args: Any, **kwargs: Any) -> Generator[Any, None, Any]:
        gen = real(*args, **kwargs)
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            seen["yields"] += 1
            time.sleep(0.2)
            yield p

    monkeypatch.setattr(_results, "segment_planes", slow)
    return seen


def test_run_adds_labels_with_features_and_provenance(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, layer = segment_widget(scale=(0.5, 0.25), translate=(10.0, -4.0))
    before = layer.data.copy()
    widget.samples.value, widget.seed.value = 2, 7
    widget.out_flow.value = widget.out_disagreement.value = True
    run_and_wait(qtbot, widget)

    assert widget.error.value == ""
    names = [lay.name for lay in viewer.layers]
    assert names == ["cells", "cells ctxseg flow", "cells ctxseg disagreement", "cells ctxseg labels"]
    labels = viewer.layers["cells ctxseg labels"]
    assert isinstance(labels, Labels) and labels.data.shape == (128, 128)
    np.testing.assert_allclose(labels.scale, (0.5, 0.25))
    np.testing.assert_allclose(labels.translate, (10.0, -4.0))
    for other in ("cells ctxseg flow", "cells ctxseg disagreement"):
        np.testing.assert_allclose(viewer.layers[other].translate, (10.0, -4.0))
    assert viewer.layers["cells ctxseg flow"].data.shape == (128, 128, 3)
    feats = labels.features
    n = int(labels.data.max())
    assert n > 0 and len(feats) == n
    for col in ("index", "label", "area", "centroid-0", "intensity_mean", "agreement", "flow_error"):
        assert col in feats.columns
    assert sorted(feats["index"]) == list(range(1, n + 1))
    meta = labels.metadata["ctxseg"]
    assert meta["seed"] == 7 and meta["steps"] == 3 and meta["num_samples"] == 2
    assert len(meta["checkpoint_sha256"]) == 64 and meta["context"] is None
    assert meta["napari_ctxseg_version"] and meta["device"] == "cpu"
    assert "cpu" in widget.status.value
    assert meta["diameter"] == "auto" and "measured_diameter" in meta  # diameter 0 = auto
    np.testing.assert_array_equal(layer.data, before)  # the input is untouched
    assert viewer.layers.selection.active is labels
    assert "Features table widget (napari)" in viewer.window.dock_widgets
    assert widget.run_button.text == "Run" and widget._settings.enabled


def test_tta_checkbox_runs_the_flip_averaged_model(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, _ = segment_widget()
    assert widget._run_settings().tta is False  # off by default: 4x the network calls
    widget.tta.value = True
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    meta = viewer.layers["cells ctxseg labels"].metadata["ctxseg"]
    assert meta["tta"] is True and meta["num_samples"] == 1


def test_snapshot_protects_against_layer_changes_mid_run(
    qtbot: Any, segment_widget: Any, slow_segment: dict[str, int]
) -> None:
    viewer, widget, layer = segment_widget(translate=(5.0, 5.0))
    other = viewer.add_image(np.zeros((64, 64), np.float32), name="other", translate=(100.0, 100.0))
    widget.image.value = layer
    widget.run_button.native.click()
    assert widget.run_button.text == "Cancel" and not widget._settings.enabled
    qtbot.waitUntil(lambda: slow_segment["yields"] >= 1, timeout=30_000)
    widget.image.value = other  # switch the source mid-run ...
    layer.data = np.zeros_like(layer.data)  # ... and change its data
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    out = viewer.layers["cells ctxseg labels"]
    assert out.data.shape == (128, 128) and out.data.max() > 0
    np.testing.assert_allclose(out.translate, (5.0, 5.0))


def test_cancel_mid_run_leaves_no_layer(
    qtbot: Any, segment_widget: Any, slow_segment: dict[str, int]
) -> None:
    viewer, widget, _ = segment_widget()
    widget.steps.value = 6
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.progress.value > 0, timeout=30_000)  # past the size-measuring pass
    assert widget.progress.value < 1000
    widget.run_button.native.click()  # Cancel
    assert not widget.run_button.enabled
    qtbot.waitUntil(lambda: widget._worker is None, timeout=30_000)
    assert [lay.name for lay in viewer.layers] == ["cells"]
    assert "cancelled" in widget.status.value and widget.run_button.text == "Run"
    assert slow_segment["yields"] < 2 + 6 + 2  # stopped before the end (size pass, 6 steps, labels)


def test_context_shape_mismatch_shows_error_and_runs_nothing(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, layer = segment_widget()
    bad = viewer.add_labels(np.ones((64, 64), np.uint16), name="ctx labels")
    widget.ctx_image.value, widget.ctx_labels.value = layer, bad
    n_notes = len(notification_manager.records)
    widget.run_button.native.click()
    assert widget._worker is None
    assert "(64, 64)" in widget.error.value and "(128, 128)" in widget.error.value
    assert len(notification_manager.records) == n_notes + 1
    assert "(64, 64)" in str(notification_manager.records[-1].message)
    assert [lay.name for lay in viewer.layers] == ["cells", "ctx labels"]


def test_context_with_region_on_the_current_image(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, layer = segment_widget()
    ctx = np.zeros((128, 128), np.uint16)
    ctx[20:30, 20:30], ctx[50:62, 40:50] = 1, 2
    labels = viewer.add_labels(ctx, name="partial")
    region = viewer.add_shapes(
        [np.array([[10, 10], [10, 70], [70, 70], [70, 10]])], shape_type="rectangle", name="done here"
    )
    widget.ctx_image.value, widget.ctx_labels.value, widget.ctx_region.value = layer, labels, region
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    assert viewer.layers["cells ctxseg labels"].metadata["ctxseg"]["context"] is not None


def test_pickle_checkpoint_is_refused_with_a_hint(qtbot: Any, segment_widget: Any, tmp_path: Any) -> None:
    viewer, widget, _ = segment_widget()
    path = tmp_path / "flax_model.pkl"
    path.write_bytes(pickle.dumps({"params": [1, 2, 3]}))
    widget.browse.value = path
    run_and_wait(qtbot, widget)
    assert "ctxseg convert" in widget.error.value
    assert len(viewer.layers) == 1


def test_closing_the_viewer_during_a_run_does_not_crash(
    qtbot: Any, segment_widget: Any, slow_segment: dict[str, int]
) -> None:
    viewer, widget, _ = segment_widget()
    widget.steps.value = 6
    widget.run_button.native.click()
    worker = widget._worker
    qtbot.waitUntil(lambda: slow_segment["yields"] >= 1, timeout=30_000)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    qtbot.wait(100)  # let the queued signals arrive at the closed widget
    assert slow_segment["yields"] < 8


def test_stack_gives_a_3d_labels_layer(qtbot: Any, segment_widget: Any) -> None:
    stack = np.stack([nuclei_crop(64), nuclei_crop(64), nuclei_crop(64)[:, ::-1]])
    viewer, widget, _ = segment_widget(stack, scale=(2.0, 1.0, 1.0))
    widget.stitch.value = 0.0  # every plane's objects get their own labels
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells ctxseg labels"]
    assert labels.data.shape == (3, 64, 64) and labels.ndim == 3
    np.testing.assert_allclose(labels.scale, (2.0, 1.0, 1.0))
    assert set(labels.features["plane"]) <= {0, 1, 2}
    ids = [set(np.unique(p)) - {0} for p in labels.data]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # labels stay unique across planes
    assert len(labels.features) == len(set().union(*ids))
    assert labels.metadata["ctxseg"]["planes"] == 3
    per_plane_area = labels.features["area"].sum()

    widget.stitch.value = 0.25  # the default: the same nuclei in planes 0 and 1 become one object each
    run_and_wait(qtbot, widget)
    stitched = viewer.layers[-1]
    assert stitched is not labels and stitched.data.shape == (3, 64, 64)
    np.testing.assert_array_equal(stitched.data[0], stitched.data[1])
    ids = [set(np.unique(p)) - {0} for p in stitched.data]
    assert ids[0] and len(stitched.features) == len(set().union(*ids))  # one row per object
    first = stitched.features.set_index("index").loc[sorted(ids[0])]
    assert (first["n_planes"] >= 2).all() and (first["plane"] == 0).all()
    assert stitched.features["area"].sum() == per_plane_area == (stitched.data > 0).sum()


def test_stack_contrast_choice_and_a_blank_slice(
    qtbot: Any, segment_widget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_ctxseg.services.stack as stack_service

    stack = np.stack([nuclei_crop(64), np.zeros((64, 64), np.uint8), nuclei_crop(64)])
    viewer, widget, _ = segment_widget(stack)
    calls = []
    real = stack_service.stack_intensity_limits
    monkeypatch.setattr(stack_service, "stack_intensity_limits", lambda *a: calls.append(a) or real(*a))
    run_and_wait(qtbot, widget)  # per slice (the default): the blank slice does not stop the run
    assert not widget.error.value and viewer.layers[-1].data.shape == (3, 64, 64) and not calls
    widget.normalize.value = "stack"
    run_and_wait(qtbot, widget)
    assert not widget.error.value and viewer.layers[-1].data.shape == (3, 64, 64) and len(calls) == 1


def test_3d_mode_segments_a_real_z_stack_into_3d_objects(qtbot: Any, segment_widget: Any) -> None:
    import tifffile

    from tests.conftest import DATA

    path = DATA / "cells3d_nuclei" / "image.tif"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    volume = tifffile.imread(path)[14:50, 64:160, 64:160]
    viewer, widget, layer = segment_widget(volume, scale=(0.29, 0.26, 0.26))
    widget.checkpoint.value = "default"
    widget.steps.value, widget.solver.value = 1, "edf"
    widget.volume_3d.value = True
    run_and_wait(qtbot, widget)
    assert widget.error.value == "", widget.error.value
    labels = viewer.layers["cells ctxseg labels"]
    assert labels.data.shape == volume.shape and labels.data.max() >= 3
    np.testing.assert_allclose(labels.scale, (0.29, 0.26, 0.26))
    assert len(labels.features) == labels.data.max() and "centroid-2" in labels.features
    z_extent = labels.features["bbox-3"] - labels.features["bbox-0"]
    assert z_extent.max() > 10  # objects are followed through z, not one plane each
    assert labels.metadata["ctxseg"]["mode"] == "3d" and "3D" in widget.status.value
    np.testing.assert_array_equal(layer.data, volume)  # the user's layer is untouched
    widget.apply_button.native.click()
    assert "slice-by-slice" in widget.error.value


def test_cancelling_a_3d_run_leaves_no_layer(
    qtbot: Any, segment_widget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_ctxseg.services.volume as stack_service

    seen = {"slices": 0}
    real = stack_service.run_to_end

    def slow(gen: Any, *args: Any) -> Any:  # each slice's prediction, paused
        seen["slices"] += 1
        time.sleep(0.05)
        return real(gen, *args)

    monkeypatch.setattr(stack_service, "run_to_end", slow)
    viewer, widget, _ = segment_widget(np.stack([nuclei_crop(64)] * 12))
    widget.volume_3d.value = True
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: seen["slices"] >= 3, timeout=30_000)
    widget.run_button.native.click()  # Cancel
    qtbot.waitUntil(lambda: widget._worker is None, timeout=30_000)
    assert [lay.name for lay in viewer.layers] == ["cells"]
    assert "cancelled" in widget.status.value and seen["slices"] < 12 + 64 + 64


def test_3d_mode_refuses_2d_layers_and_contexts(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, layer = segment_widget()  # a 2D image
    widget.volume_3d.value = True
    run_and_wait(qtbot, widget)
    assert "3D mode needs a grey (Z, Y, X) stack" in widget.error.value
    stack = viewer.add_image(np.stack([nuclei_crop(64)] * 8), name="stack")
    widget.image.value = stack
    annotation = np.zeros((128, 128), int)
    annotation[10:20, 10:20] = 1
    widget.ctx_image.value, widget.ctx_labels.value = layer, viewer.add_labels(annotation)
    widget.run_button.native.click()
    assert "without a context" in widget.error.value and widget._worker is None


def test_rethreshold_updates_labels_without_the_network(
    qtbot: Any, segment_widget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    viewer, widget, _ = segment_widget()
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells ctxseg labels"]
    n_before = len(labels.features)

    def no_network(*_: Any, **__: Any) -> None:
        raise AssertionError("the network was called")

    import napari_ctxseg.services.models as models
    import napari_ctxseg.services.segment as seg
    from napari_ctxseg.core.diffusion.edm import EDMDenoiser

    monkeypatch.setattr(seg, "segment_steps", no_network)
    monkeypatch.setattr(models, "load_model", no_network)
    monkeypatch.setattr(EDMDenoiser, "__call__", no_network)
    areas = np.sort(labels.features["area"].to_numpy())
    widget.min_size.value = int(areas[len(areas) // 2]) + 1  # drop about half of the objects
    widget.apply_button.native.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert widget.error.value == ""
    assert len(viewer.layers) == 2 and viewer.layers["cells ctxseg labels"] is labels
    n_after = int(labels.data.max())
    assert 0 < n_after < n_before and len(labels.features) == n_after
    assert labels.features["area"].min() >= widget.min_size.value
    assert labels.metadata["ctxseg"]["flow_params"]["min_size"] == widget.min_size.value
    widget.min_contrast.value = 100.0  # the random model's objects are not 100 noise levels bright
    widget.apply_button.native.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert widget.error.value == "" and labels.data.max() == 0 and len(labels.features) == 0
    assert labels.metadata["ctxseg"]["flow_params"]["min_contrast"] == 100.0


def test_field_of_view_and_add_labels_to_context(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, _ = segment_widget(show=True, scale=(0.5, 0.5), translate=(3.0, 7.0))
    camera = getattr(viewer, "scene", viewer).camera  # napari < 0.9: viewer.camera
    camera.center = (3.0 + 20.0, 7.0 + 24.0)
    camera.zoom *= 3
    qtbot.wait(200)  # a draw updates the layer's visible corner pixels
    widget.fov.value = True
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    out = viewer.layers["cells ctxseg labels"]
    y0, x0, y1, x1 = out.metadata["ctxseg"]["field_of_view"]
    assert out.data.shape == (y1 - y0, x1 - x0) and out.data.shape[0] < 128
    np.testing.assert_allclose(out.translate, (3.0 + 0.5 * y0, 7.0 + 0.5 * x0))
    assert y0 <= 40 < y1 and x0 <= 48 < x1  # the camera centre (data pixel 40, 48) is inside

    # the interactive loop: the (corrected) output becomes the context of the next run
    assert widget.corrected.value is out
    widget.add_context_button.native.click()
    assert widget.ctx_labels.value is out and widget.ctx_image.value is widget.image.value
    widget.fov.value = False
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    second = viewer.layers[-1]
    assert second.name.startswith("cells ctxseg labels") and second is not out
    assert second.data.shape == (128, 128) and second.metadata["ctxseg"]["context"] is not None


def test_sample_data_opens_through_the_manifest(make_napari_viewer: Any) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-ctxseg", "nuclei")
    assert [lay.name for lay in viewer.layers] == ["nuclei"] and viewer.layers[0].data.ndim == 2
    viewer.open_sample("napari-ctxseg", "context")
    assert isinstance(viewer.layers["context labels"], Labels)


def test_auto_size_is_reported_after_the_run(
    qtbot: Any, segment_widget: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_ctxseg.services.auto_diameter as seg

    monkeypatch.setattr(seg, "median_diameter", lambda labels: 10.0)  # small objects, whatever was found
    viewer, widget, layer = segment_widget()
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells ctxseg labels"]
    assert labels.metadata["ctxseg"]["scale"] == pytest.approx(2.0) and labels.data.shape == layer.data.shape
    assert "objects ~10 px, upscaled 2.0x" in widget.status.value
    monkeypatch.setattr(seg, "median_diameter", lambda labels: 90.0)  # large objects: brought down to 20 px
    run_and_wait(qtbot, widget)
    labels = viewer.layers[-1]
    assert labels.metadata["ctxseg"]["scale"] == pytest.approx(20 / 90)
    assert labels.data.shape == layer.data.shape
    assert "objects ~90 px, downscaled 4.5x" in widget.status.value


def test_sampler_note_flags_settings_outside_the_checkpoints_declaration(
    qtbot: Any, segment_widget: Any, tmp_path: Any
) -> None:
    """A checkpoint that declares 1-2 steps of euler/edf: the note under the solver says when a setting
    leaves that and follows the controls; it stays hidden for a checkpoint that declares nothing."""
    from napari_ctxseg.core.io.checkpoint import set_sampling

    _, widget, _ = segment_widget()
    plain = Path(widget.browse.value)  # the tiny test checkpoint declares nothing
    declared = tmp_path / "declared.safetensors"
    declared.write_bytes(plain.read_bytes())
    set_sampling(declared, {"solvers": ["euler", "edf"], "max_steps": 2, "evidence": "test"})
    note = widget.sampler_note
    widget.steps.value, widget.solver.value = 1, "heun"
    widget.browse.value = declared
    assert widget.checkpoint.value == str(declared.resolve())
    assert note.native.isHidden() and note.value == ""  # isHidden: hidden itself, not only its window
    widget.steps.value = 2
    assert "declared.safetensors is validated for 1-2 sampler steps with euler or edf; 2 steps with heun" in (
        note.value
    )
    assert not note.native.isHidden()
    widget.solver.value = "edf"
    assert note.value == "" and note.native.isHidden()
    widget.steps.value = 4
    assert "4 steps with edf" in note.value and not note.native.isHidden()
    assert widget._run_settings().steps == 4  # the note only advises: a run uses the settings as they are
    widget.checkpoint.value = str(plain.resolve())
    assert note.value == "" and note.native.isHidden()


def _context_labels() -> np.ndarray:
    ctx = np.zeros((128, 128), np.uint16)
    for i, (y, x) in enumerate([(20, 20), (20, 70), (60, 40), (90, 90), (100, 30)], 1):
        ctx[y : y + 14, x : x + 14] = i
    return ctx


def test_adapt_to_context_adapts_a_saved_copy_then_segments(
    qtbot: Any, segment_widget: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # the adapted copy goes to ~/.napari-ctxseg/models
    viewer, widget, layer = segment_widget()
    labels = viewer.add_labels(_context_labels(), name="annotated")
    widget.ctx_image.value, widget.ctx_labels.value = layer, labels
    widget.adapt.value, widget.adapt_seconds.value = True, 5
    stages: list[str] = []
    widget.run_button.native.click()
    widget._worker.yielded.connect(lambda p: stages.append(getattr(getattr(p, "step", None), "stage", "")))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert widget.error.value == ""
    assert "adapt" in stages
    out = viewer.layers["cells ctxseg labels"]
    meta = out.metadata["ctxseg"]
    saved = list((tmp_path / ".napari-ctxseg" / "models").glob("adapted-*.safetensors"))
    assert len(saved) == 1
    assert "adapted for 5 s" in widget.status.value and saved[0].name in widget.status.value
    # the copy is offered for later runs, and the layer records it
    assert str(saved[0]) in widget.checkpoint.choices
    assert saved[0].name in str(meta)
    np.testing.assert_array_equal(labels.data, _context_labels())  # the user's layer is untouched


def test_adapt_to_context_needs_a_context(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, _ = segment_widget()
    widget.adapt.value = True
    widget.run_button.native.click()
    assert widget._worker is None
    assert "needs a context" in widget.error.value
    assert len(viewer.layers) == 1


def test_cancelling_an_adaptation_adds_no_layer_and_keeps_no_copy(
    qtbot: Any, segment_widget: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    viewer, widget, layer = segment_widget()
    labels = viewer.add_labels(_context_labels(), name="annotated")
    widget.ctx_image.value, widget.ctx_labels.value = layer, labels
    widget.adapt.value, widget.adapt_seconds.value = True, 600
    seen: list[Any] = []
    widget.run_button.native.click()
    widget._worker.yielded.connect(seen.append)
    qtbot.waitUntil(lambda: len(seen) >= 2, timeout=60_000)
    widget.run_button.native.click()  # Cancel
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert "cancelled" in widget.status.value
    assert [type(x).__name__ for x in viewer.layers] == ["Image", "Labels"]
    assert not list((tmp_path / ".napari-ctxseg" / "models").glob("adapted-*.safetensors"))


def test_calibrating_on_the_context_reports_its_self_score(qtbot: Any, segment_widget: Any) -> None:
    from napari_ctxseg._sample_data import read_sample

    viewer, widget, _ = segment_widget()
    widget.checkpoint.value = "default"  # the bundled nuclei model on a bundled annotated nuclei crop
    widget.steps.value, widget.solver.value = 1, "edf"
    image = viewer.add_image(read_sample("context")[:128, :128], name="ref")
    labels = viewer.add_labels(read_sample("context_labels")[:128, :128], name="ref labels")
    widget.ctx_image.value, widget.ctx_labels.value = image, labels
    assert widget.calibrate.value  # on by default when a context is given
    run_and_wait(qtbot, widget, timeout=180_000)
    assert widget.error.value == ""
    cal = viewer.layers["cells ctxseg labels"].metadata["ctxseg"]["calibration"]
    assert 0.5 < cal["self_score_ap50"] <= 1.0
    assert f"context self-score AP@0.5 {cal['self_score_ap50']:.2f}" in widget.status.value
    # the chosen flow settings are now the re-threshold controls' values
    assert widget.min_flow.value == pytest.approx(cal["flow_threshold"])
    assert widget.min_size.value == cal["min_size"]


def test_channel_choice_of_a_channel_first_layer(qtbot: Any, segment_widget: Any) -> None:
    cells = nuclei_crop()
    noise = np.random.default_rng(0).integers(0, 255, cells.shape).astype(cells.dtype)
    viewer, widget, _ = segment_widget(np.stack([noise, cells]), scale=(1.0, 0.5, 0.5))
    widget.diameter.value = 20.0
    assert list(widget.channel.choices) == [None, 0, 1]
    widget.channel.value = 1
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    labels = viewer.layers["cells ctxseg labels"]
    assert labels.data.shape == (128, 128)  # the channel axis is gone
    np.testing.assert_allclose(labels.scale, (0.5, 0.5))
    meta = labels.metadata["ctxseg"]
    assert meta["channels"]["channel"] == 1 and meta["channels"]["channel_axis"] == 0
    assert widget.progress.value == widget.progress.max  # the bar is full beside "N objects ..."
    # the features table shows the label once: napari's row number "Index" is hidden beside "index"
    table = viewer.window.dock_widgets["Features table widget (napari)"].table
    model = table.model()
    headers = {model.headerData(c, 1, 0): c for c in range(model.columnCount())}
    assert "index" in headers and table.isColumnHidden(headers["Index"])
    assert not table.isColumnHidden(headers["index"])


def test_nuclear_channel_from_another_layer(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, _ = segment_widget()
    viewer.add_image(nuclei_crop()[::-1].copy(), name="dapi")
    widget.diameter.value = 20.0
    widget.nuclear.reset_choices()
    widget.nuclear.value = viewer.layers["dapi"]
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    meta = viewer.layers["cells ctxseg labels"].metadata["ctxseg"]
    assert meta["channels"]["nuclear_layer"] == "dapi"
    assert meta["channels"]["model_input"] == "(channel, nuclear, 0)"


def test_save_and_load_a_context_pack(qtbot: Any, segment_widget: Any, tmp_path: Any) -> None:
    from napari_ctxseg.services.context_pack import load_context_pack

    viewer, widget, layer = segment_widget()
    lab = np.zeros((128, 128), np.uint16)
    lab[10:20, 10:20], lab[40:52, 60:70] = 1, 2
    labels = viewer.add_labels(lab, name="truth")
    widget.ctx_image.value, widget.ctx_labels.value = layer, labels
    widget._ask_path = lambda save: str(tmp_path / "ctx")  # no dialog in tests; ".npz" is added
    widget.save_context_button.native.click()
    assert widget.error.value == "" and "saved" in widget.status.value
    pack = load_context_pack(tmp_path / "ctx.npz")
    np.testing.assert_array_equal(pack.labels, lab)
    assert pack.info["labels_layer"] == "truth" and pack.self_score is None

    widget._ask_path = lambda save: str(tmp_path / "ctx.npz")
    widget.load_context_button.native.click()
    assert widget.error.value == "" and "loaded" in widget.status.value
    assert widget.ctx_image.value.name == "ctx context image"
    assert widget.ctx_labels.value.name == "ctx context labels"
    np.testing.assert_array_equal(widget.ctx_labels.value.data, lab)

    (tmp_path / "bad.npz").write_bytes(b"junk")
    widget._ask_path = lambda save: str(tmp_path / "bad.npz")
    n = len(viewer.layers)
    widget.load_context_button.native.click()
    assert "not a readable context pack" in widget.error.value and len(viewer.layers) == n


def test_diameter_in_the_layers_unit_is_converted_to_pixels(qtbot: Any, segment_widget: Any) -> None:
    viewer, widget, layer = segment_widget(scale=(0.5, 0.5), units=("um", "um"))
    assert widget.diameter_unit.choices == ("micrometer", "px")
    assert widget.diameter_unit.value == "micrometer"  # the layer's own unit first
    widget.diameter.value = 10.0  # 10 um at 0.5 um per pixel: 20 px, the model's scale
    assert widget._run_settings().diameter == pytest.approx(20.0)
    widget.diameter_unit.value = "px"
    assert widget._run_settings().diameter == pytest.approx(10.0)
    plain = viewer.add_image(np.zeros((64, 64), np.float32), name="plain")
    widget.image.value = plain
    assert widget.diameter_unit.choices == ("px",)
    widget.image.value = layer
    widget.diameter_unit.value = "micrometer"
    run_and_wait(qtbot, widget)
    assert widget.error.value == ""
    # the run used the converted size: the model saw the image at 20 / 20 px = scale 1
    assert viewer.layers["cells ctxseg labels"].metadata["ctxseg"]["scale"] == pytest.approx(1.0)
