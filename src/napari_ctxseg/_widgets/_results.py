"""Segmentation runs over the planes of a snapshot, re-thresholding, and results as napari layer data.

Pure functions and generators (no Qt): the Segment widget runs the generators on a napari worker.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..core.errors import CtxSegError, InputError
from ..services.progress import relay
from ..services.segment import FlowParams, SegmentProgress, SegmentResult
from ..services.stack import StackProgress, StackResult
from ._layer_io import ContextData, LayerSnapshot, RunSettings

__all__ = [
    "PlanesProgress",
    "PlanesResult",
    "VolumeResult",
    "flow_rgb",
    "plane_labels",
    "provenance",
    "result_layer_data",
    "rethreshold_job",
    "rethreshold_steps",
    "segment_job",
    "segment_planes",
    "stack_features",
    "volume_job",
]

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]
R = TypeVar("R")


#: Progress of a run over the planes of a snapshot (the stack service's).
PlanesProgress = StackProgress


@dataclass
class PlanesResult:
    """Per-plane results of one run, kept for re-thresholding the cached flows."""

    source: LayerSnapshot
    results: list[SegmentResult]
    flow: FlowParams
    field_of_view: tuple[int, ...] | None = None
    # stacks: objects of consecutive planes with at least this IoU share a label (0: labels per plane)
    stitch_threshold: float = 0.0
    # the stitched stack of ``results``, made once (not an init field: a ``replace`` starts without it)
    stack_result: StackResult | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def stack(self) -> StackResult:
        """The per-plane results with their stitched labels (a stack service result)."""
        if self.stack_result is None:
            self.stack_result = StackResult.of(self.results, self.source.leading_shape, self.stitch_threshold)
        return self.stack_result


def segment_planes(
    snap: LayerSnapshot,
    settings: RunSettings,
    context: ContextData | None = None,
    *,
    field_of_view: tuple[int, ...] | None = None,
) -> Generator[PlanesProgress, None, PlanesResult]:
    """Segment every plane of ``snap`` with one loaded model, yielding progress per sampler step and plane.

    With ``settings.adapt_seconds`` and a context, a copy of the model is first adapted to the context
    (:func:`adapt_to_context`); the planes are then segmented by the stack service
    (:func:`~napari_ctxseg.services.stack.stack_steps`). Closing the generator between yields stops the
    work. ``RuntimeError`` (e.g. out of memory) is re-raised as :class:`CtxSegError`, because a Qt worker
    swallows ``RuntimeError``.
    """
    from ..services.models import load_model
    from ..services.stack import stack_steps

    try:
        adapted_from = None
        if settings.adapt_seconds and context is not None:
            adapted = yield from adapt_to_context(settings, context)
            adapted_from, settings = settings.checkpoint, replace(settings, checkpoint=str(adapted))
        loaded = load_model(settings.checkpoint, device=settings.device)
        base = settings.request(snap.data[snap.planes()[0]], context)
        base = replace(base, calibrate=bool(settings.calibrate and context is not None))
        stack = yield from stack_steps(
            base,
            snap.data,
            normalize=settings.normalize,
            stitch_threshold=settings.stitch_threshold,
            loaded=loaded,
            rgb=snap.rgb,
        )
    except RuntimeError as exc:
        raise CtxSegError(f"{type(exc).__name__}: {exc}") from exc
    if adapted_from is not None:
        record = {"base": adapted_from, "seconds": settings.adapt_seconds, "path": settings.checkpoint}
        for res in stack.results:
            res.metadata["adapted"] = dict(record)
    flow = FlowParams(**stack.results[0].metadata["flow_params"])  # the settings' flow, or the calibrated
    planes = PlanesResult(snap, stack.results, flow, field_of_view, settings.stitch_threshold)
    planes.stack_result = stack  # stitched by the service already
    return planes


def adapt_to_context(
    settings: RunSettings, context: ContextData, output: Path | None = None
) -> Generator[PlanesProgress, None, Path]:
    """Adapt a copy of ``settings.checkpoint`` to ``context`` for ``settings.adapt_seconds``; its path.

    The copy is written to ``output`` (default: ``~/.napari-ctxseg/models/adapted-<time>.safetensors``) and
    listed among the recent checkpoints, so it can segment other images (or a batch) later. Progress is
    by time. Closed (Cancel) before it ends, the partial copy is deleted
    (:func:`~napari_ctxseg.services.adapt.adapt_to_context_steps`).
    """
    from ..services.adapt import adapt_request, adapt_to_context_steps, default_adapted_path
    from ..services.recent import add_recent_checkpoint

    req = adapt_request(
        context.image,
        context.labels,
        context.region,
        checkpoint=settings.checkpoint,
        seconds=float(settings.adapt_seconds),
        seed=settings.seed,
        output=output or default_adapted_path(),
        device=settings.device,
        diameter=settings.diameter or "auto",
    )
    done = yield from _relay(adapt_to_context_steps(req), 0, 1)
    assert done.path is not None  # adapt_to_context_steps raises when no copy was written
    add_recent_checkpoint(done.path)
    return done.path


def _relay(
    gen: Generator[SegmentProgress, None, R], plane: int, planes: int
) -> Generator[PlanesProgress, None, R]:
    return (yield from relay(gen, lambda step: PlanesProgress(plane, planes, step)))


def rethreshold_steps(res: PlanesResult, flow: FlowParams) -> Generator[int, None, PlanesResult]:
    """Labels from the cached model-scale flows with new flow settings (no network); yields planes done."""
    from ..services.stack import rethreshold_stack_steps

    stack = yield from rethreshold_stack_steps(res.stack, res.source.data, flow)
    new = replace(res, results=stack.results, flow=flow)
    new.stack_result = stack
    return new


def plane_labels(res: PlanesResult) -> np.ndarray:
    """Labels ``(*leading, H, W)`` uint32, unique over the stack (stitched: :class:`StackResult`)."""
    return res.stack.labels


def stack_features(res: PlanesResult) -> dict[str, np.ndarray]:
    """Per-object measurements (``index`` = the label in :func:`plane_labels`).

    :func:`~napari_ctxseg.services.stack.stack_features` says what is measured.
    """
    from ..services.stack import stack_features as measure_stack_objects

    return measure_stack_objects(res.stack, res.source.data)


def provenance(res: PlanesResult) -> dict[str, Any]:
    """Metadata of the labels layer: the service's metadata of the first plane plus what this run covered."""
    from .. import __version__

    meta = dict(res.results[0].metadata)
    meta.update(
        napari_ctxseg_version=__version__,
        source_layer=res.source.name,
        planes=len(res.results),
        field_of_view=res.field_of_view,
        flow_params=asdict(res.flow),
    )
    if res.source.channels is not None:
        meta["channels"] = res.source.channels
    return meta


