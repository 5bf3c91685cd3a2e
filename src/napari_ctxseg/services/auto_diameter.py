"""``diameter="auto"``: the objects' size measured before segmenting, and the scale it asks for.

With a context, the annotated objects (inside their regions) tell the size and nothing runs. Otherwise
one-step passes of the core pipeline over the central ``AUTO_PROBE_SIZE`` square measure it: at the
model's scale, at half scale (objects too large for the model's scale fall apart into ~20 px fragments
there), and, when the size asks for a downscale, again at that scale (see the ``AUTO_*`` constants).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace

import numpy as np

from ..core.flows.postprocess import median_diameter
from ..core.pipeline import ImageSegmentation, SegmentProgress
from .models import LoadedModel, load_model
from .progress import relay
from .request import (
    MODEL_DIAMETER,
    SegmentRequest,
    SegmentResult,
    as_image,
    references,
    request_result,
    request_steps,
)

__all__ = [
    "AUTO_COARSE_MIN",
    "AUTO_COARSE_RATIO",
    "AUTO_MIN_RESCALE",
    "AUTO_PROBE_SIZE",
    "AUTO_REFINE_PASSES",
    "AUTO_REFINE_TOLERANCE",
    "AUTO_SCALE_RANGE",
    "AUTO_TARGET_DIAMETER",
    "auto_diameter",
    "auto_scale",
    "context_diameter",
    "measure_diameter",
    "resolve_diameter",
]

#: Rescale so that the measured median object diameter becomes AUTO_TARGET_DIAMETER pixels, by a factor
#: within AUTO_SCALE_RANGE, and only when that factor (or its inverse) is at least AUTO_MIN_RESCALE: the
#: model was trained with 0.5-2x rescaling, so near its scale it is left alone. Chosen on DSB *training*
#: images with the bundled model (native scale, and nuclei resampled 0.5-4x; docs/model_card.md).
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


def auto_scale(diameter: float) -> float:
    """The rescale factor ``diameter="auto"`` applies to objects of this measured median diameter.

    ``AUTO_TARGET_DIAMETER / diameter`` clipped to ``AUTO_SCALE_RANGE``; 1.0 when nothing was found or
    when the factor is within ``AUTO_MIN_RESCALE`` of 1 (both ways: 20 px objects are left alone from
    ~13 to ~30 px).

    Examples
    --------
    >>> auto_scale(80.0), auto_scale(25.0), auto_scale(0.0)
    (0.25, 1.0, 1.0)
    """
    if not diameter > 0:
        return 1.0
    lo, hi = AUTO_SCALE_RANGE
    scale = float(np.clip(AUTO_TARGET_DIAMETER / diameter, lo, hi))
    return scale if max(scale, 1.0 / scale) >= AUTO_MIN_RESCALE else 1.0


def auto_diameter(measured: float) -> float | None:
    """The ``diameter`` that gives :func:`auto_scale` for a measured size (None: no rescaling).

    Examples
    --------
    >>> auto_diameter(80.0), auto_diameter(25.0)
    (80.0, None)
    """
    scale = auto_scale(measured)
    return None if scale == 1.0 else MODEL_DIAMETER / scale


def context_diameter(labels: list[np.ndarray], regions: list[np.ndarray | None] | None = None) -> float:
    """Median object diameter over context label images (inside their regions); 0.0 without objects.

    Examples
    --------
    >>> lab = np.zeros((64, 64), np.int32)
    >>> lab[4:24, 4:24] = 1
    >>> round(context_diameter([lab]), 1)
    22.6
    """
    parts, offset = [], 0
    for k, lab in enumerate(labels):
        lab = np.asarray(lab).astype(np.int64)
        region = None if regions is None else regions[k]
        if region is not None:
            lab = np.where(np.asarray(region, bool), lab, 0)
        parts.append(np.where(lab > 0, lab + offset, 0).ravel())
        offset += int(lab.max()) + 1
    return median_diameter(np.concatenate(parts)) if parts else 0.0


_Pass = tuple[SegmentRequest, ImageSegmentation, float]


def measure_diameter(
    req: SegmentRequest, loaded: LoadedModel
) -> Generator[SegmentProgress, None, tuple[float, SegmentResult | None]]:
    """Median object diameter for ``diameter="auto"``, and the first probe's result if it can be reused.

    The probe's result (at the model's scale, one step, one sample) is reused when it saw the whole image.
    See the module notes for the passes.
    """
    refs = references(req)
    if refs:
        return context_diameter([labels for _, labels, _ in refs], [region for _, _, region in refs]), None
    image = np.asarray(req.image)
    h, w = image.shape[:2]
    y0, x0 = max(0, (h - AUTO_PROBE_SIZE) // 2), max(0, (w - AUTO_PROBE_SIZE) // 2)
    crop = replace(req, image=image[y0 : y0 + AUTO_PROBE_SIZE, x0 : x0 + AUTO_PROBE_SIZE])

    def probe(diameter: float | None) -> Generator[SegmentProgress, None, tuple[float, _Pass]]:
        """The median diameter of one pass, and the pass (request, pipeline output, scale)."""
        one = replace(crop, diameter=diameter, steps=1, num_samples=1, tta=False)
        out, scale = yield from relay(
            request_steps(one, loaded, as_image(one.image, "image")),
            lambda p: SegmentProgress("size", p.done, p.total, "measuring object size"),
        )
        return median_diameter(out.labels), (one, out, scale)

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
    if crop.image.shape[:2] != (h, w):
        return size, None
    one, out, scale = first
    return size, request_result(one, loaded, out, scale, None)


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
    measured, _ = yield from measure_diameter(replace(req, follow_flows=True), loaded)
    return auto_diameter(measured)
