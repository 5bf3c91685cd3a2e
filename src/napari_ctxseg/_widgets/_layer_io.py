"""Between napari layers and the segment service: snapshots, planes, context, requests, result layers.

Pure functions (no Qt) so the widgets stay thin and this logic is tested without a viewer.

Layouts at this boundary: an image layer's data is ``(*leading, H, W)`` grey or ``(*leading, H, W, C)`` RGB
(``layer.rgb``); every ``leading`` index is one 2D plane segmented on its own (a z-stack, a time series or
both). Labels have the image's spatial shape ``(*leading, H, W)`` and the source's scale and translate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..services.segment import FlowParams, SegmentRequest, Solver, validate_context
from ..services.stack import Normalize

__all__ = [
    "ContextData",
    "LayerSnapshot",
    "RunSettings",
    "channel_axis",
    "choose_channels",
    "context_from_layers",
    "crop_to_view",
    "current_plane",
    "embed_labels",
    "layer_plane",
    "make_context",
    "shapes_mask",
    "snapshot_layer",
]

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]


@dataclass(frozen=True)
class LayerSnapshot:
    """A copy of an image layer's data and placement, taken when a run starts."""

    data: np.ndarray
    name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    rgb: bool = False  # channels last: RGB, or the 2 chosen channels of choose_channels
    channels: dict[str, Any] | None = None  # the channel choice that made ``data`` (provenance)

    @property
    def leading_shape(self) -> tuple[int, ...]:
        """Shape of the stack/time axes (``()`` for one 2D image)."""
        return self.data.shape[: self.data.ndim - (3 if self.rgb else 2)]

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one plane."""
        lead = len(self.leading_shape)
        return self.data.shape[lead], self.data.shape[lead + 1]

    def planes(self) -> list[tuple[int, ...]]:
        """Leading indices of every plane, in C order (``[()]`` for one 2D image)."""
        return list(np.ndindex(*self.leading_shape))


def snapshot_layer(layer: Any) -> LayerSnapshot:
    """Copy an image layer's data (materialising lazy arrays) with its name, scale, translate and rgb flag.

    Raises
    ------
    InputError
        Multiscale layers, or data with fewer than two spatial axes.
    """
    if getattr(layer, "multiscale", False):
        raise InputError(f"layer {layer.name!r} is multiscale; open its full-resolution level as an image")
    rgb = bool(getattr(layer, "rgb", False))
    data = np.array(layer.data, copy=True)
    if data.ndim < (3 if rgb else 2):
        shape = "(..., H, W, 3)" if rgb else "(..., H, W)"
        raise InputError(f"layer {layer.name!r} has shape {data.shape}; expected {shape}")
    scale, translate = tuple(map(float, layer.scale)), tuple(map(float, layer.translate))
    return LayerSnapshot(data, str(layer.name), scale, translate, rgb)


def channel_axis(layer: Any) -> int | None:
    """The axis of ``layer.data`` that holds channels (None for a 2D grey layer).

    The last axis of an RGB layer, else the first of a layer with 3 or more axes (``(C, H, W)``,
    ``(C, Z, H, W)``).
    """
    ndim = np.ndim(layer.data)
    if getattr(layer, "rgb", False):
        return ndim - 1
    return 0 if ndim >= 3 else None


def choose_channels(
    snap: LayerSnapshot,
    channel: int | None,
    nuclear: int | np.ndarray | None = None,
    *,
    axis: int | None = None,
    nuclear_name: str = "",
) -> LayerSnapshot:
    """The snapshot of the chosen channel(s) (see :mod:`napari_ctxseg.core.preprocess.channels`).

    ``channel`` is the channel to segment; ``nuclear`` a nuclear channel of the same layer (an index) or
    of another layer (its data, of the shape of the chosen channel).

    Returns ``snap`` itself when nothing is chosen; the channel axis leaves the scale and translate.

    Raises
    ------
    InputError
        A channel that does not exist, or a nuclear layer of another shape.
    """
    from ..core.preprocess.channels import channel_record, select_channels

    if channel is None and nuclear is None:
        return snap
    data, scale, translate = snap.data, snap.scale, snap.translate
    record: dict[str, Any] = {}
    if channel is not None:
        if axis is None:
            raise InputError(f"layer {snap.name!r} has no channel axis; choose 'all' as its channel")
        index = nuclear if isinstance(nuclear, int) else None
        data = select_channels(snap.data, channel, index, channel_axis=axis)
        record = channel_record(channel, index, axis) or {}
        if not snap.rgb:  # the channel axis was a layer axis
            scale, translate = scale[:axis] + scale[axis + 1 :], translate[:axis] + translate[axis + 1 :]
    elif snap.rgb:
        raise InputError("choose the channel to segment of an RGB layer before adding a nuclear layer")
    if isinstance(nuclear, np.ndarray):
        nuc = np.asarray(nuclear)
        if nuc.shape != data.shape:
            raise InputError(
                f"the nuclear layer {nuclear_name!r} has shape {nuc.shape}; expected {data.shape}, the shape "
                f"of the channel to segment"
            )
        data = np.stack([data, nuc.astype(data.dtype, copy=False)], axis=-1)
        record = {**(record or {"channel": None, "channel_axis": None}), "nuclear_layer": nuclear_name}
        record["model_input"] = "(channel, nuclear, 0)"
    two = data.ndim > len(scale)
    return replace(snap, data=data, scale=scale, translate=translate, rgb=two, channels=record)


def crop_to_view(snap: LayerSnapshot, corner_pixels: np.ndarray) -> tuple[LayerSnapshot, tuple[int, ...]]:
    """Crop the last two spatial axes to the visible box ``corner_pixels`` (2, ndim) (inclusive corners).

    Returns the cropped snapshot, whose translate places it where it was, and the box ``(y0, x0, y1, x1)``.
    Leading (stack) axes are kept whole.
    """
    corners = np.asarray(corner_pixels, dtype=int)[:, -2:]
    h, w = snap.plane_shape
    y0, x0 = np.clip(corners[0], 0, (h - 1, w - 1))
    y1, x1 = np.clip(corners[1] + 1, (y0 + 1, x0 + 1), (h, w))
    if min(y1 - y0, x1 - x0) < 8:
        raise InputError(
            f"the visible field of view is only {y1 - y0} x {x1 - x0} pixels; zoom out to show "
            f"at least 8 x 8 pixels of {snap.name!r}"
        )
    lead = len(snap.leading_shape)
    data = snap.data[(slice(None),) * lead + (slice(y0, y1), slice(x0, x1))].copy()
    translate = np.array(snap.translate)
    translate[-2:] += np.array([y0, x0]) * np.array(snap.scale[-2:])
    box = tuple(int(v) for v in (y0, x0, y1, x1))
    return replace(snap, data=data, translate=tuple(translate.tolist())), box


def current_plane(data: np.ndarray, rgb: bool, index: tuple[int, ...]) -> np.ndarray:
    """The 2D plane (``(H, W)`` or ``(H, W, C)``) of a stack at leading ``index`` (clipped to the stack)."""
    data = np.asarray(data)
    lead = data.shape[: data.ndim - (3 if rgb else 2)]
    idx = tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(index[-len(lead) :] if lead else (), lead))
    return np.asarray(data[idx])


def embed_labels(
    labels: np.ndarray, offset: tuple[int, int], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a labels crop at ``offset`` into zeros of ``shape``; returns ``(labels, footprint region)``."""
    y0, x0 = offset
    h, w = labels.shape
    if y0 < 0 or x0 < 0 or y0 + h > shape[0] or x0 + w > shape[1]:
        raise InputError(f"labels of shape {labels.shape} at offset {offset} do not fit the image {shape}")
    full = np.zeros(shape, labels.dtype)
    region = np.zeros(shape, bool)
    full[y0 : y0 + h, x0 : x0 + w] = labels
    region[y0 : y0 + h, x0 : x0 + w] = True
    return full, region


