"""Adapt a model to a context: a short fine-tune of a copy on the context's annotation.

One annotated image of a new kind of cell is often enough to *teach* the model that kind, even where the
learned context alone does not carry it. :func:`adapt_steps` fine-tunes a copy of a checkpoint on the
context (image, labels, optional region) within a time budget, through the fine-tune service
(:func:`~napari_ctxseg.services.finetune.run_finetune`: one training code path), and writes the adapted
checkpoint; ``segment(..., adapt_seconds=S)``, ``ctxseg adapt`` / ``ctxseg segment --adapt S`` and the
Segment widget's *adapt to context* option use it.

The crops are drawn at the scale the segmentation will use: the context's objects are brought to the size
that ``diameter`` (``"auto"``: measured from the context's labels) gives them at inference, with a random
rescale of 0.75-1.33x, flips and intensity changes around it. Half of the samples use another crop of the
context images as their context, as the model will be used.

Examples
--------
>>> import numpy as np
>>> from napari_ctxseg.services.adapt import adapt_settings
>>> adapt_settings(seconds=60).time_budget_min
1.0
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..core.errors import ConfigError, InputError
from ..core.pipeline import SegmentProgress
from ..core.train.trainer import TrainProgress
from .finetune import FinetuneResult, FinetuneSettings, finetune_request_from_arrays, run_finetune
from .progress import relay, run_to_end
from .training import TrainRequest

__all__ = [
    "ADAPT_SECONDS",
    "adapt",
    "adapt_request",
    "adapt_settings",
    "adapt_steps",
    "adapt_to_context_steps",
    "default_adapted_path",
]

#: default time budget of an adaptation, seconds (fits 2 CPU cores in about 1-2 minutes with the setup)
ADAPT_SECONDS = 90.0
#: the most optimiser steps of an adaptation (the time budget usually ends it first)
ADAPT_MAX_STEPS = 600
#: learning-rate warm-up steps and EMA decay of an adaptation: on 2 CPU cores a 90-second budget holds only
#: tens to about a hundred steps (14 in 30 s on a loaded machine), so the fine-tune defaults (a warm-up of
#: a tenth of the step limit, an EMA over ~60 steps) would spend most of the run warming up
ADAPT_WARMUP = 10
ADAPT_EMA_DECAY = 0.95


def default_adapted_path(now: datetime | None = None) -> Path:
    """``~/.napari-ctxseg/models/adapted-<YYYYmmdd-HHMMSS>.safetensors`` (not created here)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path.home() / ".napari-ctxseg" / "models" / f"adapted-{stamp}.safetensors"


def adapt_settings(
    seconds: float = ADAPT_SECONDS,
    *,
    seed: int = 0,
    device: str = "auto",
    threads: int = 0,
    target_diameter: float | None = None,
) -> FinetuneSettings:
    """The fine-tune settings of an adaptation with a time budget of ``seconds``.

    Batch 4 of 128 x 128 crops, learning rate 3e-4, no held-out validation (there is one image), at most
    ``ADAPT_MAX_STEPS`` steps; ``target_diameter``: the objects' size at the model's scale (pixels).
    """
    if not (np.isfinite(seconds) and 0 < seconds <= 24 * 3600):
        raise ConfigError(f"adaptation time must be between 0 and 86400 seconds, got {seconds}")
    return FinetuneSettings(
        steps=ADAPT_MAX_STEPS,
        time_budget_min=seconds / 60.0,
        lr=3e-4,
        batch_size=4,
        crop_size=128,
        augment=True,
        val_fraction=0.0,
        seed=seed,
        device=device,
        threads=threads,
        target_diameter=target_diameter,
        scale_range=(0.75, 1.33),
    )


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def inference_diameter(
    context_labels: Sequence[np.ndarray], diameter: float | Literal["auto"] | None = "auto"
) -> float | None:
    """The objects' median diameter at the scale segmentation will use (None: no annotated object).

    ``diameter``: as the segmentation request's (``"auto"``: the context's own size decides, as
    ``diameter="auto"`` does at inference; a number: the image is rescaled so such objects become the
    model's size; ``None``: the image as it is).
    """
    from .auto_diameter import auto_scale, context_diameter
    from .request import diameter_scale

    measured = context_diameter(list(context_labels))
    if not measured > 0:
        return None
    scale = auto_scale(measured) if diameter == "auto" else diameter_scale(diameter)
    return measured * scale


def adapt_request(
    context_image: np.ndarray | Sequence[np.ndarray],
    context_labels: np.ndarray | Sequence[np.ndarray],
    context_region: np.ndarray | Sequence[np.ndarray | None] | None = None,
    *,
    checkpoint: str | os.PathLike = "default",
    seconds: float = ADAPT_SECONDS,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    device: str = "auto",
    diameter: float | Literal["auto"] | None = "auto",
) -> TrainRequest:
    """The fine-tune request of an adaptation (validated; nothing runs).

    Raises
    ------
    InputError
        A context whose labels do not match its image, or with no annotated object.
    ConfigError, CheckpointError
        Bad settings, or a checkpoint that cannot be fine-tuned.
    """
    images, labels = _as_list(context_image), _as_list(context_labels)
    regions = _as_list(context_region) if context_region is not None else [None] * len(images)
    if not images or not (len(images) == len(labels) == len(regions)):
        raise InputError(
            f"the context lists differ in length: {len(images)} images, {len(labels)} labels, "
            f"{len(regions)} regions"
        )
    for lab in labels:
        if not np.issubdtype(np.asarray(lab).dtype, np.integer):
            raise InputError(f"context labels must be integers, got dtype {np.asarray(lab).dtype}")
    masked = [
        np.asarray(lab) if reg is None else np.where(np.asarray(reg) != 0, lab, 0)
        for lab, reg in zip(labels, regions)
    ]
    target = inference_diameter(masked, diameter)
    if target is None:
        raise InputError("the context labels contain no annotated object to adapt to")
    settings = adapt_settings(seconds, seed=seed, device=device, target_diameter=target)
    pairs = [
        (im, lab, reg, f"context {i + 1}") for i, (im, lab, reg) in enumerate(zip(images, labels, regions))
    ]
    req = finetune_request_from_arrays(
        pairs,
        base=checkpoint,
        output=output or default_adapted_path(),
        settings=settings,
        provenance={"adapted_to_context": {"seconds": float(seconds), "diameter": diameter}},
    )
    config = replace(req.config, time_budget_s=float(seconds), warmup=ADAPT_WARMUP, ema_decay=ADAPT_EMA_DECAY)
    return replace(req, config=config)


