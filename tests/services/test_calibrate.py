"""Calibration on the context: the bundled model scored on the bundled annotated context (real tensors)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctxseg._sample_data import read_sample
from napari_ctxseg.core.errors import InputError
from napari_ctxseg.services.calibrate import DIAMETER_FACTORS, calibrate_steps
from napari_ctxseg.services.evaluate import match_counts
from napari_ctxseg.services.progress import run_to_end
from napari_ctxseg.services.segment import SegmentRequest, labels_from_flows, segment, segment_steps


@pytest.fixture(scope="module")
def context() -> tuple[np.ndarray, np.ndarray]:
    return read_sample("context")[:192, :192], read_sample("context_labels")[:192, :192]


def test_calibration_scores_the_context_and_picks_the_best(context) -> None:
    image, labels = context
    req = SegmentRequest(image=image, device="cpu", context_image=image, context_labels=labels)
    stages = []
    cal = run_to_end(calibrate_steps(req), lambda p: stages.append(p.stage))
    assert set(stages) == {"calibrate"}
    assert not cal.leave_one_out and cal.tried >= len(DIAMETER_FACTORS) * 3
    # the bundled nuclei model on DSB nuclei: a real score, and never worse than the request's own settings
    assert cal.self_score > 0.5
    assert cal.self_score >= cal.default_score
    # the score is what the chosen settings give on the context (recomputed independently)
    res = segment(image, device="cpu", context_image=image, context_labels=labels, diameter=cal.diameter)
    again, _ = labels_from_flows(res.flows_model_scale, cal.flow, out_shape=image.shape, image=image)
    tp, fp, fn = match_counts(again, labels)
    assert tp / (tp + fp + fn) == pytest.approx(cal.self_score)


def test_segment_with_calibrate_records_the_self_score(context) -> None:
    image, labels = context
    target = read_sample("nuclei")[:160, :160]
    result = segment(target, device="cpu", context_image=image, context_labels=labels, calibrate=True)
    meta = result.metadata["calibration"]
    assert 0.5 < meta["self_score_ap50"] <= 1.0
    assert result.metadata["flow_params"]["flow_threshold"] == meta["flow_threshold"]
    assert result.metadata["diameter"] == pytest.approx(meta["diameter"], abs=0.01)


def test_several_context_images_are_scored_leave_one_out(context) -> None:
    image, labels = context
    halves = [(image[:, :96], labels[:, :96]), (image[:, 96:], labels[:, 96:])]
    req = SegmentRequest(
        image=image, device="cpu", context_image=[h[0] for h in halves], context_labels=[h[1] for h in halves]
    )
    cal = run_to_end(calibrate_steps(req))
    assert cal.leave_one_out
    assert 0.0 <= cal.self_score <= 1.0


def test_calibration_needs_an_annotated_context(context) -> None:
    image, labels = context
    with pytest.raises(InputError, match="needs a context"):
        run_to_end(segment_steps(SegmentRequest(image=image, calibrate=True)))
    with pytest.raises(InputError, match="no annotated object"):
        run_to_end(
            calibrate_steps(
                SegmentRequest(image=image, context_image=image, context_labels=np.zeros_like(labels))
            )
        )


def test_cli_calibrate_prints_the_self_score_once_for_the_batch(context, tmp_path, capsys) -> None:
    import tifffile

    from napari_ctxseg.cli import main

    image, labels = context
    tifffile.imwrite(tmp_path / "ref.tif", image)
    tifffile.imwrite(tmp_path / "ref_labels.tif", labels)
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", read_sample("nuclei")[:128, :128])
    argv = ["segment", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "out")]
    ctx = ["--context-image", str(tmp_path / "ref.tif"), "--context-labels", str(tmp_path / "ref_labels.tif")]
    assert main([*argv, *ctx, "--calibrate", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("context self-score AP@0.5") == 1
    assert (tmp_path / "out" / "a_labels.tif").is_file() and (tmp_path / "out" / "b_labels.tif").is_file()
    assert main([*argv, "--calibrate", "--overwrite"]) == 2
    assert "needs a context" in capsys.readouterr().err
