"""Segment one 2D image, optionally in context: the use case behind the widget, the CLI and the API.

:func:`segment_steps` is a generator of :class:`SegmentProgress` that returns a :class:`SegmentResult`;
closing it between steps cancels the work (nothing is returned, nothing is left half-written).
:func:`segment` runs it to the end.

A request (:mod:`~napari_ctxseg.services.request`) is checked, its channels chosen, and, when it asks,
a copy of the model is adapted to the context (:mod:`~napari_ctxseg.services.adapt`) or its settings are
calibrated on the context (:mod:`~napari_ctxseg.services.calibrate`). ``diameter="auto"`` is measured
(:mod:`~napari_ctxseg.services.auto_diameter`); then the image goes through the core pipeline once
(:func:`~napari_ctxseg.core.pipeline.segment_image`: preprocess, scale, tiles, denoiser views, sample,
follow flows, labels).

Layouts at this boundary are numpy, channels-last: image (H, W) or (H, W, C) with C <= 3 (RGBA drops
alpha); labels (H, W); returned flows (N, 2, H, W) channel-first (dy, dx).

Test-time flips: ``tta=True`` averages the denoiser over the image and its three flips (``TTA_FLIPS``) at
every sampler step; 4x the network calls, and in multi-step sampling 4x the image features held per tile.
Each tile is flipped on its own, so for an image of several tiles the average is over flipped tiles (the
result is exactly flip-equivariant for a single tile only).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.diffusion.denoisers import TTA_FLIPS
from ..core.diffusion.solvers import SOLVERS, Solver
from ..core.errors import ConfigError
from ..core.flows.labels import FlowParams, labels_from_flows, strong_flow_mask
from ..core.nn.models import CtxSegP
from ..core.pipeline import SegmentProgress
from ..core.preprocess.channels import channel_record, select_channels
from .auto_diameter import auto_diameter, auto_scale, context_diameter, measure_diameter, resolve_diameter
from .models import LoadedModel, load_model
from .progress import run_to_end
from .request import (
    MODEL_DIAMETER,
    SegmentRequest,
    SegmentResult,
    as_image,
    references,
    request_result,
    request_steps,
    validate_context,
    validate_request,
)

__all__ = [
    "MODEL_DIAMETER",
    "SOLVERS",
    "TTA_FLIPS",
    "FlowParams",
    "SegmentProgress",
    "SegmentRequest",
    "SegmentResult",
    "Solver",
    "auto_scale",
    "context_diameter",
    "labels_from_flows",
    "resolve_diameter",
    "segment",
    "segment_steps",
    "strong_flow_mask",
    "validate_context",
]


def segment_steps(
    req: SegmentRequest, *, loaded: LoadedModel | None = None
) -> Generator[SegmentProgress, None, SegmentResult]:
    """Segment ``req.image``, yielding progress; returns a :class:`SegmentResult`.

    Raises
    ------
    InputError
        Bad image or context (shape, NaN, empty, constant, mismatched context).
    ConfigError, CheckpointError
        Bad settings or checkpoint.
    """
    validate_request(req)
    if req.channel is not None:
        return (yield from _segment_channels(req, loaded))
    if req.adapt_seconds:
        return (yield from _segment_adapted(req))
    image = as_image(req.image, "image")
    loaded = loaded or load_model(req.checkpoint, device=req.device)
    if req.context_image is not None and not isinstance(loaded.model, CtxSegP):
        raise ConfigError(
            f"{loaded.name} is a {loaded.info.kind} model without a context path; use a "
            f"ctxseg-p checkpoint for in-context segmentation"
        )
    if req.calibrate:
        return (yield from _segment_calibrated(req, loaded))
    measured = None
    if req.diameter == "auto":
        measured, probe = yield from measure_diameter(req, loaded)
        diameter = auto_diameter(measured)
        if probe is not None and diameter is None and req.steps == 1 and req.num_samples == 1 and not req.tta:
            probe.metadata.update(diameter="auto", measured_diameter=measured)
            return probe  # the measuring pass already is this request's result
        req = replace(req, diameter=diameter)
    out, scale = yield from request_steps(req, loaded, image)  # the core pipeline, once
    return request_result(req, loaded, out, scale, measured)


def _segment_channels(
    req: SegmentRequest, loaded: LoadedModel | None
) -> Generator[SegmentProgress, None, SegmentResult]:
    """Segment the chosen channel(s) of ``req.image`` (core.channels); the choice goes into the metadata."""
    assert req.channel is not None  # the caller checked
    image = select_channels(req.image, req.channel, req.nuclear_channel, channel_axis=req.channel_axis)
    result: SegmentResult = yield from segment_steps(
        replace(req, image=image, channel=None, nuclear_channel=None, channel_axis=-1), loaded=loaded
    )
    result.metadata["channels"] = channel_record(req.channel, req.nuclear_channel, req.channel_axis)
    return result


def _segment_calibrated(
    req: SegmentRequest, loaded: LoadedModel
) -> Generator[SegmentProgress, None, SegmentResult]:
    """Calibrate the diameter and flow settings on the context, then segment with them."""
    from .calibrate import calibrate_steps

    cal = yield from calibrate_steps(req, loaded=loaded)
    result: SegmentResult = yield from segment_steps(
        replace(req, calibrate=False, diameter=cal.diameter, flow=cal.flow), loaded=loaded
    )
    result.metadata["calibration"] = cal.summary()
    return result


def _segment_adapted(req: SegmentRequest) -> Generator[SegmentProgress, None, SegmentResult]:
    """Adapt a copy of the model to the context (``req.adapt_seconds``), then segment with it."""
    import tempfile

    from .adapt import adapt_request, adapt_to_context_steps

    images, labels, regions = zip(*references(req))
    with tempfile.TemporaryDirectory(prefix="ctxseg-adapted-") as tmp:
        areq = adapt_request(
            list(images),
            list(labels),
            list(regions),
            checkpoint=req.checkpoint or "default",
            seconds=req.adapt_seconds,
            seed=req.seed,
            output=Path(tmp) / "adapted.safetensors",
            device=req.device,
            diameter=req.diameter,
        )
        done = yield from adapt_to_context_steps(areq)
        adapted = load_model(str(done.path), device=req.device)
        result: SegmentResult = yield from segment_steps(
            replace(req, adapt_seconds=0.0, checkpoint=str(done.path)), loaded=adapted
        )
    result.metadata["adapted"] = {
        "base": req.checkpoint,
        "seconds": float(req.adapt_seconds),
        "steps": done.steps_done,
    }
    return result


def segment(image: np.ndarray, **kwargs: Any) -> SegmentResult:
    """Segment a 2D image; keyword arguments are :class:`SegmentRequest` fields.

    ``loaded`` (a :class:`~napari_ctxseg.services.models.LoadedModel`) reuses a model already in memory.

    Examples
    --------
    >>> from napari_ctxseg import segment
    >>> from napari_ctxseg._sample_data import read_sample
    >>> image = read_sample("nuclei")[:128, :128]
    >>> result = segment(image, diameter=None)
    >>> result.labels.shape, result.metadata["steps"]
    ((128, 128), 1)
    >>> bool(result.labels.max() > 5)
    True
    """
    loaded = kwargs.pop("loaded", None)
    return run_to_end(segment_steps(SegmentRequest(image=image, **kwargs), loaded=loaded))
