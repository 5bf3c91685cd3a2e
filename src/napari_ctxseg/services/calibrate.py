"""Calibration from the context: score settings on the annotated context itself, keep the best.

A context is an annotated example of what to segment, so it can also tell whether the settings fit. Each
context image is segmented (with the other context images as its context, leave-one-out, or with itself
where there is only one) at three object sizes around its annotated size; the flows of each run are
followed with a few flow thresholds and minimum sizes (no further network calls). The combination with the
best pooled AP@0.5 against the context's labels (inside its region) wins, and that score, the **context
self-score**, tells a user before a batch whether the settings fit these cells.

Examples
--------
>>> from napari_ctxseg.services.calibrate import DIAMETER_FACTORS, FLOW_THRESHOLDS
>>> DIAMETER_FACTORS, FLOW_THRESHOLDS
((0.8, 1.0, 1.25), (0.2, 0.4, 0.6))
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.flows.postprocess import median_diameter
from .evaluate import match_counts
from .models import LoadedModel, load_model
from .progress import relay
from .request import references
from .segment import (
    FlowParams,
    SegmentProgress,
    SegmentRequest,
    SegmentResult,
    labels_from_flows,
    segment_steps,
)

__all__ = ["DIAMETER_FACTORS", "FLOW_THRESHOLDS", "Calibration", "calibrate_steps"]

#: object sizes tried, as factors of the context's median annotated diameter (one network pass each)
DIAMETER_FACTORS = (0.8, 1.0, 1.25)
#: flow thresholds tried on the flows of every pass
FLOW_THRESHOLDS = (0.2, 0.4, 0.6)
#: minimum object areas tried, as fractions of the context's median object area (0: the request's own)
MIN_SIZE_FRACTIONS = (0.0, 0.1, 0.25)


@dataclass(frozen=True)
class Calibration:
    """The settings that scored best on the context, and the scores.

    ``self_score`` is the pooled AP@0.5 on the context images with the chosen settings; ``default_score``
    with the request's own flow settings at the context's annotated size; ``leave_one_out`` says whether
    each context image was segmented with the *other* ones as its context.
    """

    diameter: float
    flow: FlowParams
    self_score: float
    default_score: float
    counts: tuple[int, int, int]
    leave_one_out: bool
    tried: int

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for the provenance of a result."""
        return {
            "self_score_ap50": round(self.self_score, 4),
            "default_score_ap50": round(self.default_score, 4),
            "tp_fp_fn": list(self.counts),
            "diameter": round(self.diameter, 2),
            "flow_threshold": self.flow.flow_threshold,
            "min_size": self.flow.min_size,
            "leave_one_out": self.leave_one_out,
            "settings_tried": self.tried,
        }


def _masked(labels: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    return labels if region is None else np.where(np.asarray(region) != 0, labels, 0)


def _constant(step: SegmentProgress) -> Callable[[Any], SegmentProgress]:
    return lambda _inner: step


def calibrate_steps(
    req: SegmentRequest, *, loaded: LoadedModel | None = None
) -> Generator[SegmentProgress, None, Calibration]:
    """Score diameters x flow thresholds x minimum sizes on ``req``'s context; return the best.

    Parameters
    ----------
    req
        A request with a context (its image is not used); its sampler settings are used for the passes.
    loaded
        The model (loaded from ``req.checkpoint`` if not given).

    Raises
    ------
    InputError
        No context, or a context without annotated objects.
    """
    refs = references(req)
    if not refs:
        raise InputError("calibration needs a context: an image and its labels")
    loaded = loaded or load_model(req.checkpoint, device=req.device)
    truths = [_masked(labels, region) for _, labels, region in refs]
    sizes = [median_diameter(t) for t in truths]
    if not any(s > 0 for s in sizes):
        raise InputError("the context labels contain no annotated object to calibrate on")
    diameter = float(np.median([s for s in sizes if s > 0]))
    area = np.pi * diameter**2 / 4
    min_sizes = sorted({int(round(f * area)) if f else req.flow.min_size for f in MIN_SIZE_FRACTIONS})
    thresholds = sorted({*FLOW_THRESHOLDS, req.flow.flow_threshold})  # the request's own is always scored
    flows = [replace(req.flow, flow_threshold=t, min_size=m) for t in thresholds for m in min_sizes]
    diameters = [diameter * f for f in DIAMETER_FACTORS]
    counts: dict[tuple[float, int], np.ndarray] = {
        (d, f): np.zeros(3, np.int64) for d in diameters for f in range(len(flows))
    }
    # the request's own flow settings (in the grid: thresholds and min_sizes hold its values)
    own = next(
        f
        for f, params in enumerate(flows)
        if params.flow_threshold == req.flow.flow_threshold and params.min_size == req.flow.min_size
    )
    loo = len(refs) > 1
    total = len(refs) * len(diameters)
    for (i, (image, _, region)), d in itertools.product(enumerate(refs), diameters):
        others = [r for j, r in enumerate(refs) if j != i] if loo else [refs[i]]
        sub = replace(
            req,
            image=image,
            context_image=[r[0] for r in others],
            context_labels=[r[1] for r in others],
            context_region=[r[2] for r in others],
            diameter=d,
            calibrate=False,
            adapt_seconds=0.0,
        )
        step = SegmentProgress("calibrate", i * len(diameters) + diameters.index(d), total, "calibrating")
        result: SegmentResult = yield from relay(segment_steps(sub, loaded=loaded), _constant(step))
        shape = np.asarray(image).shape[:2]
        for f, params in enumerate(flows):
            labels, _ = labels_from_flows(result.flows_model_scale, params, out_shape=shape, image=image)
            tp_fp_fn = np.array(match_counts(_masked(labels, region), truths[i]))
            counts[(d, f)] += tp_fp_fn

    def ap(c: np.ndarray) -> float:
        return float(c[0] / max(1, c.sum()))

    # best AP; ties go to the annotated size, then to the settings nearest the request's own
    def rank(key: tuple[float, int]) -> tuple[float, float, float]:
        d, f = key
        return (
            ap(counts[key]),
            -abs(np.log(d / diameter)),
            -abs(flows[f].flow_threshold - req.flow.flow_threshold),
        )

    best = max(counts, key=rank)
    return Calibration(
        diameter=best[0],
        flow=flows[best[1]],
        self_score=ap(counts[best]),
        default_score=ap(counts[(diameters[DIAMETER_FACTORS.index(1.0)], own)]),
        counts=tuple(int(v) for v in counts[best]),  # type: ignore[arg-type]
        leave_one_out=loo,
        tried=len(counts),
    )