def adapt_steps(
    req: TrainRequest, *, should_stop: Callable[[], bool] | None = None, threads: int = 0
) -> Generator[TrainProgress, None, FinetuneResult]:
    """Run an adaptation from :func:`adapt_request`, yielding progress after every step.

    The time budget is the request's; ``should_stop`` is polled between steps (Cancel). On a stop the
    weights learned so far are written (see :func:`~napari_ctxseg.services.finetune.run_finetune`).
    """
    budget = req.config.time_budget_s
    return (yield from run_finetune(req, time_budget_s=budget, should_stop=should_stop, threads=threads))


def adapt_to_context_steps(req: TrainRequest) -> Generator[SegmentProgress, None, FinetuneResult]:
    """Run an adaptation from :func:`adapt_request` as a stage of a segmentation; returns its result.

    Yields :class:`~napari_ctxseg.core.pipeline.SegmentProgress` of stage ``"adapt"``, by time within
    the budget. Closed (Cancel) before it ends, or ending before its first step, it leaves no partial
    copy behind; otherwise the result's ``path`` is the adapted copy (``req.output``).

    Raises
    ------
    ConfigError
        When the budget ended before the first step (nothing was learned).
    """
    seconds = max(1.0, float(req.config.time_budget_s or 0.0))
    path = Path(req.output)
    finished = False
    try:
        done = yield from relay(
            adapt_steps(req),
            lambda p: SegmentProgress(
                "adapt",
                int(min(p.elapsed_s, seconds)),
                int(seconds),
                f"adapting to the context: step {p.step}, loss {p.loss:.3f}",
            ),
        )
        _adapted_path(done)
        finished = True
    finally:
        if not finished:
            path.unlink(missing_ok=True)
    return done


def _adapted_path(result: FinetuneResult) -> Path:
    """The adapted copy of a finished adaptation; ``ConfigError`` if it ended before its first step."""
    if result.path is None:
        raise ConfigError("the adaptation ended before its first step; give it more time")
    return result.path


def adapt(
    context_image: np.ndarray | Sequence[np.ndarray],
    context_labels: np.ndarray | Sequence[np.ndarray],
    context_region: np.ndarray | Sequence[np.ndarray | None] | None = None,
    checkpoint: str | os.PathLike = "default",
    seconds: float = ADAPT_SECONDS,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    diameter: float | Literal["auto"] | None = "auto",
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> Path:
    """Fine-tune a copy of ``checkpoint`` on a context for ``seconds``; return the adapted checkpoint's path.

    Parameters
    ----------
    context_image, context_labels, context_region
        One annotated image (``(H, W)`` or ``(H, W, C)``; integer labels; optional region, non-zero where
        the annotation is complete), or lists of them.
    checkpoint
        ``"default"`` (the bundled model) or a ``.safetensors`` path to adapt.
    seconds
        Training time budget (setup, about 5-15 s on 2 CPU cores, comes on top).
    seed
        Seed of every random choice.
    output
        Where to write the adapted checkpoint (default: :func:`default_adapted_path`).
    device
        ``auto``/``cpu``/``cuda``/``mps``.
    diameter
        As the segmentation's ``diameter``: the scale the adapted model is trained at.
    on_progress
        Called with every :class:`~napari_ctxseg.core.train.trainer.TrainProgress`.

    Returns
    -------
    Path
        The adapted checkpoint (use it as ``segment(..., checkpoint=path)`` with the same context).

    Examples
    --------
    One annotated image of four round cells as the context (a real adaptation takes the default 90 s;
    one second keeps the example quick):

    >>> import tempfile
    >>> import numpy as np
    >>> from napari_ctxseg import adapt, segment
    >>> yy, xx = np.mgrid[:128, :128]
    >>> ref_labels = np.zeros((128, 128), np.uint16)
    >>> for i, (cy, cx) in enumerate([(30, 30), (30, 90), (90, 60), (95, 105)], 1):
    ...     ref_labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = i
    >>> noise = np.random.default_rng(0).normal(0, 0.05, (128, 128))
    >>> ref_image = (ref_labels > 0) + noise.astype(np.float32)
    >>> image = ref_image[::-1].copy()  # another image of the same kind
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = adapt(ref_image, ref_labels, seconds=1, output=f"{tmp.name}/adapted.safetensors", device="cpu")
    >>> labels = segment(image, checkpoint=str(path), context_image=ref_image,
    ...                  context_labels=ref_labels).labels
    >>> int(labels.max())
    4
    >>> tmp.cleanup()
    """
    req = adapt_request(
        context_image,
        context_labels,
        context_region,
        checkpoint=checkpoint,
        seconds=seconds,
        seed=seed,
        output=output,
        device=device,
        diameter=diameter,
    )
    return _adapted_path(run_to_end(adapt_steps(req), on_progress))
