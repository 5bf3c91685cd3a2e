"""Fine-tune a model on in-memory annotations (napari layers, notebooks): build a request, run it.

Shared by the fine-tune widget and scripts; ``ctxseg finetune`` builds its request from folders
(:func:`~napari_ctxseg.services.training.load_folder_pairs`) and runs the same
:func:`~napari_ctxseg.services.training.run_training`.

Examples
--------
Two steps on three annotated discs (a real fine-tune takes minutes and a few hundred steps):

>>> import tempfile
>>> from pathlib import Path
>>> import numpy as np
>>> yy, xx = np.ogrid[:96, :96]
>>> labels = np.zeros((96, 96), np.int32)
>>> for k, (y, x) in enumerate([(20, 20), (20, 70), (70, 45)], start=1):
...     labels[(yy - y) ** 2 + (xx - x) ** 2 < 100] = k
>>> image = (labels > 0) + np.random.default_rng(0).normal(0, 0.1, labels.shape)
>>> settings = FinetuneSettings(steps=2, time_budget_min=0, batch_size=2, crop_size=64, device="cpu")
>>> out = Path(tempfile.mkdtemp()) / "tuned.safetensors"
>>> req = finetune_request_from_arrays([(image, labels, None, "cells")], output=out, settings=settings)
>>> [progress.step for progress in run_finetune(req)][-1], out.is_file()
(2, True)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..core.errors import ConfigError
from ..core.train.config import PRECISIONS, TrainConfig
from ..core.train.data import AnnotatedImage, AugmentConfig
from ..core.train.trainer import TrainProgress
from .finetune_data import TrainingPair, array_digest, check_pairs, prepare, split_validation
from .training import TrainRequest, run_training

__all__ = [
    "FinetuneResult",
    "FinetuneSettings",
    "TrainingPair",
    "check_base",
    "check_pairs",
    "default_output_path",
    "finetune_request_from_arrays",
    "run_finetune",
]


def default_output_path(now: datetime | None = None) -> Path:
    """``~/.napari-ctxseg/models/finetuned-<YYYYmmdd-HHMMSS>.safetensors`` (not created here)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path.home() / ".napari-ctxseg" / "models" / f"finetuned-{stamp}.safetensors"