@dataclass(frozen=True)
class ContextData:
    """One annotated 2D example (image plane, its labels, where the annotation is complete)."""

    image: np.ndarray
    labels: np.ndarray
    region: np.ndarray | None = None


def make_context(
    image: np.ndarray,
    labels: np.ndarray,
    region: np.ndarray | None = None,
    *,
    names: tuple[str, str] = ("context image", "context labels"),
) -> ContextData:
    """Check and copy a context; every message says which layer has which shape.

    Raises
    ------
    InputError
        Shapes that do not match, non-integer labels, an empty region or no annotated object.
    """
    validate_context(image, labels, region, names=names)
    image, labels = np.array(image, copy=True), np.array(labels, copy=True)
    region = None if region is None else np.asarray(region).astype(bool)
    return ContextData(image, labels, region)


@dataclass(frozen=True)
class RunSettings:
    """What the widget's controls say; ``diameter`` 0 means "auto" (measured before segmenting)."""

    checkpoint: str = "default"
    device: str = "auto"
    steps: int = 1
    solver: Solver = "edf"
    num_samples: int = 1
    tta: bool = False  # average over the image and its flips (SegmentRequest.tta)
    seed: int = 0
    diameter: float = 0.0
    flow: FlowParams = field(default_factory=FlowParams)
    stitch_threshold: float = 0.25  # stacks: see PlanesResult.stitch_threshold
    normalize: Normalize = "plane"  # stacks: each plane's or the stack's percentiles (services.stack)
    volume_3d: bool = False  # grey (Z, Y, X) stacks: flows of all three orientations followed in 3D
    adapt_seconds: float = 0.0  # > 0 with a context: adapt a copy of the model to it first (services.adapt)
    calibrate: bool = False  # with a context: diameter and flow settings that score best on it (calibrate)

    def request(self, image: np.ndarray, context: ContextData | None = None) -> SegmentRequest:
        """A :class:`SegmentRequest` for one 2D plane."""
        c = context
        return SegmentRequest(
            image=image,
            checkpoint=self.checkpoint,
            device=self.device,
            steps=self.steps,
            solver=self.solver,
            num_samples=self.num_samples,
            tta=self.tta,
            seed=self.seed,
            diameter=self.diameter or "auto",
            context_image=None if c is None else c.image,
            context_labels=None if c is None else c.labels,
            context_region=None if c is None else c.region,
            flow=self.flow,
        )


