"""Adapting a model to a context: the fine-tune service on the context, then segmentation with the copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_ctxseg.cli import main
from napari_ctxseg.core.errors import ConfigError, InputError
from napari_ctxseg.core.io.checkpoint import read_info
from napari_ctxseg.services.adapt import adapt, adapt_request, inference_diameter
from napari_ctxseg.services.models import load_model
from napari_ctxseg.services.segment import SegmentProgress, SegmentRequest, segment_steps

from ..conftest import blobs


def _disc_labels(diameter: float, shape=(256, 256)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    r = diameter / 2
    centres = [(64, 64), (64, 192), (192, 64), (192, 192)]
    for i, (cy, cx) in enumerate(centres, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def test_inference_diameter_follows_the_segmentation_scale() -> None:
    # 80 px objects: diameter="auto" brings them to the model's 20 px
    assert inference_diameter([_disc_labels(80)]) == pytest.approx(20.0, rel=0.05)
    # 20 px objects are left at their size by "auto"
    assert inference_diameter([_disc_labels(20)]) == pytest.approx(20.0, rel=0.1)
    # an explicit diameter rescales as the segmentation would: 40 px objects said to be 40 px -> 20 px
    assert inference_diameter([_disc_labels(40)], 40.0) == pytest.approx(20.0, rel=0.1)
    assert inference_diameter([_disc_labels(40)], None) == pytest.approx(40.0, rel=0.1)
    assert inference_diameter([np.zeros((32, 32), np.int32)]) is None


def test_adapt_request_refuses_bad_contexts(tiny_checkpoint) -> None:
    image, labels = blobs((128, 128))
    with pytest.raises(InputError, match="no annotated object"):
        adapt_request(image, np.zeros_like(labels), checkpoint=tiny_checkpoint)
    with pytest.raises(InputError, match="integers"):
        adapt_request(image, labels.astype(np.float32), checkpoint=tiny_checkpoint)
    with pytest.raises(ConfigError, match="seconds"):
        adapt_request(image, labels, checkpoint=tiny_checkpoint, seconds=0)
    with pytest.raises(InputError, match="differ in length"):
        adapt_request([image, image], [labels], checkpoint=tiny_checkpoint)


def test_adapt_writes_a_changed_copy_with_its_provenance(tiny_checkpoint, tmp_path) -> None:
    image, labels = blobs((160, 160), n=10)
    seen = []
    path = adapt(
        image,
        labels,
        checkpoint=tiny_checkpoint,
        seconds=3,
        output=tmp_path / "a.safetensors",
        device="cpu",
        on_progress=seen.append,
    )
    assert path == tmp_path / "a.safetensors" and path.is_file()
    assert seen and seen[-1].step >= 1
    info = read_info(path)
    assert info.provenance["adapted_to_context"]["seconds"] == 3.0
    before = load_model(str(tiny_checkpoint), device="cpu").model.state_dict()
    after = load_model(str(path), device="cpu").model.state_dict()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


def test_segment_with_adapt_seconds_adapts_then_segments(tiny_checkpoint) -> None:
    image, labels = blobs((128, 128), n=8)
    req = SegmentRequest(
        image=image,
        checkpoint=str(tiny_checkpoint),
        device="cpu",
        context_image=image,
        context_labels=labels,
        adapt_seconds=2,
    )
    gen = segment_steps(req)
    stages = []
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        assert isinstance(p, SegmentProgress)
        stages.append(p.stage)
    assert stages[0] == "adapt" and "denoise" in stages
    assert result.labels.shape == image.shape
    assert result.metadata["adapted"]["steps"] >= 1
    assert result.metadata["checkpoint"] != tiny_checkpoint.name  # the adapted copy segmented


def test_segment_with_adapt_seconds_needs_a_context(tiny_checkpoint) -> None:
    image, _ = blobs((64, 64))
    with pytest.raises(InputError, match="needs a context"):
        list(segment_steps(SegmentRequest(image=image, checkpoint=str(tiny_checkpoint), adapt_seconds=5)))
    with pytest.raises(ConfigError, match="adapt_seconds"):
        list(segment_steps(SegmentRequest(image=image, checkpoint=str(tiny_checkpoint), adapt_seconds=-1)))


def test_cli_adapt_and_segment_adapt(tiny_checkpoint, tmp_path, capsys) -> None:
    import tifffile

    image, labels = blobs((128, 128), n=8)
    tifffile.imwrite(tmp_path / "ref.tif", image)
    tifffile.imwrite(tmp_path / "ref_labels.tif", labels.astype(np.uint16))
    tifffile.imwrite(tmp_path / "im.tif", image)
    out = tmp_path / "adapted.safetensors"
    argv = [
        "adapt",
        "--context-image",
        str(tmp_path / "ref.tif"),
        "--context-labels",
        str(tmp_path / "ref_labels.tif"),
        "--seconds",
        "2",
        "-o",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0 and out.is_file()
    mtime = out.stat().st_mtime_ns
    assert main(argv) == 2 and out.stat().st_mtime_ns == mtime  # an existing file is not replaced
    assert "--overwrite" in capsys.readouterr().err
    # segment --adapt: one adapted copy for the batch
    res = tmp_path / "res"
    assert (
        main(
            [
                "segment",
                str(tmp_path / "im.tif"),
                "-o",
                str(res),
                "--checkpoint",
                str(tiny_checkpoint),
                "--context-image",
                str(tmp_path / "ref.tif"),
                "--context-labels",
                str(tmp_path / "ref_labels.tif"),
                "--adapt",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (res / "im_labels.tif").is_file()
    assert "adapted model" in capsys.readouterr().err
    # --adapt without a context is refused before any work
    assert (
        main(
            [
                "segment",
                str(tmp_path / "im.tif"),
                "-o",
                str(tmp_path / "r2"),
                "--adapt",
                "5",
                "--checkpoint",
                str(tiny_checkpoint),
            ]
        )
        == 2
    )
    assert "needs a context" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "adapt",
                "--context-image",
                "a",
                "--context-labels",
                "b",
                "-o",
                "c.safetensors",
                "--seconds",
                "0",
            ]
        )


def test_adapt_request_carries_its_time_budget(tiny_checkpoint) -> None:
    image, labels = blobs((128, 128))
    req = adapt_request(image, labels, checkpoint=tiny_checkpoint, seconds=42)
    assert req.config.time_budget_s == 42.0
    # a short run: a short warm-up and a short EMA horizon (tens of steps fit the budget on 2 CPU cores)
    assert req.config.warmup <= 10 and req.config.ema_decay <= 0.95
    assert req.val_images == []  # one image: all of it trains
