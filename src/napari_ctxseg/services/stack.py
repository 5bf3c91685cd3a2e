"""Stacks and time series: 2D segmentation slice by slice, with labels stitched across slices.

An array with more than two non-channel axes is treated as a stack of 2D images along its leading axes
(Z for a z-stack, T for a time series, or both): each 2D plane is segmented on its own, then labels of
consecutive planes are linked when their IoU is at least ``stitch_threshold`` (as cellpose's
``stitch_threshold``), so one object keeps one label through the stack. ``stitch_threshold=0`` keeps
independent labels per plane (offset so they stay unique).

Intensities: ``normalize="plane"`` maps each plane's own 1st and 99.8th percentiles to 0 and 1 (as a 2D
image); ``"stack"`` uses the percentiles of the whole stack for every plane (as cellpose's ``norm3D``), so
that planes above and below the objects stay dim instead of having their blur and noise stretched into
false objects. In both modes a blank (constant) plane is segmented as empty instead of being refused as
a constant image would be (:func:`plane_request`).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from scipy import sparse

from ..core.errors import ConfigError, InputError
from ..core.flows.postprocess import (
    relabel_sequential,
    remove_border_instances,
    remove_low_contrast_instances,
    remove_small_instances,
)
from ..core.preprocess.normalize import intensity_limits
from .progress import relay, run_to_end
from .segment import (
    FlowParams,
    SegmentProgress,
    SegmentRequest,
    resolve_diameter,
    segment_steps,
    strong_flow_mask,
)

__all__ = [
    "combine_axis_flows",
    "is_rgb",
    "plane_request",
    "probe_plane",
    "segment_stack_steps",
    "segment_volume_steps",
    "stack_intensity_limits",
    "stack_request",
    "stitch_labels",
    "stitch_planes",
    "volume_labels",
]

Normalize = Literal["plane", "stack"]
#: planes read to measure a stack's intensity percentiles (evenly spaced; all of them when fewer)
LIMIT_PLANES = 16


def is_rgb(shape: tuple[int, ...]) -> bool:
    """Whether the last axis holds colour channels (napari's rule: 3 or 4 channels last)."""
    return len(shape) >= 3 and shape[-1] in (3, 4)


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = int(a.max()), int(b.max())
    if na == 0 or nb == 0:
        return np.zeros((na, nb))
    inter = sparse.coo_matrix((np.ones(a.size), (a.ravel(), b.ravel())), shape=(na + 1, nb + 1)).toarray()[
        1:, 1:
    ]
    area_a = np.bincount(a.ravel(), minlength=na + 1)[1:]
    area_b = np.bincount(b.ravel(), minlength=nb + 1)[1:]
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1)


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
            prev = out[z - 1].astype(np.int64)
            prev_ids, prev_compact = np.unique(prev, return_inverse=True)
            iou = _iou_matrix(plane, prev_compact.reshape(prev.shape))
            if iou.size:
                best = iou.argmax(axis=1)
                back = iou.argmax(axis=0)
                for i in range(n):
                    j = best[i]
                    if iou[i, j] >= threshold and back[j] == i:
                        lut[i + 1] = prev_ids[j + 1]
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


def segment_stack_steps(
    image: np.ndarray,
    *,
    stitch_threshold: float = 0.25,
    normalize: Normalize = "plane",
    loaded: Any = None,
    **options: Any,
) -> Generator[SegmentProgress, None, np.ndarray]:
    """Segment every 2D plane of ``image`` (leading axes = stack/time; RGB last axis kept), yielding progress.

    ``image`` may be any array-like with ``shape`` and numpy indexing (numpy, dask, zarr): only one plane
    is read into memory at a time. Returns labels with the image's spatial shape (channels dropped); with
    more than one leading axis (e.g. T, Z) stitching runs along the last leading axis within each of the
    others. ``normalize``: "plane" (default; each plane's own percentiles, right for time series whose
    brightness drifts) or "stack" (the stack's percentiles for every plane, better for z-stacks; see the
    module notes). ``options`` are :class:`SegmentRequest` fields.
    """
    shape = tuple(image.shape)
    rgb = is_rgb(shape)
    spatial_nd = 3 if rgb else 2
    lead = shape[: len(shape) - spatial_nd]
    planes = list(np.ndindex(*lead)) if lead else [()]
    base = SegmentRequest(image=np.zeros((8, 8)), **options)
    base = yield from stack_request(base, image, planes, normalize, loaded)
    labels = []
    for i, index in enumerate(planes):
        # one plane at a time: dask/zarr arrays (lazy napari layers) are read plane by plane
        plane = _plane(image, index)

        def restate(p: SegmentProgress, i: int = i) -> SegmentProgress:
            message = f"plane {i + 1}/{len(planes)}: {p.message}"
            return SegmentProgress(p.stage, i * p.total + p.done, len(planes) * p.total, message)

        req = replace(base, image=plane)
        result = yield from relay(segment_steps(plane_request(req) if lead else req, loaded=loaded), restate)
        labels.append(result.labels)
    out = np.stack(labels).reshape((*lead, *labels[0].shape)) if labels else np.zeros(0, np.uint32)
    return stitch_planes(out, len(lead), stitch_threshold) if lead else out


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


