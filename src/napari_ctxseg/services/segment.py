"""Segment one 2D image, optionally in context: the use case behind the widget, the CLI and the API.

:func:`segment_steps` is a generator of :class:`SegmentProgress` that returns a :class:`SegmentResult`;
closing it between steps cancels the work (nothing is returned, nothing is left half-written).
:func:`segment` runs it to the end.

Layouts at this boundary are numpy, channels-last: image (H, W) or (H, W, C) with C <= 3 (RGBA drops
alpha); labels (H, W); returned flows (N, 2, H, W) channel-first (dy, dx). Inside, tensors are NCHW.

Scale: the bundled model was trained on nuclei of median diameter ``MODEL_DIAMETER`` (20 px) with
random rescaling by 0.5-2x. ``diameter`` (the typical object diameter in pixels of *this* image) rescales
the image by ``MODEL_DIAMETER / diameter`` before the model sees it; flow following runs at the model's
scale and labels are resized back with nearest neighbours. ``diameter="auto"`` (the default) measures the
objects first: the median diameter of the context's labels when there is a context, else of a one-step
pass over (the centre of) the image, checked at half scale for objects too large for the model's scale;
see :func:`auto_scale`. ``None`` keeps the model's scale.

Test-time flips: ``tta=True`` averages the denoiser over the image and its three flips (``TTA_FLIPS``) at
every sampler step; 4x the network calls, and in multi-step sampling 4x the image features held per tile.
Each tile is flipped on its own, so for an image of several tiles the average is over flipped tiles (the
result is exactly flip-equivariant for a single tile only).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..core.diffusion.edm import EDMDenoiser
from ..core.diffusion.sampling import num_model_calls, sample_steps
from ..core.diffusion.solvers import SOLVERS, Solver, check_solver
from ..core.diffusion.tiling import Tile, blend_weight, pad_to_multiple, plan_tiles
from ..core.errors import ConfigError, InputError
from ..core.flows.following import flow_to_mask
from ..core.flows.from_masks import flip_flow, flip_spatial, mask_to_flow
from ..core.flows.postprocess import (
    median_diameter,
    relabel_sequential,
    remove_border_instances,
    remove_low_contrast_instances,
    remove_small_instances,
)
from ..core.nn.models import CtxSegP, ImageFeatures, PContext, SegP
from ..core.preprocess.channels import channel_record, select_channels
from ..core.preprocess.normalize import model_input
from .limits import check_run_size, check_segment_settings
from .models import LoadedModel, load_model
from .progress import relay, run_to_end

__all__ = [
    "MODEL_DIAMETER",
    "SOLVERS",
    "FlowParams",
    "SegmentProgress",
    "SegmentRequest",
    "SegmentResult",
    "Solver",
    "auto_scale",
    "labels_from_flows",
    "resolve_diameter",
    "segment",
    "segment_steps",
    "strong_flow_mask",
    "validate_context",
]

MODEL_DIAMETER = 20.0
#: ``diameter="auto"``: rescale so that the measured median object diameter becomes AUTO_TARGET_DIAMETER
#: pixels, by a factor within AUTO_SCALE_RANGE, and only when that factor (or its inverse) is at least
#: AUTO_MIN_RESCALE: the model was trained with 0.5-2x rescaling, so near its scale it is left alone. Chosen
#: on DSB *training* images with the bundled model (``benchmarks/tune_auto_diameter.py``, native scale, and
#: ``benchmarks/eval_scale.py``, nuclei resampled 0.5-4x; docs/model_card.md).
AUTO_TARGET_DIAMETER = 20.0
AUTO_SCALE_RANGE = (0.1, 2.0)
AUTO_MIN_RESCALE = 1.5
#: Objects much larger than the model's scale come out of a pass at that scale as ~20 px fragments, so a
#: second pass at half scale looks for them: its size wins when it is at least AUTO_COARSE_MIN pixels and
#: AUTO_COARSE_RATIO times the first. A downscale is then re-measured at the scale it asks for, at most
#: AUTO_REFINE_PASSES times, until two measures agree within AUTO_REFINE_TOLERANCE (a ratio); the half-scale
#: size is only kept when a downscale is confirmed (tiny objects merge at half scale).
AUTO_COARSE_MIN = 30.0
AUTO_COARSE_RATIO = 1.5
AUTO_REFINE_PASSES = 2
AUTO_REFINE_TOLERANCE = 1.25
AUTO_PROBE_SIZE = 1024
#: ``tta=True``: the views whose flows are averaged, as (flip_y, flip_x); the first is the image itself
TTA_FLIPS = ((False, False), (True, False), (False, True), (True, True))


@dataclass(frozen=True)
class FlowParams:
    """Flow-following settings (applied to cached flows without re-running the network).

    ``min_size`` is in pixels of the input image; ``max_flow_err`` > 0 drops objects whose flow disagrees
    with the flow of their own shape (mean squared error above the threshold); it is off by default because,
    with the bundled model, it removes more true objects than false ones at every threshold tried
    (docs/model_card.md). ``flow_threshold``: pixels
    whose predicted flow is shorter than this are background (they neither move nor get a label).
    Ideal flows have length 1 inside objects and 0 outside; the original follows every pixel (its
    ``scripts/eval.py`` passes a ``threshold`` that its ``flow_to_mask`` does not accept), which lets
    weak background flows gather into false objects. Holes of the strong-flow mask (object centres, where
    directions cancel, and small gaps enclosed by touching objects) are followed and labelled. 0 reproduces
    the original. The default 0.4 was chosen on DSB *training* images with the bundled model (pooled
    AP@0.5 on the first 30: 0.16 at 0, 0.38 at 0.1, 0.51 at 0.2, 0.57 at 0.3, 0.60 at 0.4, 0.59 at 0.5).
    """

    flow_threshold: float = 0.4
    niter: int = 200
    step_size: float = 0.5
    min_seed_cnts: int = 30
    expand_min_cnts: int = 2
    max_flow_err: float = 0.0
    min_size: int = 15
    remove_border: bool = False
    # objects fainter than this many noise sigmas against their surroundings are dropped (0: off);
    # see core.postprocess.remove_low_contrast_instances and docs/model_card.md
    min_contrast: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flow_threshold", "step_size", "max_flow_err", "min_contrast"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and float(value) >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.step_size > 0:
            raise ConfigError(f"step_size must be > 0, got {self.step_size!r}")
        for name in ("niter", "min_seed_cnts", "expand_min_cnts", "min_size"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and int(value) >= 0):
                raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")

    def following(self) -> dict[str, Any]:
        """The settings of :func:`~napari_ctxseg.core.flows.following.flow_to_mask` among these."""
        return {
            "niter": self.niter,
            "step_size": self.step_size,
            "min_seed_cnts": self.min_seed_cnts,
            "expand_min_cnts": self.expand_min_cnts,
            "max_flow_err": self.max_flow_err,
        }


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
class SegmentProgress:
    """Where a segmentation is: ``stage``, and ``done`` of ``total`` within the stage's pass.

    ``stage`` is "size" (the measuring pass of ``diameter="auto"``), "encode", "denoise" or "labels";
    ``done``/``total`` count model calls or steps.
    """

    stage: str
    done: int
    total: int
    message: str = ""


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


# ---- validation ------------------------------------------------------------------------------------------


def _as_image(image: np.ndarray, what: str) -> np.ndarray:
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


def _validate(req: SegmentRequest) -> None:
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
        for image, labels, region in _references(req):
            validate_context(image, labels, region)


def _references(req: SegmentRequest) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
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


# ---- helpers ---------------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    down = size[0] < x.shape[-2]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


def _scaled_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(8, int(round(shape[0] * scale))), max(8, int(round(shape[1] * scale)))


def _prepare_context(
    model: CtxSegP, req: SegmentRequest, scale: float, stride: int, device: torch.device
) -> list[PContext]:
    """Encode every reference of the context at the model's scale (once per run)."""
    contexts = []
    for image, labels, region in _references(req):
        img = torch.from_numpy(model_input(_as_image(image, "context image")))[None]
        labels = np.asarray(labels).astype(np.int64)
        region = np.ones(labels.shape, bool) if region is None else np.asarray(region).astype(bool)
        size = _scaled_size(labels.shape, scale)
        img = _resize(img, size, "bilinear")
        lab_t = _resize(torch.from_numpy(labels)[None, None].double(), size, "nearest")[0, 0].long().numpy()
        reg_t = _resize(torch.from_numpy(region)[None, None].float(), size, "nearest")[0, 0] > 0.5
        flow = torch.from_numpy(mask_to_flow(lab_t).astype(np.float32))[None]
        flow = torch.where(reg_t[None, None], flow, torch.zeros_like(flow))
        img, _ = pad_to_multiple(img, stride)
        flow, _ = pad_to_multiple(flow, stride, mode="constant")
        reg_p, _ = pad_to_multiple(reg_t[None, None].float(), stride, mode="constant")
        contexts.append(model.encode_context(img.to(device), flow.to(device), (reg_p[:, 0] > 0.5).to(device)))
    return contexts


