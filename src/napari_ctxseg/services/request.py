"""A segmentation request: what decides a run, its checks, and its way through the core pipeline.

:class:`SegmentRequest` holds everything that decides a segmentation of one 2D image (so a run can be
reproduced from it); :func:`validate_request` and :func:`validate_context` check it before any work,
with messages that say what was received and what was expected. :func:`request_steps` sends a checked
request through :func:`~napari_ctxseg.core.pipeline.segment_image` and :func:`request_result` turns
what comes back into a :class:`SegmentResult` with the run's metadata.

Scale: the bundled model was trained on nuclei of median diameter ``MODEL_DIAMETER`` (20 px) with
random rescaling by 0.5-2x. ``diameter`` (the typical object diameter in pixels of *this* image) rescales
the image by ``MODEL_DIAMETER / diameter`` before the model sees it; ``None`` keeps the model's scale and
``"auto"`` measures it first (:mod:`~napari_ctxseg.services.auto_diameter`).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from ..core.diffusion.denoisers import TTA_FLIPS
from ..core.diffusion.solvers import ONE_STEP, Solver, check_solver
from ..core.errors import ConfigError, InputError
from ..core.flows.labels import FlowParams
from ..core.pipeline import ImageSegmentation, Reference, SamplerSettings, SegmentProgress, segment_image
from .limits import check_run_size, check_segment_settings
from .models import LoadedModel

__all__ = [
    "MODEL_DIAMETER",
    "SegmentRequest",
    "SegmentResult",
    "as_image",
    "diameter_scale",
    "references",
    "request_result",
    "request_steps",
    "validate_context",
    "validate_request",
]

MODEL_DIAMETER = 20.0


@dataclass
class SegmentRequest:
    """Everything that decides a segmentation (so a run can be reproduced from it)."""

    image: np.ndarray
    checkpoint: str | None = "default"
    device: str = "auto"
    steps: int = 1
    solver: Solver = "edf"
    discretization: str = "edm"
    num_samples: int = 1
    seed: int = 0
    # object diameter in pixels; "auto" measures it (see the module notes); None: the model's scale
    diameter: float | Literal["auto"] | None = "auto"
    # one annotated reference, or a list of them (each may have its own size; features are averaged)
    context_image: np.ndarray | list[np.ndarray] | None = None
    context_labels: np.ndarray | list[np.ndarray] | None = None
    context_region: np.ndarray | list[np.ndarray | None] | None = None
    flow: FlowParams = field(default_factory=FlowParams)
    # test-time augmentation: average the denoiser over the image and its flips (TTA_FLIPS), 4x the calls
    tta: bool = False
    # intensities mapped to 0 and 1 (None: the image's own 1st and 99.8th percentiles); the planes of a
    # stack can share the stack's (services.stack), so that dim planes stay dim
    intensity_limits: tuple[float, float] | None = None
    tile_size: int = 1024
    tile_overlap: int = 128
    # False: return flows only (labels all zero), e.g. when 2D flows are combined into 3D ones
    follow_flows: bool = True
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # > 0: first fine-tune a copy of the model on the context for this many seconds (services.adapt)
    adapt_seconds: float = 0.0
    # with a context: pick the diameter, flow threshold and min size that score best on the context itself
    # (services.calibrate); the result's metadata then holds the context self-score
    calibrate: bool = False
    # the channel to segment and an optional nuclear channel along ``channel_axis`` of ``image`` (None: the
    # image as it is, grey or RGB); see core.channels for how they become the model's 3 input channels.
    # Context images are given with their channels already chosen (core.channels.select_channels)
    channel: int | None = None
    nuclear_channel: int | None = None
    channel_axis: int = -1


@dataclass
class SegmentResult:
    """Labels, flows per sample and what was used to make them."""

    labels: np.ndarray  # (H, W) uint32, consecutive
    flows: np.ndarray  # (N, 2, H, W) float32
    sample_labels: np.ndarray  # (N, H, W) uint32 (the fused labels come from the mean flow)
    disagreement: np.ndarray  # (H, W) float32: std of the flow over samples (0 for one sample)
    scale: float
    metadata: dict[str, Any]
    flows_model_scale: np.ndarray  # (N, 2, h, w) flows at the model's scale (for re-thresholding)


# ---- checks ---------------------------------------------------------------------------------------------


def as_image(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as one 2D plane (H, W) or (H, W, C <= 3) (RGBA drops alpha), else an InputError."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]  # RGBA -> RGB
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] > 3):
        raise InputError(
            f"{what} must be 2D: (H, W) grey or (H, W, C) with C <= 3 channels last; got shape "
            f"{image.shape} (stacks are segmented slice by slice by the stack service; for more channels, "
            f"choose the channel to segment)"
        )
    if min(image.shape[:2]) < 8:
        raise InputError(f"{what} is too small ({image.shape[:2]}); expected at least 8 x 8 pixels")
    return image


def validate_request(req: SegmentRequest) -> None:
    """Check a request's settings and context before any work (the image is checked as it is prepared)."""
    if req.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {req.steps}")
    if req.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {req.num_samples}")
    if not isinstance(req.tta, (bool, np.bool_)):
        raise ConfigError(f"tta must be True or False, got {req.tta!r}")
    check_solver(req.solver, one_step=False)
    if req.diameter is not None and req.diameter != "auto":
        if isinstance(req.diameter, str) or not (req.diameter > 0 and math.isfinite(req.diameter)):
            raise ConfigError(f"diameter must be a positive number of pixels or 'auto', got {req.diameter!r}")
    check_segment_settings(
        num_samples=req.num_samples,
        diameter=req.diameter,
        tile_size=req.tile_size,
        tile_overlap=req.tile_overlap,
        seed=req.seed,
    )
    if (req.context_image is None) != (req.context_labels is None):
        raise InputError("a context needs both an image and its labels")
    if req.nuclear_channel is not None and req.channel is None:
        raise ConfigError("a nuclear channel needs a channel to segment (channel=...)")
    if not (math.isfinite(req.adapt_seconds) and 0 <= req.adapt_seconds <= 86400):
        raise ConfigError(f"adapt_seconds must be between 0 and 86400, got {req.adapt_seconds}")
    if req.adapt_seconds and req.context_image is None:
        raise InputError("adapting to a context needs a context: an image and its labels")
    if req.calibrate and req.context_image is None:
        raise InputError("calibrating on the context needs a context: an image and its labels")
    if req.context_image is not None:
        for image, labels, region in references(req):
            validate_context(image, labels, region)