def combine_axis_flows(xy: np.ndarray, zx: np.ndarray, zy: np.ndarray) -> np.ndarray:
    """3D flows (3, Z, H, W), channels (dz, dy, dx), from 2D flows predicted on the three slice orientations.

    Parameters
    ----------
    xy
        (Z, 2, H, W): flows (dy, dx) of every z-plane.
    zx
        (H, 2, Z, W): flows (dz, dx) of every y-plane.
    zy
        (W, 2, Z, H): flows (dz, dy) of every x-plane.

    Notes
    -----
    Each 3D component is the sum of the two 2D predictions that contain it, not renormalised: the
    original's 3D ``mask_to_flow`` is defined the same way from the 2D flows of all slices, so flow
    following behaves as on the original's 3D flows.
    """
    dz = zx[:, 0].transpose(1, 0, 2) + zy[:, 0].transpose(1, 2, 0)
    dy = xy[:, 0] + zy[:, 1].transpose(1, 2, 0)
    dx = xy[:, 1] + zx[:, 1].transpose(1, 0, 2)
    return np.stack([dz, dy, dx]).astype(np.float32)


def volume_labels(
    flow3d: np.ndarray, params: FlowParams | None = None, image: np.ndarray | None = None
) -> np.ndarray:
    """Instance labels (Z, H, W) from 3D flows (3, Z, H, W), with the 2D rules of ``params`` in 3D.

    Each 3D component is the sum of two 2D predictions (:func:`combine_axis_flows`), so flows are about
    twice as long as in 2D (inside the annotated nuclei of ``cells3d``: median 2.1): voxels whose flow is
    shorter than ``2 * flow_threshold`` are background, with the holes of the foreground filled in 3D
    (:func:`~napari_ctxseg.services.segment.strong_flow_mask`); ``flow_threshold=0`` follows every voxel,
    as the original does. Objects of fewer than ``min_size ** 1.5`` voxels (the 2D minimum area's side,
    cubed) are removed, those fainter than ``min_contrast`` noise sigmas in ``image`` (the volume; needed
    only then), and those touching a face of the volume with ``remove_border``.
    """
    from ..core.flows.following import flow_to_mask

    params = params or FlowParams()
    flow3d = np.asarray(flow3d, dtype=np.float32)
    foreground = None
    if params.flow_threshold > 0:
        foreground = strong_flow_mask(flow3d[None], 2.0 * params.flow_threshold)[0]
        flow3d = flow3d * foreground[None]  # a new array: the input is never modified
    labels = np.asarray(flow_to_mask(flow3d, **params.following())).astype(np.int64)
    if foreground is not None:
        labels *= foreground
    labels = remove_small_instances(labels, int(round(params.min_size**1.5)))
    if params.min_contrast > 0:
        if image is None:
            raise ConfigError("min_contrast needs the volume the flows were predicted for")
        labels = remove_low_contrast_instances(labels, image, params.min_contrast)
    if params.remove_border:
        labels = remove_border_instances(labels)
    return relabel_sequential(labels).astype(np.uint32)


def segment_volume_steps(
    volume: np.ndarray, *, normalize: Normalize = "plane", loaded: Any = None, **options: Any
) -> Generator[SegmentProgress, None, tuple[np.ndarray, np.ndarray]]:
    """3D segmentation of a (Z, H, W) grey volume: 2D flows on all three slice orientations, followed in 3D.

    The 2D model predicts (dy, dx) on every z-plane, (dz, dx) on every y-plane and (dz, dy) on every
    x-plane; :func:`combine_axis_flows` adds them into 3D flows and :func:`volume_labels` follows them in
    3D with the request's :class:`~napari_ctxseg.services.segment.FlowParams` (``flow=``). Each slice
    is normalised with its own intensity percentiles (``normalize="plane"``, the default) or with the
    volume's ("stack"). Voxels are assumed isotropic (resample anisotropic stacks first). Costs
    Z + H + W 2D predictions. ``options`` are :class:`SegmentRequest` fields.

    Returns
    -------
    (labels (Z, H, W) uint32, flows (3, Z, H, W) float32)
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"3D segmentation needs a grey (Z, H, W) volume, got shape {volume.shape}")
    if min(volume.shape) < 8:
        raise InputError(
            f"3D segmentation slices the volume along every axis and needs at least 8 pixels along each; "
            f"got shape {volume.shape} (segment it slice by slice instead)"
        )
    base = SegmentRequest(image=np.zeros((8, 8)), follow_flows=False, **options)
    base = yield from stack_request(base, volume, [(z,) for z in range(len(volume))], normalize, loaded)
    views = [(volume, "z"), (volume.transpose(1, 0, 2), "y"), (volume.transpose(2, 0, 1), "x")]
    total = sum(v.shape[0] for v, _ in views)
    done = 0
    flows = []
    for stack, axis in views:
        out = []
        for k in range(stack.shape[0]):
            result = run_to_end(segment_steps(plane_request(replace(base, image=stack[k])), loaded=loaded))
            out.append(result.flows.mean(axis=0))
            done += 1
            yield SegmentProgress("denoise", done, total, f"{axis}-plane {k + 1}/{stack.shape[0]}")
        flows.append(np.stack(out))
    flow3d = combine_axis_flows(*flows)
    yield SegmentProgress("labels", total, total, "following flows in 3D")
    return volume_labels(flow3d, base.flow, volume), flow3d