@dataclass(frozen=True)
class FinetuneSettings:
    """User-facing settings of a fine-tune (the widget's fields and the script API).

    Parameters
    ----------
    steps
        Optimiser steps (the most steps when a time budget is set).
    time_budget_min
        Stop after this many minutes of wall time (0: no budget); the best weights so far are written.
    lr, batch_size, crop_size
        AdamW learning rate, samples per step, side of the square crops (a multiple of the model stride).
    augment
        Random rescaling, flips and intensity changes of the crops.
    val_fraction
        Share of the data held out for validation (whole images, or a strip of a single image); 0: none.
    seed
        Seed of every random choice.
    device
        ``auto``/``cpu``/``cuda``/``mps``.
    threads
        CPU threads torch may use while training (0: torch's default). Leaving a core free keeps the
        viewer responsive; on an oversubscribed CPU one thread is often faster than several.
    annotation
        ``"complete"``: without a region mask, unlabelled pixels are background. ``"partial"``: without a
        region mask, only the painted objects and a ``ring`` of pixels around them are taught.
    ring, margin
        Width of that ring, and of the image context kept around the annotated area (pixels).
    precision
        ``"fp32"`` or ``"bf16"`` (bfloat16 autocast: faster on CPUs with AVX-512 BF16 or AMX and on recent
        GPUs; the saved weights are the same float32 model either way).
    target_diameter, scale_range
        With ``augment``: each image is first rescaled so that its median object diameter becomes
        ``target_diameter`` pixels (``None``: as it is), then by a random factor within ``scale_range``.
    """

    steps: int = 300
    time_budget_min: float = 0.0
    lr: float = 3e-4
    batch_size: int = 4
    crop_size: int = 128
    augment: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    annotation: Literal["complete", "partial"] = "complete"
    ring: int = 6
    margin: int = 32
    precision: Literal["fp32", "bf16"] = "fp32"
    target_diameter: float | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "crop_size", "ring"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        if self.time_budget_min < 0:
            raise ConfigError(f"time budget must be >= 0 minutes (0 = none), got {self.time_budget_min}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.target_diameter is not None and not self.target_diameter > 0:
            raise ConfigError(f"target diameter must be > 0 pixels, got {self.target_diameter}")
        if self.annotation not in ("complete", "partial"):
            raise ConfigError(f"annotation must be 'complete' or 'partial', got {self.annotation!r}")

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` of these settings.

        Short runs get a short warm-up and an EMA whose horizon (~steps/10) lets the weights move.
        """
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            crop_size=self.crop_size,
            lr=self.lr,
            warmup=min(100, max(1, self.steps // 10)),
            ema_decay=min(0.999, max(0.9, 1 - 10 / self.steps)),
            augment=(
                AugmentConfig(
                    scale_range=(float(self.scale_range[0]), float(self.scale_range[1])),
                    target_diameter=self.target_diameter,
                )
                if self.augment
                else AugmentConfig.none()
            ),
            val_every=max(1, min(50, self.steps // 20)),
            val_batches=2,
            seed=self.seed,
            precision=self.precision,
        )


def check_base(base: str | os.PathLike | None, crop_size: int) -> tuple[Path, str]:
    """Resolve the checkpoint to start from and check that it can be fine-tuned with this crop size.

    Cheap (reads the header only). Returns ``(path, model kind)``.

    Raises
    ------
    CheckpointError
        Missing, corrupt or foreign file (including the bundled default when not installed).
    ConfigError
        A model that cannot be trained here, or a crop size that is not a multiple of its stride.
    """
    from ..core.io.checkpoint import read_info
    from .models import resolve_checkpoint

    path = resolve_checkpoint(base)
    info = read_info(path)
    if info.kind not in ("ctxseg-p", "seg-p"):
        raise ConfigError(f"{path.name} is a {info.kind} model; fine-tuning needs a ctxseg-p or seg-p model")
    stride = info.config.stride
    if crop_size % stride:
        raise ConfigError(
            f"crop size {crop_size} is not a multiple of the model stride {stride}; "
            f"use e.g. {max(stride, crop_size // stride * stride)}"
        )
    return path, info.kind


def finetune_request_from_arrays(
    pairs: Sequence[TrainingPair | tuple],
    *,
    base: str | os.PathLike = "default",
    output: str | os.PathLike | None = None,
    settings: FinetuneSettings | None = None,
    provenance: dict | None = None,
    **overrides: Any,
) -> TrainRequest:
    """Build a fine-tuning :class:`TrainRequest` from in-memory (image, labels, region, name) pairs.

    Parameters
    ----------
    pairs
        :class:`TrainingPair` values or plain ``(image, labels, region_or_None, name)`` tuples. Images
        ``(H, W)``/``(H, W, C)``, labels ``(H, W)`` integers (0 = background), regions ``(H, W)``, non-zero
        where the annotation is complete (elsewhere nothing is taught). Stacks ``(Z, H, W)`` become frames.
    base
        ``"default"`` (the bundled model) or a checkpoint path to start from.
    output
        Checkpoint to write; default :func:`default_output_path`.
    settings
        Training settings.
    provenance
        Extra facts to record in the checkpoint.
    **overrides
        Fields of :class:`FinetuneSettings` replacing those of ``settings`` (e.g. ``steps=200``).

    Returns
    -------
    TrainRequest
        Ready for :func:`run_finetune` (or :func:`~napari_ctxseg.services.training.run_training`). Its
        provenance records the base checkpoint, every pair's layer names and data hashes, the held-out
        data and the settings.

    Raises
    ------
    InputError
        Labels that do not match their image, no annotated objects, an all-zero region mask.
    CheckpointError, ConfigError
        A missing or unusable base checkpoint; a crop size that the model cannot take.

    Notes
    -----
    Each image is normalised and its flows computed on the whole image, then cropped to the bounding
    box of its region (plus ``settings.margin``), so that random crops land on annotated pixels even when
    only a few objects are annotated in a large image.
    """
    try:
        settings = replace(settings or FinetuneSettings(), **overrides)
    except TypeError as exc:
        raise ConfigError(f"unknown fine-tune setting: {exc}") from exc
    frames = check_pairs(list(pairs))
    base_path, kind = check_base(base, settings.crop_size)
    prepared: list[AnnotatedImage] = []
    records: list[dict[str, Any]] = []
    for f in frames:
        im, box = prepare(
            f,
            partial=settings.annotation == "partial",
            ring=settings.ring,
            margin=settings.margin,
            min_size=settings.crop_size,
        )
        prepared.append(im)
        records.append(
            {
                "name": f.name,
                "layers": list(f.layers),
                "shape": list(f.labels.shape),
                "box": box,
                "objects": int(np.unique(im.labels[im.labels > 0]).size),
                "image_sha256": array_digest(f.image),
                "labels_sha256": array_digest(f.labels),
                "region_sha256": array_digest(f.region),
            }
        )
    train, val, held_out = split_validation(prepared, settings.val_fraction, settings.seed)
    prov = {
        **(provenance or {}),
        "finetune": {
            "base": str(base),
            "base_path": str(base_path),
            "base_kind": kind,
            "pairs": records,
            "layers": sorted({n for r in records for n in r["layers"]}),
            "validation": held_out,
            "settings": asdict(settings),
        },
    }
    return TrainRequest(
        output=Path(output) if output else default_output_path(),
        train_images=train,
        val_images=val,
        base=str(base_path),
        config=settings.train_config(),
        device=settings.device,
        provenance=prov,
    )


@dataclass(frozen=True)
class FinetuneResult:
    """How a fine-tune ended: the checkpoint (``None`` if stopped before the first step) and why."""

    path: Path | None
    steps_done: int
    stopped: Literal["done", "time budget", "cancelled"]
    best_val_loss: float | None = None


def run_finetune(
    req: TrainRequest,
    *,
    time_budget_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    threads: int = 0,
) -> Generator[TrainProgress, None, FinetuneResult]:
    """Run a fine-tune, yielding progress after every step; stops on time or when asked.

    Parameters
    ----------
    req
        From :func:`finetune_request_from_arrays`.
    time_budget_s
        Train for at most this many seconds (``None`` or 0: no budget). The learning rate then decays
        with time as well as steps, and a run that ends by time is a complete one (the checkpoint says
        ``complete: true``); setup (loading the model, computing flows) comes on top.
    should_stop
        Polled after every step (e.g. ``threading.Event.is_set`` of a Cancel button).
    threads
        CPU threads for torch during the run (0: unchanged); the previous setting is restored after.
        This is process-wide: other torch work in the process shares the limit meanwhile.

    Returns
    -------
    FinetuneResult
        On a stop, the best weights so far are written atomically to ``req.output`` (or nothing if no
        step finished).
    """
    import torch

    wall0 = time.time()
    if time_budget_s:
        req = replace(req, config=replace(req.config, time_budget_s=float(time_budget_s)))
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    gen = run_training(req)
    last: TrainProgress | None = None
    try:
        while True:
            if should_stop is not None and should_stop():
                break  # cancelled
            try:
                progress = next(gen)
            except StopIteration as stop:
                path: Path | None = stop.value
                ended: Literal["done", "time budget"] = (
                    "time budget" if last is not None and last.step < req.config.steps else "done"
                )
                return FinetuneResult(
                    path, last.step if last else 0, ended, last.best_val_loss if last else None
                )
            last = progress
            yield progress
    finally:
        gen.close()  # writes the best weights so far when a step finished (no-op after completion)
        if threads:
            torch.set_num_threads(threads_before)
    out = Path(req.output)
    written = out.is_file() and out.stat().st_mtime >= wall0 - 1
    return FinetuneResult(
        out if written else None, last.step if last else 0, "cancelled", last.best_val_loss if last else None
    )