def references(req: SegmentRequest) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """The context as a list of (image, labels, region) references."""
    if req.context_image is None:
        return []
    if isinstance(req.context_image, list | tuple):
        images, labels = list(req.context_image), list(req.context_labels)  # type: ignore[arg-type]
        regions = list(req.context_region) if req.context_region is not None else [None] * len(images)
        if not (len(images) == len(labels) == len(regions)) or not images:
            raise InputError(
                f"the context lists differ in length: {len(images)} images, {len(labels)} labels, "
                f"{len(regions)} regions"
            )
        return list(zip(images, labels, regions))
    return [(req.context_image, req.context_labels, req.context_region)]  # type: ignore[list-item]


def validate_context(
    image: np.ndarray,
    labels: np.ndarray,
    region: np.ndarray | None = None,
    *,
    names: tuple[str, str] = ("context image", "context labels"),
) -> None:
    """Check a context (image, labels[, region]) before any work; ``names`` name them in the messages.

    Raises
    ------
    InputError
        A multi-plane image, labels that do not cover the image pixel for pixel, non-integer labels, a
        region of another shape or an empty one, or no annotated object (inside the region).
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise InputError(f"{names[0]!r} must be one 2D plane (H, W) or (H, W, C); got shape {image.shape}")
    if labels.shape != image.shape[:2]:
        raise InputError(
            f"{names[1]!r} has shape {labels.shape} but {names[0]!r} has {image.shape[:2]}: "
            f"the context labels must cover the context image pixel for pixel"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        nan = " with NaN values" if np.issubdtype(labels.dtype, np.inexact) and np.isnan(labels).any() else ""
        raise InputError(
            f"{names[1]!r} must hold integer instance labels, got dtype {labels.dtype}{nan} (save the "
            f"labels as integers: 0 background, 1, 2, ... one per object)"
        )
    if region is not None:
        region = np.asarray(region)
        if np.issubdtype(region.dtype, np.inexact) and np.isnan(region).any():
            raise InputError("the context region holds NaN values; expected a mask (non-zero: complete)")
        region = region.astype(bool)
        if region.shape != labels.shape:
            raise InputError(f"the context region has shape {region.shape}; expected {labels.shape}")
        if not region.any():
            raise InputError("the context region is empty: mark where the context annotation is complete")
    if not (labels[region] if region is not None else labels).any():
        where = " inside the region" if region is not None else ""
        raise InputError(f"{names[1]!r} has no annotated object{where}")


def diameter_scale(diameter: float | None) -> float:
    """The rescale factor of a concrete ``diameter`` (pixels; None: the model's scale, 1.0).

    Examples
    --------
    >>> diameter_scale(40.0), diameter_scale(None)
    (0.5, 1.0)
    """
    return 1.0 if diameter is None else MODEL_DIAMETER / float(diameter)


# ---- the run --------------------------------------------------------------------------------------------


def request_steps(
    req: SegmentRequest, loaded: LoadedModel, image: np.ndarray
) -> Generator[SegmentProgress, None, tuple[ImageSegmentation, float]]:
    """Send ``req`` (for its checked plane ``image``, at a concrete diameter) through the core pipeline.

    Returns what :func:`~napari_ctxseg.core.pipeline.segment_image` made and the scale it ran at.
    """
    if req.diameter == "auto":
        raise ConfigError("the request's diameter must be resolved before it runs")
    scale = diameter_scale(req.diameter)
    views = len(TTA_FLIPS) if req.tta else 1
    check_run_size(image.shape[:2], scale, num_samples=req.num_samples, views=views)
    # the request's fields of the same names
    sampler = SamplerSettings(**{f.name: getattr(req, f.name) for f in fields(SamplerSettings)})
    refs = [Reference(as_image(i, "context image"), lab, reg) for i, lab, reg in references(req)]
    out = yield from segment_image(
        loaded.model,
        loaded.sigma_data,
        image,
        scale=scale,
        sampler=sampler,
        references=refs,
        flow=req.flow if req.follow_flows else None,
        intensity_limits=req.intensity_limits,
        device=loaded.device,
    )
    return out, scale


def request_result(
    req: SegmentRequest, loaded: LoadedModel, out: ImageSegmentation, scale: float, measured: float | None
) -> SegmentResult:
    """The :class:`SegmentResult` of a run, with its metadata (``measured``: the size ``"auto"`` found)."""
    meta = {
        "checkpoint": loaded.name,
        "checkpoint_sha256": loaded.info.sha256,
        "model_kind": loaded.info.kind,
        "seed": int(req.seed),
        "steps": req.steps,
        "solver": ONE_STEP if req.steps == 1 else req.solver,
        "discretization": req.discretization,
        "num_samples": req.num_samples,
        "tta": bool(req.tta),
        "intensity_limits": None if req.intensity_limits is None else list(req.intensity_limits),
        "diameter": "auto" if measured is not None else req.diameter,
        "measured_diameter": measured,
        "scale": scale,
        "device": str(loaded.device),
        "tiles": out.tiles,
        "flow_params": asdict(req.flow),
        "context": None if req.context_image is None else context_digest(req),
        "channels": None,
    }
    return SegmentResult(
        out.labels, out.flows, out.sample_labels, out.disagreement, scale, meta, out.flows_model_scale
    )


def context_digest(req: SegmentRequest) -> str:
    """A short digest of the context's arrays (the metadata names the context without holding it)."""
    import hashlib

    h = hashlib.sha256()
    for a in (a for ref in references(req) for a in ref):
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]
