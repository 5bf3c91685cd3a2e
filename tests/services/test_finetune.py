"""Fine-tuning from in-memory arrays: validation, focusing on the annotation, held-out data, stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_ctxseg.core.errors import CheckpointError, ConfigError, InputError
from napari_ctxseg.services.finetune import (
    FinetuneSettings,
    TrainingPair,
    finetune_request_from_arrays,
    run_finetune,
)
from napari_ctxseg.services.recent import (
    add_recent_checkpoint,
    clear_recent_checkpoints,
    on_recent_changed,
    recent_checkpoints,
)

FAST = dict(steps=2, batch_size=1, crop_size=64, val_fraction=0.0, device="cpu", threads=1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CtxSegP checkpoint to fine-tune from."""
    import torch

    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.models import build_model
    from napari_ctxseg.services.models import PRESETS

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    return save_checkpoint(path, build_model(PRESETS["tiny"]).eval(), sigma_data=1.0)


def discs(
    shape: tuple[int, int] = (96, 96), centres: tuple = ((30, 30), (60, 64)), r: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """An image of bright discs and their labels."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i + 1
    image = (labels > 0) * 200.0 + np.random.default_rng(0).normal(20, 5, shape)
    return image.astype(np.float32), labels


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda im, lab: [(im, lab[:80], None, "cells")],
            "cells: labels shape (80, 96) does not match image",
        ),
        (lambda im, lab: [(im, np.zeros_like(lab), None, "cells")], "no annotated objects"),
        (lambda im, lab: [(im, lab, np.zeros(lab.shape, bool), "cells")], "region mask is all zero"),
        (lambda im, lab: [(im, lab, np.ones((5, 5), bool), "cells")], "region mask shape (5, 5)"),
        (lambda im, lab: [], "no training data"),
    ],
)
def test_bad_input_raises_clear_input_error(make, message) -> None:
    image, labels = discs()
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune_request_from_arrays(make(image, labels), base="does-not-matter.safetensors")


def test_bad_base_or_crop_size(tiny_base: Path, tmp_path: Path) -> None:
    image, labels = discs()
    with pytest.raises(CheckpointError, match="not found"):
        finetune_request_from_arrays([(image, labels, None, "a")], base=tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="multiple of the model stride 32"):
        finetune_request_from_arrays(
            [(image, labels, None, "a")], base=tiny_base, settings=FinetuneSettings(crop_size=48)
        )
    with pytest.raises(ConfigError, match="validation fraction"):
        finetune_request_from_arrays([(image, labels, None, "a")], base=tiny_base, val_fraction=1.5)
    with pytest.raises(ConfigError, match="unknown fine-tune setting"):
        finetune_request_from_arrays([(image, labels, None, "a")], base=tiny_base, epochs=3)


def test_few_objects_in_a_large_image_are_focused_and_recorded(tiny_base: Path, tmp_path: Path) -> None:
    image, labels = discs((400, 500), centres=((200, 300), (230, 330)))
    region = np.zeros(labels.shape, bool)
    region[180:260, 280:360] = True
    pair = TrainingPair(image, labels, region, "big", ("img", "lab", "done"))
    req = finetune_request_from_arrays(
        [pair],
        base=tiny_base,
        output=tmp_path / "o.safetensors",
        settings=FinetuneSettings(crop_size=64, margin=16, val_fraction=0.25),
    )
    (train,), (val,) = req.train_images, req.val_images
    assert train.shape[1] == 112 and train.shape[0] + val.shape[0] == 112  # 80 + 2 * 16, split on rows
    assert train.region.mean() > 0.4 and (train.labels > 0).any()
    rec = req.provenance["finetune"]
    assert rec["layers"] == ["done", "img", "lab"] and rec["pairs"][0]["box"] == [164, 276, 264, 376]
    assert rec["pairs"][0]["objects"] == 2 and len(rec["pairs"][0]["image_sha256"]) == 16
    assert "strip of 28 rows at the end" in rec["validation"]


def test_partial_annotation_teaches_only_near_objects_and_stacks_split(tiny_base: Path) -> None:
    image, labels = discs((200, 200), centres=((100, 100),))
    settings = FinetuneSettings(crop_size=64, annotation="partial", ring=4, margin=8, val_fraction=0.5)
    req = finetune_request_from_arrays([(image, labels, None, "p")], base=tiny_base, settings=settings)
    im = req.train_images[0]
    assert im.region is not None and im.region.sum() < (im.labels > 0).sum() * 3
    stack_img, stack_lab = np.stack([image] * 3), np.stack([labels, np.zeros_like(labels), labels])
    req = finetune_request_from_arrays([(stack_img, stack_lab, None, "s")], base=tiny_base, settings=settings)
    names = sorted(im.name for im in req.train_images + req.val_images)
    assert names == ["s[0]", "s[2]"] and len(req.val_images) == 1  # the empty frame is left out


def test_run_writes_loadable_checkpoint_with_provenance(tiny_base: Path, tmp_path: Path) -> None:
    from napari_ctxseg.core.nn.load import load_checkpoint

    image, labels = discs()
    req = finetune_request_from_arrays(
        [TrainingPair(image, labels, None, "a", ("nuclei", "nuclei_labels"))],
        base=tiny_base,
        output=tmp_path / "ft.safetensors",
        settings=FinetuneSettings(**FAST),
    )
    gen = run_finetune(req, threads=1)
    steps = []
    while True:
        try:
            steps.append(next(gen).step)
        except StopIteration as stop:
            result = stop.value
            break
    assert steps == [1, 2] and result.stopped == "done" and result.path == tmp_path / "ft.safetensors"
    _, info = load_checkpoint(result.path)
    assert info.provenance["finetune"]["layers"] == ["nuclei", "nuclei_labels"]
    assert info.provenance["steps_done"] == 2 and info.provenance["complete"] is True
    assert len(info.provenance["base_sha256"]) == 64


def _drain(gen):
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            return progress, stop.value


def test_cancel_and_time_budget_keep_the_best_weights(tiny_base: Path, tmp_path: Path) -> None:
    from napari_ctxseg.core.nn.load import load_checkpoint

    image, labels = discs()
    settings = FinetuneSettings(**{**FAST, "steps": 1000})
    req = finetune_request_from_arrays(
        [(image, labels, None, "a")],
        base=tiny_base,
        output=tmp_path / "cancel.safetensors",
        settings=settings,
    )
    _, result = _drain(run_finetune(req, should_stop=lambda: True))
    assert result.path is None and result.stopped == "cancelled" and not req.output.exists()

    calls = iter([False, False, True])
    progress, result = _drain(run_finetune(req, should_stop=lambda: next(calls)))
    assert result.stopped == "cancelled" and len(progress) == 2 and result.path == req.output
    assert load_checkpoint(result.path)[1].provenance["steps_done"] == 2

    req.output = tmp_path / "budget.safetensors"
    progress, result = _drain(run_finetune(req, time_budget_s=1e-3))
    assert result.stopped == "time budget" and len(progress) == 1 and progress[0].eta_s == 0.0
    info = load_checkpoint(result.path)[1]
    assert info.provenance["complete"] is True  # ended by its budget, with the learning rate decayed
    assert info.provenance["train_config"]["time_budget_s"] == 1e-3


def test_recent_checkpoint_registry(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    seen: list[list[Path]] = []
    on_recent_changed.connect(seen.append)
    try:
        clear_recent_checkpoints()
        add_recent_checkpoint(a)
        add_recent_checkpoint(b)
        add_recent_checkpoint(a)
        assert recent_checkpoints() == [a.resolve(), b.resolve()] and seen[-1] == recent_checkpoints()
        b.unlink()
        assert recent_checkpoints() == [a.resolve()]
        with pytest.raises(FileNotFoundError):
            add_recent_checkpoint(tmp_path / "missing.safetensors")
    finally:
        on_recent_changed.disconnect(seen.append)
        clear_recent_checkpoints()