def spatial_unit(layer: Any) -> tuple[str, float] | None:
    """The physical unit of ``layer``'s last (x) axis and its pixel size, or None for plain pixels.

    napari layers carry ``units`` (pint units, ``pixel`` by default) and ``scale`` per axis; an object
    diameter in that unit becomes pixels by dividing by the mean pixel size of the last two axes.
    """
    units = getattr(layer, "units", None)
    if not units:
        return None
    unit = str(units[-1])
    if unit in ("pixel", "px", ""):
        return None
    rgb = bool(getattr(layer, "rgb", False))
    scale = np.abs(np.asarray(layer.scale, dtype=np.float64))
    scale = scale[-3:-1] if rgb and len(scale) >= 3 else scale[-2:]
    size = float(scale.mean())
    return (unit, size) if size > 0 and np.isfinite(size) else None


def diameter_in_pixels(value: float, unit: str, layer: Any) -> float:
    """A diameter given in ``unit`` (``"px"`` or the layer's :func:`spatial_unit`) in pixels (0 stays 0)."""
    found = spatial_unit(layer)
    if unit == "px" or not value or found is None or found[0] != unit:
        return float(value)
    return float(value) / found[1]


def layer_plane(layer: Any, point: tuple[float, ...]) -> np.ndarray:
    """The 2D plane of ``layer`` shown at the viewer's world ``point`` (the whole data for a 2D layer)."""
    data = np.asarray(layer.data)
    rgb = bool(getattr(layer, "rgb", False))
    nlead = data.ndim - (3 if rgb else 2)
    coords = np.asarray(layer.world_to_data(point)) if nlead > 0 else np.zeros(0)
    index = tuple(round(float(v)) for v in coords[:nlead])
    return current_plane(data, rgb, index)


def shapes_mask(shapes: Any, image: Any, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a shapes layer into the pixel grid of ``image`` (through world coordinates): a bool mask."""
    from napari.layers import Shapes

    polys = []
    for verts in shapes.data:
        world = [shapes.data_to_world(v) for v in np.asarray(verts)]
        polys.append(np.array([image.world_to_data(w) for w in world])[:, -2:])
    if not polys:
        return np.zeros(shape, bool)
    masks = np.asarray(Shapes(polys, shape_type=list(shapes.shape_type)).to_masks(shape))
    return np.asarray(masks.any(axis=0))  # an array, not the scalar np.bool that .any() may be typed as


def context_from_layers(
    image: Any,
    labels: Any,
    region: Any = None,
    *,
    point: tuple[float, ...] = (),
    image_plane: np.ndarray | None = None,
) -> ContextData:
    """A :class:`ContextData` from layers at the viewer's ``point`` (planes of stacks are taken there).

    ``labels`` may be a labels layer made by a field-of-view run of this plugin on the same grid: it is
    pasted at its place in ``image`` and the annotation counts as complete inside its footprint only.
    ``region`` is a shapes layer (rasterised through world coordinates) or a labels layer (non-zero).
    ``image_plane``: the context image's plane when it is not the layer's data as it is (its chosen channels).
    """
    img = layer_plane(image, point) if image_plane is None else image_plane
    lab = layer_plane(labels, point)
    shape = img.shape[:2]
    footprint = None
    fov = (getattr(labels, "metadata", None) or {}).get("ctxseg", {}).get("field_of_view")
    if fov is not None and lab.shape != shape:
        offset = (np.asarray(labels.translate[-2:]) - np.asarray(image.translate[-2:])) / np.asarray(
            image.scale[-2:]
        )
        lab, footprint = embed_labels(lab, (round(float(offset[0])), round(float(offset[1]))), shape)
    mask = None
    if region is not None:
        if hasattr(region, "shape_type"):
            mask = shapes_mask(region, image, shape)
        else:
            mask = layer_plane(region, point) > 0
            if mask.shape != shape:
                raise InputError(
                    f"region layer {region.name!r} has shape {mask.shape} but context image "
                    f"{image.name!r} has {shape}"
                )
    if footprint is not None:
        mask = footprint if mask is None else mask & footprint
    return make_context(img, lab, mask, names=(str(image.name), str(labels.name)))
