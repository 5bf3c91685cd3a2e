"""Flows to instance labels, in 2D and 3D, with one rule: strong flow, follow it, clean the objects up.

1. **Foreground.** Pixels whose flow is shorter than the flow threshold are background, except the holes
   that strong flow encloses (object centres, where directions cancel): :func:`strong_flow_mask`.
2. **Follow.** The foreground's flow is followed to its sinks
   (:func:`~napari_ctxseg.core.flows.following.flow_to_mask`); background pixels get no label.
3. **Clean up.** Objects below the minimum size, objects fainter than ``min_contrast`` noise sigmas and,
   optionally, objects touching the border are removed; labels are renumbered 1..n.

In 3D each flow component is the sum of two 2D predictions
(:func:`~napari_ctxseg.services.volume.combine_axis_flows`), so flows are about twice as long as in 2D
(inside the annotated nuclei of ``cells3d``: median 2.1): the threshold is doubled, and the minimum size
(an area in 2D) becomes ``min_size ** 1.5`` voxels.

Layouts: flows ``(N, 2, h, w)`` (samples, channels (dy, dx)) in 2D, ``(3, Z, H, W)`` (dz, dy, dx) in 3D;
labels ``(H, W)`` or ``(Z, H, W)`` uint32, 0 = background.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .following import flow_to_mask
from .postprocess import (
    relabel_sequential,
    remove_border_instances,
    remove_low_contrast_instances,
    remove_small_instances,
)

__all__ = ["FlowParams", "labels_from_flows", "resize_labels", "strong_flow_mask", "volume_labels"]


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

    Examples
    --------
    >>> FlowParams(min_size=30).following()["niter"]
    1024
    >>> FlowParams(flow_threshold=-1)
    Traceback (most recent call last):
    ...
    napari_ctxseg.core.errors.ConfigError: flow_threshold must be a finite number >= 0, got -1
    """

    flow_threshold: float = 0.4
    niter: int = 1024
    step_size: float = 0.5
    min_seed_cnts: int = 30
    expand_min_cnts: int = 2
    max_flow_err: float = 0.0
    min_size: int = 15
    remove_border: bool = False
    # objects fainter than this many noise sigmas against their surroundings are dropped (0: off);
    # see core.flows.postprocess.remove_low_contrast_instances and docs/model_card.md
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


def strong_flow_mask(flows: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground of flows ``(N, D, *spatial)``: where the flow is at least ``threshold`` long, holes filled.

    Object centres have short flows (directions cancel there): what strong flow encloses is kept, so
    centres (and small gaps enclosed by touching objects) are followed and labelled. Returns a bool
    array ``(N, *spatial)``; holes are filled in all spatial dimensions (3D for volumes).

    Examples
    --------
    >>> flows = np.zeros((1, 2, 5, 5), np.float32)
    >>> flows[0, 1, 1:4, 1:4] = 1.0  # a strong square, its centre weak
    >>> flows[0, 1, 2, 2] = 0.0
    >>> int(strong_flow_mask(flows, 0.4).sum())
    9
    """
    from scipy.ndimage import binary_fill_holes

    strong = np.sqrt((np.asarray(flows, dtype=np.float32) ** 2).sum(axis=1)) >= threshold
    return np.stack([binary_fill_holes(m) for m in strong])


def _follow(flows: np.ndarray, params: FlowParams, threshold: float) -> np.ndarray:
    """Raw labels ``(N, *spatial)`` int64 of flows ``(N, D, *spatial)``: follow the foreground's flow."""
    flows = np.asarray(flows, dtype=np.float32)
    foreground = None
    if threshold > 0:
        foreground = strong_flow_mask(flows, threshold)
        flows = flows * foreground[:, None]  # a new contiguous array: the input is never modified
    else:
        flows = np.ascontiguousarray(flows)
    raw = np.asarray(flow_to_mask(flows, **params.following())).reshape(len(flows), *flows.shape[2:])
    raw = raw.astype(np.int64)
    return raw * foreground if foreground is not None else raw


def _clean(labels: np.ndarray, min_size: int, params: FlowParams, image: np.ndarray | None) -> np.ndarray:
    """Small, faint and (optionally) border objects removed, labels renumbered 1..n (uint32)."""
    labels = remove_small_instances(labels, min_size)
    if params.min_contrast > 0:
        labels = remove_low_contrast_instances(labels, np.asarray(image), params.min_contrast)
    if params.remove_border:
        labels = remove_border_instances(labels)
    return relabel_sequential(labels).astype(np.uint32)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Integer labels ``(h, w)`` resized to ``shape`` with nearest neighbours (int64; as they are if equal).

    Examples
    --------
    >>> resize_labels(np.array([[1, 2], [3, 4]]), (4, 4))[0]
    array([1, 1, 2, 2])
    """
    labels = np.asarray(labels)
    if labels.shape == tuple(shape):
        return labels
    lab = torch.from_numpy(labels.astype(np.int64, copy=False))[None, None].double()
    return F.interpolate(lab, size=shape, mode="nearest-exact")[0, 0].long().numpy()


def labels_from_flows(
    flows: np.ndarray,
    params: FlowParams,
    *,
    out_shape: tuple[int, int] | None = None,
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels from 2D flows ``(N, 2, h, w)``: (fused labels of the mean flow, labels per sample).

    Labels are computed at the flows' resolution, resized to ``out_shape`` with nearest neighbours and
    cleaned up (see the module notes); ``image`` (the input image, of ``out_shape``) is needed only for
    ``params.min_contrast``.

    Examples
    --------
    >>> from napari_ctxseg.core.flows.from_masks import mask_to_flow
    >>> mask = np.zeros((40, 40), np.int32)
    >>> mask[5:15, 5:15], mask[22:34, 20:32] = 1, 2
    >>> fused, per_sample = labels_from_flows(mask_to_flow(mask)[None], FlowParams())
    >>> int(fused.max()), per_sample.shape
    (2, (1, 40, 40))
    """
    if params.min_contrast > 0 and image is None:
        raise ConfigError("min_contrast needs the image the flows were predicted for")
    stack = np.concatenate([flows.mean(axis=0, keepdims=True), flows]) if len(flows) > 1 else flows
    out = []
    for lab in _follow(stack, params, params.flow_threshold):
        if out_shape is not None:
            lab = resize_labels(lab, out_shape)
        out.append(_clean(lab, params.min_size, params, image))
    return out[0], np.stack(out[1:] if len(flows) > 1 else out)


def volume_labels(
    flow3d: np.ndarray, params: FlowParams | None = None, image: np.ndarray | None = None
) -> np.ndarray:
    """Instance labels ``(Z, H, W)`` from 3D flows ``(3, Z, H, W)``, with the 2D rules of ``params`` in 3D.

    Voxels whose flow is shorter than ``2 * flow_threshold`` are background, with the holes of the
    foreground filled in 3D; ``flow_threshold=0`` follows every voxel, as the original does. Objects of
    fewer than ``min_size ** 1.5`` voxels are removed, those fainter than ``min_contrast`` noise sigmas in
    ``image`` (the volume; needed only then), and those touching a face of the volume with
    ``remove_border`` (see the module notes).
    """
    params = params or FlowParams()
    if params.min_contrast > 0 and image is None:
        raise ConfigError("min_contrast needs the volume the flows were predicted for")
    flow3d = np.asarray(flow3d, dtype=np.float32)
    labels = _follow(flow3d[None], params, 2.0 * params.flow_threshold)[0]
    return _clean(labels, int(round(params.min_size**1.5)), params, image)