def _features(model: SegP, image: torch.Tensor, contexts: list[PContext]) -> ImageFeatures:
    """Image features with the context features averaged over all references (as the original's set_image)."""
    if len(contexts) <= 1:
        return model.prepare(image, contexts[0] if contexts else None)
    per_ref = [model.prepare(image, c) for c in contexts]
    feats = [f.ref_features for f in per_ref if f.ref_features is not None]  # all: each has a context
    n = sum(c.num_refs for c in contexts)
    mean = []
    for k in range(len(feats[0])):
        total = feats[0][k] * contexts[0].num_refs
        for f, c in zip(feats[1:], contexts[1:]):
            total = total + f[k] * c.num_refs
        mean.append(total / n)
    return ImageFeatures(per_ref[0].x_skips, mean)


class _ViewDenoiser:
    """D(x, sigma) of one tile, averaged over flipped views: the mean over g of g(D(g(x) | g(image))).

    A flip g maps the image, the noisy flow x and the denoised flow alike (:func:`flip_flow` negates the
    flipped component); one view, the image itself, is the plain denoiser. Contexts are not flipped: the
    model was trained with references flipped independently of their target.
    """

    def __init__(
        self,
        model: SegP,
        sigma_data: float,
        image: torch.Tensor,
        contexts: list[PContext],
        views: tuple[tuple[bool, bool], ...],
    ) -> None:
        self.views = views
        self.denoisers = [
            EDMDenoiser(lambda xi, c, f=f: model.predict(xi, c, f), sigma_data=sigma_data)
            for f in (_features(model, flip_spatial(image, *v), contexts) for v in views)
        ]

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        outs = [flip_flow(den(flip_flow(x, *v), sigma), *v) for v, den in zip(self.views, self.denoisers)]
        # one view is returned as it is, so that the plain path stays bit-identical to the denoiser
        return outs[0] if len(outs) == 1 else sum(outs[1:], outs[0]) / len(outs)