def flow_rgb(flows: np.ndarray) -> np.ndarray:
    """Colour (H, W, 3) uint8 of the mean flow (N, 2, H, W): hue = direction, brightness = magnitude."""
    from skimage.color import hsv2rgb

    dy, dx = np.asarray(flows, np.float32).mean(axis=0)
    mag = np.hypot(dy, dx)
    hue = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi)
    val = np.clip(mag / max(float(np.percentile(mag, 99)), 1e-6), 0, 1)
    return (hsv2rgb(np.stack([hue, np.ones_like(hue), val], axis=-1)) * 255).astype(np.uint8)


def result_layer_data(
    res: PlanesResult, *, flow: bool = False, disagreement: bool = False
) -> list[LayerDataTuple]:
    """Layer data tuples for the new labels layer and the optional flow and disagreement images.

    Every layer takes the source's scale and translate (for a field of view: of the crop) and is named
    ``"<source> ctxseg <what>"``. The labels layer carries the per-object measurements as ``features``
    (``index`` = label) and the run's provenance as ``metadata["ctxseg"]``.
    """
    src = res.source
    place = {"scale": src.scale, "translate": src.translate}
    labels = plane_labels(res)
    out: list[LayerDataTuple] = [
        (
            labels,
            {
                "name": f"{src.name} ctxseg labels",
                "features": stack_features(res),
                "metadata": {"ctxseg": provenance(res)},
                **place,
            },
            "labels",
        )
    ]
    shape = (*src.leading_shape, *src.plane_shape)
    if flow:
        rgb = np.stack([flow_rgb(r.flows) for r in res.results]).reshape((*shape, 3))
        meta = {"name": f"{src.name} ctxseg flow", "rgb": True, "visible": False, **place}
        out.append((rgb, meta, "image"))
    if disagreement:
        dis = np.stack([r.disagreement for r in res.results]).reshape(shape)
        out.append(
            (
                dis,
                {"name": f"{src.name} ctxseg disagreement", "colormap": "magma", "visible": False, **place},
                "image",
            )
        )
    return out


