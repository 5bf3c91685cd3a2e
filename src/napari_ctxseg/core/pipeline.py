"""The segmentation of one 2D image, as stages: the one pipeline that the use cases share.

:func:`segment_image` reads top to bottom:

1. **preprocess**: intensities normalised, channels to the model's three, channels first
   (:func:`~napari_ctxseg.core.preprocess.normalize.model_input`);
2. **scale**: the image resized by ``scale`` (objects to the size the model was trained on) and padded
   to the network's stride;
3. **tiles**: overlapping tiles of at most ``tile_size`` pixels
   (:func:`~napari_ctxseg.core.diffusion.tiling.plan_tiles`);
4. **denoiser views**: per tile, the EDM denoiser conditioned on the tile and the context's features,
   averaged over flipped views with ``tta`` (:mod:`~napari_ctxseg.core.diffusion.denoisers`);
5. **sample**: one denoiser call at ``sigma_max`` for one step (tiles streamed), else the sampler
   integrates the probability-flow ODE over the blended tiles
   (:func:`~napari_ctxseg.core.diffusion.sampling.sample_steps`);
6. **follow flows** and 7. **labels**: at the model's scale, then resized back and cleaned up
   (:func:`~napari_ctxseg.core.flows.labels.labels_from_flows`).

It takes plain values (a model, numpy arrays, settings) and is a generator of :class:`SegmentProgress`
that returns an :class:`ImageSegmentation`; closing it between steps stops the work. Validation,
checkpoints, the automatic diameter and stacks belong to the services that call it.

Layouts: the image is numpy (H, W) or (H, W, C) with C <= 3, channels last; flows are returned
channel-first ``(N, 2, H, W)`` (samples, (dy, dx)); inside, tensors are NCHW.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion.denoisers import TTA_FLIPS, StreamingBlend, TiledDenoiser, ViewDenoiser
from .diffusion.sampling import num_model_calls, sample_steps
from .diffusion.solvers import ONE_STEP, Solver
from .diffusion.tiling import pad_to_multiple, plan_tiles
from .flows.from_masks import mask_to_flow
from .flows.labels import FlowParams, labels_from_flows, resize_labels
from .nn.models import CtxSegP, PContext, SegP
from .preprocess.normalize import model_input

__all__ = [
    "ImageSegmentation",
    "Reference",
    "SamplerSettings",
    "SegmentProgress",
    "encode_contexts",
    "sample_flows",
    "scaled_size",
    "segment_image",
]


@dataclass
class SegmentProgress:
    """Where a segmentation is: ``stage``, and ``done`` of ``total`` within the stage's pass.

    ``stage`` is "size" (the measuring pass of ``diameter="auto"``), "adapt", "encode", "denoise" or
    "labels"; ``done``/``total`` count model calls or steps.
    """

    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class SamplerSettings:
    """How the flows are sampled: steps, solver, samples, seed, test-time flips, noise range and tiles."""

    steps: int = 1
    solver: Solver = "edf"
    discretization: str = "edm"
    num_samples: int = 1
    seed: int = 0
    # average the denoiser over the image and its flips (TTA_FLIPS): 4x the network calls
    tta: bool = False
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    tile_size: int = 1024
    tile_overlap: int = 128


@dataclass(frozen=True)
class Reference:
    """One annotated reference of a context: image (H, W[, C]), labels (H, W), region (H, W) or None."""

    image: np.ndarray
    labels: np.ndarray
    region: np.ndarray | None = None


@dataclass
class ImageSegmentation:
    """What :func:`segment_image` makes of one image."""

    labels: np.ndarray  # (H, W) uint32, consecutive: the labels of the mean flow
    sample_labels: np.ndarray  # (N, H, W) uint32, one per sample
    flows: np.ndarray  # (N, 2, H, W) float32, at the image's size
    flows_model_scale: np.ndarray  # (N, 2, h, w) float32, at the model's scale (for re-thresholding)
    disagreement: np.ndarray  # (H, W) float32: std of the flow over samples (0 for one sample)
    tiles: int


DEFAULT_SAMPLER = SamplerSettings()
DEFAULT_FLOW = FlowParams()


def scaled_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """The size ``(h, w)`` of an image of ``shape`` at ``scale`` (at least 8 x 8).

    Examples
    --------
    >>> scaled_size((100, 30), 0.5)
    (50, 15)
    """
    return max(8, int(round(shape[0] * scale))), max(8, int(round(shape[1] * scale)))


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    down = size[0] < x.shape[-2]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


def encode_contexts(
    model: CtxSegP, references: Sequence[Reference], scale: float, device: torch.device
) -> list[PContext]:
    """Encode every reference at the model's scale: image, the flow of its labels, and its region."""
    stride = model.config.stride
    contexts = []
    for ref in references:
        img = torch.from_numpy(model_input(ref.image))[None]
        labels = np.asarray(ref.labels).astype(np.int64)
        region = np.ones(labels.shape, bool) if ref.region is None else np.asarray(ref.region).astype(bool)
        size = scaled_size(labels.shape, scale)
        img = _resize(img, size, "bilinear")
        lab_t = resize_labels(labels, size)
        reg_t = _resize(torch.from_numpy(region)[None, None].float(), size, "nearest")[0, 0] > 0.5
        flow = torch.from_numpy(mask_to_flow(lab_t).astype(np.float32))[None]
        flow = torch.where(reg_t[None, None], flow, torch.zeros_like(flow))
        img, _ = pad_to_multiple(img, stride)
        flow, _ = pad_to_multiple(flow, stride, mode="constant")
        reg_p, _ = pad_to_multiple(reg_t[None, None].float(), stride, mode="constant")
        contexts.append(model.encode_context(img.to(device), flow.to(device), (reg_p[:, 0] > 0.5).to(device)))
    return contexts