class _TiledDenoiser:
    """D(x, sigma) evaluated tile by tile (one :class:`_ViewDenoiser` each), blended with ramp weights."""

    def __init__(
        self, tiles: list[Tile], denoisers: list[_ViewDenoiser], shape: tuple[int, int], overlap: int
    ) -> None:
        self.tiles, self.denoisers, self.shape = tiles, denoisers, shape
        self.weights = [blend_weight(t, shape, overlap) for t in tiles]

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        if len(self.tiles) == 1:
            return self.denoisers[0](x, sigma)
        out = torch.zeros_like(x)
        norm = torch.zeros(self.shape, dtype=x.dtype, device=x.device)
        for tile, den, w in zip(self.tiles, self.denoisers, self.weights):
            w = w.to(x.device, x.dtype)
            out[(..., *tile.slices)] += den(x[(..., *tile.slices)], sigma) * w
            norm[tile.slices] += w
        return out / norm


class _StreamingBlend:
    """Accumulates weighted tile outputs (on the CPU) and normalises at the end."""

    def __init__(self, shape: tuple[int, ...], spatial: tuple[int, int], overlap: int) -> None:
        self.out = torch.zeros(shape)
        self.norm = torch.zeros(spatial)
        self.spatial, self.overlap = spatial, overlap

    def add(self, tile: Tile, value: torch.Tensor) -> None:
        w = blend_weight(tile, self.spatial, self.overlap)
        self.out[(..., *tile.slices)] += value * w
        self.norm[tile.slices] += w

    def result(self) -> torch.Tensor:
        return self.out / self.norm