def segment_job(
    snap: LayerSnapshot,
    settings: RunSettings,
    context: ContextData | None,
    field_of_view: tuple[int, ...] | None,
    flow: bool,
    disagreement: bool,
) -> Generator[PlanesProgress, None, tuple[PlanesResult, list[LayerDataTuple]]]:
    """Worker body of a run: segment every plane, then build the layer data (off the GUI thread)."""
    res = yield from segment_planes(snap, settings, context, field_of_view=field_of_view)
    return res, result_layer_data(res, flow=flow, disagreement=disagreement)


def rethreshold_job(res: PlanesResult, flow: FlowParams) -> Generator[tuple[int, int], None, tuple[Any, ...]]:
    """Worker body of a re-threshold: yields ``(planes done, planes)``; returns result, labels, features."""
    n = len(res.results)
    gen = rethreshold_steps(res, flow)
    while True:
        try:
            done = next(gen)
        except StopIteration as stop:
            new = stop.value
            labels = plane_labels(new)
            return new, labels, stack_features(new)
        yield done, n


@dataclass
class VolumeResult:
    """A 3D run (``RunSettings.volume_3d``): there are no per-plane flows to re-threshold."""

    source: LayerSnapshot
    labels: np.ndarray
    metadata: dict[str, Any]


def volume_job(
    snap: LayerSnapshot, settings: RunSettings, field_of_view: tuple[int, ...] | None = None
) -> Generator[PlanesProgress, None, tuple[VolumeResult, list[LayerDataTuple]]]:
    """Worker body of a 3D run: segment a grey (Z, Y, X) snapshot in 3D, then build its labels layer.

    Runs :func:`~napari_ctxseg.services.stack.segment_volume_steps` and the 3D measurements off the GUI
    thread; contexts, flow images and re-thresholding belong to slice-by-slice runs.

    Raises
    ------
    InputError
        For a 2D, RGB or more than 3D layer.
    """
    from .. import __version__
    from ..services.measure import measure_volume
    from ..services.models import load_model
    from ..services.volume import segment_volume_steps

    if snap.rgb or snap.data.ndim != 3:
        kind = "an RGB" if snap.rgb else f"a {snap.data.ndim}D"
        raise InputError(f"3D mode needs a grey (Z, Y, X) stack; {snap.name!r} is {kind} layer")
    try:
        loaded = load_model(settings.checkpoint, device=settings.device)
        req = settings.request(snap.data[0])
        options = {k: getattr(req, k) for k in ("steps", "solver", "num_samples", "tta", "seed", "diameter")}
        labels, _ = yield from _relay(
            segment_volume_steps(
                snap.data, normalize=settings.normalize, loaded=loaded, flow=settings.flow, **options
            ),
            0,
            1,
        )
    except RuntimeError as exc:
        raise CtxSegError(f"{type(exc).__name__}: {exc}") from exc
    features = measure_volume(labels, snap.data)
    meta = {
        "mode": "3d",
        "checkpoint": loaded.name,
        "checkpoint_sha256": loaded.info.sha256,
        "device": str(loaded.device),
        "normalize": settings.normalize,
        "flow_params": asdict(settings.flow),
        **options,
        "napari_ctxseg_version": __version__,
        "source_layer": snap.name,
        "planes": int(snap.data.shape[0]),
        "field_of_view": field_of_view,
    }
    layer = (
        labels,
        {
            "name": f"{snap.name} ctxseg labels",
            "features": {"index": features["label"], **features},
            "metadata": {"ctxseg": meta},
            "scale": snap.scale,
            "translate": snap.translate,
        },
        "labels",
    )
    return VolumeResult(snap, labels, meta), [layer]
