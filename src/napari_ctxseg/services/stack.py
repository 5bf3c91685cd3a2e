"""Stacks and time series: 2D segmentation plane by plane, with labels stitched across planes.

An array with more than two non-channel axes is treated as a stack of 2D images along its leading axes
(Z for a z-stack, T for a time series, or both): each 2D plane is segmented on its own
(:func:`~napari_ctxseg.services.segment.segment_steps`), then labels of consecutive planes are linked when
their IoU is at least ``stitch_threshold`` (as cellpose's ``stitch_threshold``), so one object keeps one
label through the stack. ``stitch_threshold=0`` keeps independent labels per plane (offset so they stay
unique). A run returns a :class:`StackResult`: the per-plane results (flows kept for re-thresholding)
and the stitched labels; the command line and the Segment widget both use it.

Intensities: ``normalize="plane"`` maps each plane's own 1st and 99.8th percentiles to 0 and 1 (as a 2D
image); ``"stack"`` uses the percentiles of the whole stack for every plane (as cellpose's ``norm3D``), so
that planes above and below the objects stay dim instead of having their blur and noise stretched into
false objects. In both modes a blank (constant) plane is segmented as empty instead of being refused as
a constant image would be (:func:`plane_request`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from ..core.errors import ConfigError, InputError
from ..core.flows.labels import FlowParams, labels_from_flows
from ..core.metrics.overlap import iou_matrix
from ..core.preprocess.normalize import intensity_limits
from .auto_diameter import resolve_diameter
from .progress import relay
from .request import MODEL_DIAMETER
from .segment import SegmentProgress, SegmentRequest, SegmentResult, segment_steps

__all__ = [
    "StackProgress",
    "StackResult",
    "is_rgb",
    "plane_request",
    "probe_plane",
    "rethreshold_stack_steps",
    "segment_stack_steps",
    "stack_features",
    "stack_intensity_limits",
    "stack_request",
    "stack_steps",
    "stitch_labels",
    "stitch_planes",
]

Normalize = Literal["plane", "stack"]
#: planes read to measure a stack's intensity percentiles (evenly spaced; all of them when fewer)
LIMIT_PLANES = 16


def is_rgb(shape: tuple[int, ...]) -> bool:
    """Whether the last axis holds colour channels (napari's rule: 3 or 4 channels last)."""
    return len(shape) >= 3 and shape[-1] in (3, 4)


def stitch_labels(planes: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Relabel (Z, H, W) per-plane labels so overlapping objects of consecutive planes share a label.

    Each object of plane z takes the label of its best-IoU object in plane z - 1 if that IoU is at least
    ``threshold`` and the match is mutual-best; otherwise it gets a new label.
    """
    out = np.zeros(planes.shape, dtype=np.uint32)
    next_label = 1
    for z, plane in enumerate(planes):
        plane = plane.astype(np.int64)
        n = int(plane.max())
        lut = np.zeros(n + 1, dtype=np.uint32)
        if z > 0 and threshold > 0 and n:
            iou, ids, prev_ids = iou_matrix(plane, out[z - 1].astype(np.int64))
            if iou.size:
                best = iou.argmax(axis=1)
                back = iou.argmax(axis=0)
                for i, label in enumerate(ids):
                    j = best[i]
                    if iou[i, j] >= threshold and back[j] == i:
                        lut[label] = prev_ids[j]
        for i in range(1, n + 1):
            if lut[i] == 0 and (plane == i).any():
                lut[i] = next_label
                next_label += 1
            elif lut[i] >= next_label:
                next_label = int(lut[i]) + 1
        out[z] = lut[plane]
    return out


def _plane(image: Any, index: tuple[int, ...]) -> np.ndarray:
    """One plane of ``image`` as numpy (the image itself for ``()``); lazy arrays read only that plane."""
    return np.asarray(image[index] if index else image)


def _constant(a: np.ndarray) -> bool:
    return bool(a.size) and a.min() == a.max()


def stack_intensity_limits(image: Any, planes: Sequence[tuple[int, ...]]) -> tuple[float, float]:
    """Intensity percentiles of a stack, pooled over up to ``LIMIT_PLANES`` evenly spaced ``planes``.

    ``image`` may be lazy (dask, zarr): only the sampled planes are read.
    """
    pick = np.unique(np.linspace(0, len(planes) - 1, min(len(planes), LIMIT_PLANES)).round().astype(int))
    sample = np.stack([_plane(image, planes[i]) for i in pick])
    if _constant(sample) and len(pick) < len(planes):
        sample = np.stack([_plane(image, p) for p in planes])  # all sampled were blank
    if _constant(sample):
        raise _constant_stack(image)
    return intensity_limits(sample)


def _constant_stack(image: Any) -> InputError:
    shape = tuple(image.shape)
    return InputError(f"every plane of the stack is constant (shape {shape}); nothing to segment")


def plane_request(req: SegmentRequest) -> SegmentRequest:
    """``req`` for one plane of a stack: a constant plane (blank, padding) is segmented as empty.

    A single constant image is refused (it has no contrast to normalise), but a blank plane must not
    stop a whole stack: with ``normalize="plane"`` its one value is mapped to 0 (so the model sees an
    empty field and finds nothing). Planes with NaN or infinite values are still refused.
    """
    if req.intensity_limits is not None:
        return req
    plane = np.asarray(req.image)
    if _constant(plane) and math.isfinite(lo := float(plane.min())):
        return replace(req, intensity_limits=(lo, lo + 1.0))
    return req


def probe_plane(image: Any, planes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """The plane that measures a stack's object size: the middle one, or the nearest that is not constant."""
    mid = len(planes) // 2
    order = sorted(range(len(planes)), key=lambda i: (abs(i - mid), i))
    for i in order:
        plane = _plane(image, planes[i])
        if plane.size and not _constant(plane):
            return plane
    raise _constant_stack(image)


def stack_request(
    base: SegmentRequest, image: Any, planes: Sequence[tuple[int, ...]], normalize: str, loaded: Any = None
) -> Generator[SegmentProgress, None, SegmentRequest]:
    """``base`` made one for every plane of a stack (apply :func:`plane_request` per plane).

    With ``normalize="stack"`` it carries the stack's intensity limits, and ``diameter="auto"`` is
    resolved once, on :func:`probe_plane` (yielding that pass's progress), so every plane shares a
    scale. A 2D image (``planes == [()]``) is one plane: its own percentiles are the stack's, and a
    constant one is refused as ``segment()`` refuses it.
    """
    if normalize not in ("plane", "stack"):
        raise ConfigError(f"normalize must be 'plane' or 'stack', got {normalize!r}")
    lead = list(planes) != [()]
    if normalize == "stack" and lead and base.intensity_limits is None:
        base = replace(base, intensity_limits=stack_intensity_limits(image, planes))
    if base.diameter != "auto":
        return base
    probe = replace(base, image=probe_plane(image, planes) if lead else _plane(image, ()))
    return replace(base, diameter=(yield from resolve_diameter(probe, loaded=loaded)))


@dataclass(frozen=True)
class StackProgress:
    """Progress of plane ``plane`` (0-based) of ``planes``, with the 2D run's own step."""

    plane: int
    planes: int
    step: SegmentProgress

    @property
    def stage(self) -> str:
        """The 2D run's stage (see :class:`~napari_ctxseg.services.segment.SegmentProgress`)."""
        return self.step.stage

    @property
    def done(self) -> int:
        """Steps done over the whole stack (each plane counts the steps of the current one)."""
        return self.plane * self.step.total + self.step.done

    @property
    def total(self) -> int:
        """Steps of the whole stack."""
        return self.planes * self.step.total

    @property
    def fraction(self) -> float:
        """How much of the stack is done, from 0 to 1 (a size measure counts as the plane's start)."""
        if self.step.stage == "size":  # the short measuring pass of diameter "auto" precedes the plane's run
            return self.plane / self.planes
        return (self.plane + self.step.done / max(self.step.total, 1)) / self.planes

    @property
    def message(self) -> str:
        """The 2D run's message, prefixed with the plane for a stack."""
        prefix = f"plane {self.plane + 1}/{self.planes}: " if self.planes > 1 else ""
        return prefix + self.step.message


@dataclass
class StackResult:
    """The per-plane results of a stack (in C order of the leading axes) and its stitched labels."""

    results: list[SegmentResult]
    leading_shape: tuple[int, ...]  # () for one 2D image
    stitch_threshold: float
    labels: np.ndarray  # (*leading_shape, H, W) uint32, unique over the stack

    @classmethod
    def of(
        cls, results: list[SegmentResult], leading_shape: tuple[int, ...], stitch_threshold: float
    ) -> StackResult:
        """A result whose labels are the per-plane labels stitched (:func:`stitch_planes`)."""
        planes = np.stack([r.labels for r in results]).astype(np.uint32)
        if leading_shape:
            labels = planes.reshape((*leading_shape, *planes.shape[1:]))
            labels = stitch_planes(labels, len(leading_shape), stitch_threshold)
        else:
            labels = planes[0]
        return cls(results, tuple(leading_shape), stitch_threshold, labels)

    @property
    def planes(self) -> list[tuple[int, ...]]:
        """The leading index of every plane, in the order of ``results`` (``[()]`` for one 2D image)."""
        return list(np.ndindex(*self.leading_shape))


def _at_plane(plane: int, planes: int) -> Callable[[SegmentProgress], StackProgress]:
    return lambda step: StackProgress(plane, planes, step)


def _leading(shape: tuple[int, ...], rgb: bool | None) -> tuple[int, ...]:
    rgb = is_rgb(shape) if rgb is None else rgb
    return shape[: len(shape) - (3 if rgb else 2)]


def stack_steps(
    base: SegmentRequest,
    image: Any,
    *,
    normalize: Normalize = "plane",
    stitch_threshold: float = 0.25,
    loaded: Any = None,
    rgb: bool | None = None,
) -> Generator[StackProgress, None, StackResult]:
    """Segment every 2D plane of ``image`` with the settings of ``base`` (its ``image`` is ignored).

    ``image`` may be any array-like with ``shape`` and numpy indexing (numpy, dask, zarr): one plane is
    read into memory at a time. ``rgb`` says whether the last axis holds colours (None: napari's rule,
    :func:`is_rgb`). A stack is calibrated once on its first plane when ``base.calibrate`` asks, its
    intensity limits and ``diameter="auto"`` are resolved once (:func:`stack_request`), then every plane
    is segmented (:func:`plane_request`). A 2D image is one plane, segmented as ``segment_steps`` does.
    """
    lead = _leading(tuple(image.shape), rgb)
    planes = list(np.ndindex(*lead))  # [()] for one 2D image
    n = len(planes)
    if not lead:
        run = segment_steps(replace(base, image=_plane(image, ())), loaded=loaded)
        result = yield from relay(run, _at_plane(0, 1))
        return StackResult.of([result], (), stitch_threshold)
    calibration = None
    if base.calibrate and base.context_image is not None:
        from .calibrate import calibrate_steps

        probe = replace(base, image=_plane(image, planes[0]))
        cal = yield from relay(calibrate_steps(probe, loaded=loaded), _at_plane(0, 1))
        calibration = cal.summary()
        base = replace(base, diameter=cal.diameter, flow=cal.flow)
    base = replace(base, calibrate=False)
    base = yield from relay(stack_request(base, image, planes, normalize, loaded), _at_plane(0, n))
    base = replace(base, diameter=base.diameter or MODEL_DIAMETER)  # None: the model's scale
    results = []
    for i, index in enumerate(planes):
        req = plane_request(replace(base, image=_plane(image, index)))
        result = yield from relay(segment_steps(req, loaded=loaded), _at_plane(i, n))
        if calibration is not None:
            result.metadata["calibration"] = calibration
        results.append(result)
    return StackResult.of(results, lead, stitch_threshold)


def segment_stack_steps(
    image: Any,
    *,
    stitch_threshold: float = 0.25,
    normalize: Normalize = "plane",
    loaded: Any = None,
    **options: Any,
) -> Generator[StackProgress, None, StackResult]:
    """Segment every 2D plane of ``image`` (leading axes = stack/time; RGB last axis kept), yielding progress.

    Returns a :class:`StackResult` whose labels have the image's spatial shape (channels dropped); with
    more than one leading axis (e.g. T, Z) stitching runs along the last leading axis within each of the
    others. ``normalize``: "plane" (default; each plane's own percentiles, right for time series whose
    brightness drifts) or "stack" (the stack's percentiles for every plane, better for z-stacks; see the
    module notes). ``options`` are :class:`~napari_ctxseg.services.segment.SegmentRequest` fields.
    See :func:`stack_steps`.
    """
    base = SegmentRequest(image=np.zeros((8, 8)), **options)
    return (
        yield from stack_steps(
            base, image, normalize=normalize, stitch_threshold=stitch_threshold, loaded=loaded
        )
    )


def stack_features(stack: StackResult, image: Any) -> dict[str, np.ndarray]:
    """Per-object measurements of a stack (``index`` = the object's label in ``stack.labels``).

    Every plane of ``image`` is measured in 2D; an object stitched through several planes gets one row:
    ``area`` sums its pixels over the planes, ``intensity_max`` and the bounding box take the extremes,
    the plane columns its first plane, ``n_planes`` counts its planes, and every other column (centroid,
    mean intensity, shape, agreement, flow error) is the area-weighted mean over its planes.
    """
    from .measure import measure_objects, merge_rows, plane_rows

    tables, starts, offset = [], [], 0
    for idx, r in zip(stack.planes, stack.results):
        t = measure_objects(r.labels, _plane(image, idx), sample_labels=r.sample_labels, flows=r.flows)
        t["label"] = t["label"] + offset
        tables.append((idx, t))
        starts.append(offset)
        offset += int(r.labels.max())
    table = plane_rows(tables)
    if not (stack.stitch_threshold > 0 and stack.leading_shape):
        return table
    # each per-plane (offset) label belongs to one stitched object
    lut = np.zeros(offset + 1, np.int64)
    for idx, r, start in zip(stack.planes, stack.results, starts):
        inside = r.labels > 0
        lut[r.labels[inside].astype(np.int64) + start] = stack.labels[idx][inside]
    return merge_rows(table, lut[table["index"]])


def rethreshold_stack_steps(
    stack: StackResult, image: Any, flow: FlowParams
) -> Generator[int, None, StackResult]:
    """Labels from the cached model-scale flows with new flow settings (no network); yields planes done."""
    out = []
    for i, (idx, r) in enumerate(zip(stack.planes, stack.results)):
        labels, samples = labels_from_flows(
            r.flows_model_scale, flow, out_shape=r.labels.shape, image=_plane(image, idx)
        )
        meta = {**r.metadata, "flow_params": asdict(flow)}
        out.append(replace(r, labels=labels, sample_labels=samples, metadata=meta))
        yield i + 1
    return StackResult.of(out, stack.leading_shape, stack.stitch_threshold)


def stitch_planes(labels: np.ndarray, leading: int, threshold: float = 0.25) -> np.ndarray:
    """Labels unique over a stack of per-plane labels ``(*lead, H, W)``, stitched along the last leading axis.

    Parameters
    ----------
    labels
        Per-plane instance labels (each plane may reuse the same numbers).
    leading
        Number of leading (stack / time) axes, >= 1.
    threshold
        Objects of consecutive planes along the last leading axis share a label when their IoU is at least
        this and the match is mutual-best (:func:`stitch_labels`); 0: every plane's objects get new labels.
        Along the other leading axes (e.g. T of a T, Z stack) nothing is linked.

    Returns
    -------
    np.ndarray
        uint32 labels of the same shape; no label is used in two groups.
    """
    shape = labels.shape
    groups = np.asarray(labels).reshape((-1, shape[leading - 1], *shape[leading:]))
    out, offset = [], 0
    for g in groups:
        g = stitch_labels(g, threshold) if threshold > 0 else _offset(g)
        out.append(np.where(g > 0, g + np.uint32(offset), 0).astype(np.uint32))
        offset += int(g.max())
    return np.stack(out).reshape(shape)


def _offset(planes: np.ndarray) -> np.ndarray:
    out = planes.astype(np.uint32).copy()
    offset = 0
    for z in range(len(out)):
        m = out[z] > 0
        out[z][m] += offset
        offset = int(out[z].max()) if m.any() else offset
    return out