# ---- the use case ----------------------------------------------------------------------------------------


def strong_flow_mask(flows: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground of flows ``(N, D, *spatial)``: where the flow is at least ``threshold`` long, holes filled.

    Object centres have short flows (directions cancel there): what strong flow encloses is kept, so
    centres (and small gaps enclosed by touching objects) are followed and labelled. Returns a bool
    array ``(N, *spatial)``; holes are filled in all spatial dimensions (3D for volumes).
    """
    from scipy.ndimage import binary_fill_holes

    strong = np.sqrt((np.asarray(flows, dtype=np.float32) ** 2).sum(axis=1)) >= threshold
    return np.stack([binary_fill_holes(m) for m in strong])


def labels_from_flows(
    flows: np.ndarray,
    params: FlowParams,
    *,
    out_shape: tuple[int, int] | None = None,
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels from flows (N, 2, h, w): (fused labels of the mean flow, labels per sample).

    Labels are computed at the flows' resolution, resized to ``out_shape`` with nearest neighbours and
    cleaned: small objects removed, objects fainter than ``params.min_contrast`` noise sigmas in
    ``image`` (the input image, of ``out_shape``; needed only then) removed, border objects optionally
    removed, relabelled 1..n.
    """
    if params.min_contrast > 0 and image is None:
        raise ConfigError("min_contrast needs the image the flows were predicted for")
    stack = np.concatenate([flows.mean(axis=0, keepdims=True), flows]) if len(flows) > 1 else flows
    stack = np.asarray(stack, dtype=np.float32)
    if params.flow_threshold > 0:
        foreground = strong_flow_mask(stack, params.flow_threshold)
        stack = stack * foreground[:, None]  # a new contiguous array: the input is never modified
    else:
        stack = np.ascontiguousarray(stack)
    raw = flow_to_mask(stack, **params.following())
    raw = np.asarray(raw).reshape(len(stack), *flows.shape[-2:])
    out = []
    for k, lab in enumerate(raw):
        lab = lab.astype(np.int64)
        if params.flow_threshold > 0:
            lab = lab * foreground[k]
        if out_shape is not None and lab.shape != tuple(out_shape):
            lab = (
                F.interpolate(
                    torch.from_numpy(lab)[None, None].double(), size=out_shape, mode="nearest-exact"
                )[0, 0]
                .long()
                .numpy()
            )
        lab = remove_small_instances(lab, params.min_size)
        if params.min_contrast > 0:
            lab = remove_low_contrast_instances(lab, np.asarray(image), params.min_contrast)
        if params.remove_border:
            lab = remove_border_instances(lab)
        out.append(relabel_sequential(lab).astype(np.uint32))
    return out[0], np.stack(out[1:] if len(flows) > 1 else out)


def _network_flows(
    req: SegmentRequest, loaded: LoadedModel, x: torch.Tensor, scale: float
) -> Generator[SegmentProgress, None, tuple[torch.Tensor, int, int]]:
    """The network's flows (N, 2, h, w) at the model's scale for the normalised image ``x`` (1, 3, H, W).

    Returns the flows (float32, CPU), the number of tiles and the progress total. What the network
    needs (the rescaled and padded image, the noise, each tile's features) lives only here, so that it
    is freed before flow following.
    """
    model, device = loaded.model, loaded.device
    stride = model.config.stride
    size = _scaled_size((x.shape[-2], x.shape[-1]), scale)
    x = _resize(x, size, "bilinear")
    xp, (h, w) = pad_to_multiple(x, stride, min_size=stride)
    tile = max(stride, req.tile_size // stride * stride)
    overlap = min(req.tile_overlap // stride * stride, tile // 2)
    padded = (xp.shape[-2], xp.shape[-1])
    tiles = plan_tiles(padded, tile, overlap)
    one_step = req.steps == 1
    calls = num_model_calls("one_step" if one_step else req.solver, req.steps)
    total = len(tiles) if one_step else len(tiles) + calls
    views = TTA_FLIPS if req.tta else TTA_FLIPS[:1]
    final: torch.Tensor | None = None
    with torch.inference_mode():
        contexts = (
            _prepare_context(model, req, scale, stride, device)
            if req.context_image is not None and isinstance(model, CtxSegP)  # checked above
            else []
        )
        gen = torch.Generator(device=device).manual_seed(int(req.seed))
        shape = (2, *xp.shape[-2:])
        if one_step:
            # stream the tiles: encode, denoise once at sigma_max, blend; memory is bounded by the tile
            z = torch.randn((req.num_samples, *shape), generator=gen, device=gen.device) * req.sigma_max
            blended = _StreamingBlend(z.shape, padded, overlap)
            for i, t in enumerate(tiles):
                den = _ViewDenoiser(
                    model, loaded.sigma_data, xp[(..., *t.slices)].to(device), contexts, views
                )
                blended.add(t, den(z[(..., *t.slices)].to(device), req.sigma_max).float().cpu())
                yield SegmentProgress("denoise", i + 1, total, f"tile {i + 1}/{len(tiles)}")
            final = blended.result()
        else:
            denoisers = []
            for i, t in enumerate(tiles):
                image_t = xp[(..., *t.slices)].to(device)
                denoisers.append(_ViewDenoiser(model, loaded.sigma_data, image_t, contexts, views))
                yield SegmentProgress("encode", i + 1, total, f"encoding tile {i + 1}/{len(tiles)}")
            denoiser = _TiledDenoiser(tiles, denoisers, padded, overlap)
            steps = sample_steps(
                denoiser,
                shape,
                num_samples=req.num_samples,
                num_steps=req.steps,
                solver=req.solver,
                discretization=req.discretization,
                sigma_min=req.sigma_min,
                sigma_max=req.sigma_max,
                generator=gen,
                device=device,
            )
            for st in steps:
                final = st.x
                yield SegmentProgress(
                    "denoise", len(tiles) + st.model_calls, total, f"sampler step {st.step}/{st.num_steps}"
                )
    assert final is not None  # every sampler yields at least one step
    return final[..., :h, :w].float().cpu(), len(tiles), total


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
    _validate(req)
    if req.channel is not None:
        return (yield from _segment_channels(req, loaded))
    if req.adapt_seconds:
        return (yield from _segment_adapted(req))
    image = _as_image(req.image, "image")
    x = torch.from_numpy(model_input(image, limits=req.intensity_limits))[None]  # (1, 3, H, W)
    loaded = loaded or load_model(req.checkpoint, device=req.device)
    model, device = loaded.model, loaded.device
    if req.context_image is not None and not isinstance(model, CtxSegP):
        raise ConfigError(
            f"{loaded.name} is a {loaded.info.kind} model without a context path; use a "
            f"ctxseg-p checkpoint for in-context segmentation"
        )
    if req.calibrate:
        return (yield from _segment_calibrated(req, loaded))
    measured = None
    if req.diameter == "auto":
        measured, probe = yield from _measure_diameter(req, loaded)
        diameter = _auto_diameter(measured)
        if probe is not None and diameter is None and req.steps == 1 and req.num_samples == 1 and not req.tta:
            probe.metadata.update(diameter="auto", measured_diameter=measured)
            return probe  # the measuring pass already is this request's result
        req = replace(req, diameter=diameter)
    scale = 1.0 if req.diameter is None else MODEL_DIAMETER / float(req.diameter)
    h0, w0 = image.shape[:2]
    check_run_size((h0, w0), scale, num_samples=req.num_samples, views=len(TTA_FLIPS) if req.tta else 1)
    flows_s, n_tiles, total = yield from _network_flows(req, loaded, x, scale)  # (N, 2, h, w)
    del x  # the network's inputs and intermediates are freed before flow following
    if req.follow_flows:
        yield SegmentProgress("labels", total, total, "following flows")
        labels, sample_labels = labels_from_flows(flows_s.numpy(), req.flow, out_shape=(h0, w0), image=image)
    else:
        labels = np.zeros((h0, w0), np.uint32)
        sample_labels = np.zeros((len(flows_s), h0, w0), np.uint32)
    flows_full = _resize(flows_s, (h0, w0), "bilinear").numpy()
    disagreement = (
        flows_full.std(axis=0).mean(axis=0) if len(flows_full) > 1 else np.zeros((h0, w0), np.float32)
    ).astype(np.float32)
    meta = {
        "checkpoint": loaded.name,
        "checkpoint_sha256": loaded.info.sha256,
        "model_kind": loaded.info.kind,
        "seed": int(req.seed),
        "steps": req.steps,
        "solver": "one_step" if req.steps == 1 else req.solver,
        "discretization": req.discretization,
        "num_samples": req.num_samples,
        "tta": bool(req.tta),
        "intensity_limits": None if req.intensity_limits is None else list(req.intensity_limits),
        "diameter": "auto" if measured is not None else req.diameter,
        "measured_diameter": measured,
        "scale": scale,
        "device": str(device),
        "tiles": n_tiles,
        "flow_params": asdict(req.flow),
        "context": None if req.context_image is None else _context_digest(req),
        "channels": None,
    }
    return SegmentResult(
        labels,
        flows_full.astype(np.float32),  # a copy: at scale 1 flows_full is a view of flows_s
        sample_labels,
        disagreement,
        scale,
        meta,
        flows_s.numpy(),
    )


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

    from .adapt import adapt_request, adapt_steps

    if req.context_image is None:
        raise InputError("adapting to a context needs a context: an image and its labels")
    images, labels, regions = zip(*_references(req))
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
        done = yield from relay(
            adapt_steps(areq),
            lambda p: SegmentProgress(
                "adapt", min(p.step, p.total), p.total, f"adapting to the context (loss {p.loss:.3f})"
            ),
        )
        if done.path is None:
            raise ConfigError("the adaptation ended before its first step; give it more time")
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


def auto_scale(diameter: float) -> float:
    """The rescale factor ``diameter="auto"`` applies to objects of this measured median diameter.

    ``AUTO_TARGET_DIAMETER / diameter`` clipped to ``AUTO_SCALE_RANGE``; 1.0 when nothing was found or
    when the factor is within ``AUTO_MIN_RESCALE`` of 1 (both ways: 20 px objects are left alone from
    ~13 to ~30 px).
    """
    if not diameter > 0:
        return 1.0
    lo, hi = AUTO_SCALE_RANGE
    scale = float(np.clip(AUTO_TARGET_DIAMETER / diameter, lo, hi))
    return scale if max(scale, 1.0 / scale) >= AUTO_MIN_RESCALE else 1.0


def resolve_diameter(
    req: SegmentRequest, *, loaded: LoadedModel | None = None
) -> Generator[SegmentProgress, None, float | None]:
    """The concrete ``diameter`` (None: the model's scale) that ``req.diameter`` stands for.

    For ``"auto"`` this measures the objects of ``req.image`` (or of its context), yielding progress;
    stacks call it once (on one plane) so that every plane is segmented at the same scale.
    """
    if req.diameter != "auto":
        return req.diameter
    loaded = loaded or load_model(req.checkpoint, device=req.device)
    measured, _ = yield from _measure_diameter(replace(req, follow_flows=True), loaded)
    return _auto_diameter(measured)


def _auto_diameter(measured: float) -> float | None:
    """The ``diameter`` that gives :func:`auto_scale` for a measured size (None: no rescaling)."""
    scale = auto_scale(measured)
    return None if scale == 1.0 else MODEL_DIAMETER / scale


def _measure_diameter(
    req: SegmentRequest, loaded: LoadedModel
) -> Generator[SegmentProgress, None, tuple[float, SegmentResult | None]]:
    """Median object diameter for ``diameter="auto"``, and the first probe's result if it can be reused.

    The probe's result is reused when it saw the whole image at the model's scale.

    With a context, the annotated objects (inside their regions) tell the size and nothing runs.
    Otherwise one-step passes over the central ``AUTO_PROBE_SIZE`` square measure it: at the model's
    scale, at half scale (objects too large for the model's scale fall apart into fragments there), and
    when the size asks for a downscale, again at that scale (see the ``AUTO_*`` constants).
    """
    refs = _references(req)
    if refs:
        return context_diameter([labels for _, labels, _ in refs], [region for _, _, region in refs]), None
    image = np.asarray(req.image)
    h, w = image.shape[:2]
    y0, x0 = max(0, (h - AUTO_PROBE_SIZE) // 2), max(0, (w - AUTO_PROBE_SIZE) // 2)
    crop = replace(req, image=image[y0 : y0 + AUTO_PROBE_SIZE, x0 : x0 + AUTO_PROBE_SIZE])

    def probe(diameter: float | None) -> Generator[SegmentProgress, None, tuple[float, SegmentResult]]:
        result: SegmentResult = yield from relay(
            segment_steps(replace(crop, diameter=diameter, steps=1, num_samples=1, tta=False), loaded=loaded),
            lambda p: SegmentProgress("size", p.done, p.total, "measuring object size"),
        )
        return median_diameter(result.labels), result

    at_model_scale, first = yield from probe(None)
    size = at_model_scale
    coarse, _ = yield from probe(2.0 * MODEL_DIAMETER)  # labels come back at the crop's scale
    if coarse >= AUTO_COARSE_MIN and coarse > AUTO_COARSE_RATIO * at_model_scale:
        size = coarse
    for _ in range(AUTO_REFINE_PASSES):
        if auto_scale(size) >= 1.0:
            break
        again, _ = yield from probe(size)
        if not again > 0:
            break
        agree = max(again, size) / min(again, size) <= AUTO_REFINE_TOLERANCE
        size = again
        if agree:
            break
    if size != at_model_scale and auto_scale(size) >= 1.0:
        # no downscale confirmed: small objects merged at half scale (e.g. ~5 px nuclei); the pass at the
        # model's scale measured them best
        size = at_model_scale
    return size, (first if crop.image.shape[:2] == (h, w) else None)


def context_diameter(labels: list[np.ndarray], regions: list[np.ndarray | None] | None = None) -> float:
    """Median object diameter over context label images (inside their regions); 0.0 without objects."""
    parts, offset = [], 0
    for k, lab in enumerate(labels):
        lab = np.asarray(lab).astype(np.int64)
        region = None if regions is None else regions[k]
        if region is not None:
            lab = np.where(np.asarray(region, bool), lab, 0)
        parts.append(np.where(lab > 0, lab + offset, 0).ravel())
        offset += int(lab.max()) + 1
    return median_diameter(np.concatenate(parts)) if parts else 0.0


def _context_digest(req: SegmentRequest) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in (a for ref in _references(req) for a in ref):
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def segment(image: np.ndarray, **kwargs: Any) -> SegmentResult:
    """Segment a 2D image; keyword arguments are :class:`SegmentRequest` fields.

    Examples
    --------
    >>> from napari_ctxseg import segment            # doctest: +SKIP
    >>> result = segment(image, num_samples=4)       # doctest: +SKIP
    >>> result.labels.max()                          # doctest: +SKIP
    """
    loaded = kwargs.pop("loaded", None)
    return run_to_end(segment_steps(SegmentRequest(image=image, **kwargs), loaded=loaded))
