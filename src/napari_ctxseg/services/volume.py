"""3D segmentation of a grey volume: 2D flows on all three slice orientations, followed in 3D."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.flows.labels import volume_labels
from .progress import run_to_end
from .segment import SegmentProgress, SegmentRequest, segment_steps
from .stack import Normalize, plane_request, stack_request

__all__ = ["combine_axis_flows", "segment_volume_steps", "volume_labels"]


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