def sample_flows(
    model: SegP,
    sigma_data: float,
    x: torch.Tensor,
    *,
    scale: float,
    sampler: SamplerSettings,
    references: Sequence[Reference] = (),
    device: torch.device | str = "cpu",
) -> Generator[SegmentProgress, None, tuple[torch.Tensor, int, int]]:
    """The flows ``(N, 2, h, w)`` at the model's scale of the normalised image ``x`` (1, 3, H, W).

    Stages 2-5 of the module notes. Returns the flows (float32, CPU), the number of tiles and the
    progress total. What the network needs (the rescaled and padded image, the noise, each tile's
    features) lives only here, so that it is freed before flow following.
    """
    device = torch.device(device)
    stride = model.config.stride
    x = _resize(x, scaled_size((x.shape[-2], x.shape[-1]), scale), "bilinear")  # 2. scale
    xp, (h, w) = pad_to_multiple(x, stride, min_size=stride)
    tile = max(stride, sampler.tile_size // stride * stride)  # 3. tiles
    overlap = min(sampler.tile_overlap // stride * stride, tile // 2)
    padded = (xp.shape[-2], xp.shape[-1])
    tiles = plan_tiles(padded, tile, overlap)
    one_step = sampler.steps == 1
    calls = num_model_calls(ONE_STEP if one_step else sampler.solver, sampler.steps)
    total = len(tiles) if one_step else len(tiles) + calls
    views = TTA_FLIPS if sampler.tta else TTA_FLIPS[:1]  # 4. denoiser views
    final: torch.Tensor | None = None
    with torch.inference_mode():
        contexts = (
            encode_contexts(model, references, scale, device)
            if references and isinstance(model, CtxSegP)
            else []
        )
        gen = torch.Generator(device=device).manual_seed(int(sampler.seed))
        shape = (2, *xp.shape[-2:])
        if one_step:  # 5. sample: one step streams the tiles (encode, denoise at sigma_max, blend)
            z = torch.randn((sampler.num_samples, *shape), generator=gen, device=gen.device)
            z = z * sampler.sigma_max
            blended = StreamingBlend(z.shape, padded, overlap)
            for i, t in enumerate(tiles):
                den = ViewDenoiser(model, sigma_data, xp[(..., *t.slices)].to(device), contexts, views)
                blended.add(t, den(z[(..., *t.slices)].to(device), sampler.sigma_max).float().cpu())
                yield SegmentProgress("denoise", i + 1, total, f"tile {i + 1}/{len(tiles)}")
            final = blended.result()
        else:  # 5. sample: the solver integrates over the blended tiles
            denoisers = []
            for i, t in enumerate(tiles):
                image_t = xp[(..., *t.slices)].to(device)
                denoisers.append(ViewDenoiser(model, sigma_data, image_t, contexts, views))
                yield SegmentProgress("encode", i + 1, total, f"encoding tile {i + 1}/{len(tiles)}")
            steps = sample_steps(
                TiledDenoiser(tiles, denoisers, padded, overlap),
                shape,
                num_samples=sampler.num_samples,
                num_steps=sampler.steps,
                solver=sampler.solver,
                discretization=sampler.discretization,
                sigma_min=sampler.sigma_min,
                sigma_max=sampler.sigma_max,
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


def segment_image(
    model: SegP,
    sigma_data: float,
    image: np.ndarray,
    *,
    scale: float = 1.0,
    sampler: SamplerSettings = DEFAULT_SAMPLER,
    references: Sequence[Reference] = (),
    flow: FlowParams | None = DEFAULT_FLOW,
    intensity_limits: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
) -> Generator[SegmentProgress, None, ImageSegmentation]:
    """Segment one 2D image: the stages of the module notes, yielding progress.

    Parameters
    ----------
    model, sigma_data
        A P model (``seg-p`` or ``ctxseg-p``) in eval mode on ``device``, and its EDM ``sigma_data``.
    image
        (H, W) or (H, W, C) with C <= 3, channels last.
    scale
        The resize factor that brings the image's objects to the model's scale.
    sampler
        Steps, solver, samples, seed, flips and tiles.
    references
        The context (a ``ctxseg-p`` model only): its features are averaged over the references.
    flow
        The flow-following settings; None returns flows only (labels all zero).
    intensity_limits
        Intensities mapped to 0 and 1 (None: the image's own percentiles).
    device
        Where the network runs.

    Examples
    --------
    >>> from importlib import resources
    >>> from napari_ctxseg.core.nn.load import load_checkpoint
    >>> from napari_ctxseg._sample_data import read_sample
    >>> model, info = load_checkpoint(resources.files("napari_ctxseg") / "models" / "default.safetensors")
    >>> image = read_sample("nuclei")[:128, :128]
    >>> steps = segment_image(model, info.sigma_data, image)
    >>> while True:
    ...     try:
    ...         progress = next(steps)
    ...     except StopIteration as done:
    ...         result = done.value
    ...         break
    >>> result.labels.shape, result.flows.shape
    ((128, 128), (1, 2, 128, 128))
    >>> bool(result.labels.max() > 5)
    True
    """
    h0, w0 = image.shape[:2]
    x = torch.from_numpy(model_input(image, limits=intensity_limits))[None]  # 1. preprocess (1, 3, H, W)
    flows_s, n_tiles, total = yield from sample_flows(  # 2-5. scale, tiles, denoiser views, sample
        model, sigma_data, x, scale=scale, sampler=sampler, references=references, device=device
    )
    del x  # the network's inputs and intermediates are freed before flow following
    if flow is not None:  # 6-7. follow flows, labels
        yield SegmentProgress("labels", total, total, "following flows")
        labels, sample_labels = labels_from_flows(flows_s.numpy(), flow, out_shape=(h0, w0), image=image)
    else:
        labels = np.zeros((h0, w0), np.uint32)
        sample_labels = np.zeros((len(flows_s), h0, w0), np.uint32)
    flows_full = _resize(flows_s, (h0, w0), "bilinear").numpy()
    disagreement = (
        flows_full.std(axis=0).mean(axis=0) if len(flows_full) > 1 else np.zeros((h0, w0), np.float32)
    ).astype(np.float32)
    return ImageSegmentation(
        labels,
        sample_labels,
        flows_full.astype(np.float32),  # a copy: at scale 1 flows_full is a view of flows_s
        flows_s.numpy(),
        disagreement,
        n_tiles,
    )
