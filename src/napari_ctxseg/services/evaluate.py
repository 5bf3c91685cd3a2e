"""Evaluate segmentation on annotated images: pooled AP/F1 at IoU 0.5, per imaging modality.

Scores pool all objects of all images: TP/FP/FN come from one-to-one matching at IoU >= 0.5
(:func:`~napari_ctxseg.core.metrics.scores.matching_scores`), then
AP = TP / (TP + FP + FN) and F1 = 2 TP / (2 TP + FP + FN). Ground truth objects are used as they are.

Modality (for DSB 2018): ``colour`` if the image has channels that differ, otherwise ``brightfield`` if
its normalised background is bright (median > 0.5), else ``fluorescence``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from ..core.metrics.scores import MatchScores, matching_scores
from ..core.preprocess.normalize import normalize_image
from .progress import run_to_end

__all__ = [
    "MIN_INTERVAL_IMAGES",
    "baseline_watershed",
    "bootstrap_ap_interval",
    "evaluate_folder",
    "format_report",
    "match_counts",
    "modality",
    "paired_ap_difference",
    "pooled_scores",
]

#: Reports give a bootstrap interval only for groups of at least this many images.
MIN_INTERVAL_IMAGES = 5


def modality(image: np.ndarray) -> str:
    """``colour``, ``brightfield`` or ``fluorescence`` (see the module docstring)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] >= 3:
        c = image[..., :3].astype(np.float32)
        if not (np.allclose(c[..., 0], c[..., 1]) and np.allclose(c[..., 1], c[..., 2])):
            return "colour"
        image = c[..., 0]
    grey = normalize_image(image)
    return "brightfield" if float(np.median(grey)) > 0.5 else "fluorescence"


def match_counts(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) of a prediction against ground truth at an IoU threshold >= 0.5.

    The one-to-one matching of :func:`~napari_ctxseg.core.metrics.scores.matching_scores`, with its rule:
    a pair matches when its IoU is ``>=`` the threshold.

    Parameters
    ----------
    pred, gt : np.ndarray
        Label images of the same shape, 0 = background (converted to int64).
    threshold : float
        IoU threshold of a match, at least 0.5.

    Returns
    -------
    tuple of int
        Matched pairs, unmatched predicted objects, unmatched ground-truth objects.

    Raises
    ------
    ValueError
        If ``threshold < 0.5``.

    Examples
    --------
    >>> match_counts(np.array([[1, 1, 0, 2]]), np.array([[1, 0, 0, 0]]))  # IoU 0.5 matches
    (1, 1, 0)
    """
    if threshold < 0.5:
        raise ValueError("match_counts needs threshold >= 0.5 (unique matches)")
    pred, gt = np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64)
    scores = matching_scores(pred, gt, (threshold,))[float(threshold)]
    return scores.tp, scores.fp, scores.fn


def baseline_watershed(image: np.ndarray, diameter: float = 20.0) -> np.ndarray:
    """Classical baseline: Gaussian smoothing, Otsu threshold, distance-transform seeds, watershed."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    image = np.asarray(image, dtype=np.float32)
    grey = image[..., :3].mean(axis=-1) if image.ndim == 3 else image
    grey = gaussian(normalize_image(grey), sigma=1.0)
    fg = grey > threshold_otsu(grey)
    if fg.mean() > 0.5:  # bright background (bright-field, H&E): objects are the dark part
        fg = ~fg
    fg = ndi.binary_fill_holes(remove_small_objects(fg, max_size=15))
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(
        dist, min_distance=max(2, int(diameter / 4)), labels=ndi.label(fg)[0], exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=fg).astype(np.uint32)


def pooled_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Report scores of counts summed over images: the counts, AP@0.5 and F1@0.5.

    AP@0.5 = TP / (TP + FP + FN) and F1@0.5 (NaN when all three are 0), as
    :class:`~napari_ctxseg.core.metrics.scores.MatchScores` computes them.

    Examples
    --------
    >>> pooled_scores(8, 1, 1)["ap50"]
    0.8
    """
    m = MatchScores(0.5, tp, fp, fn)
    return {"tp": tp, "fp": fp, "fn": fn, "ap50": m.ap, "f1_50": m.f1}


def evaluate_folder(
    images: str | Path,
    labels: str | Path,
    *,
    names_file: str | Path | None = None,
    subset: str = "val",
    options: dict[str, Any] | None = None,
    baseline: bool = False,
    progress: Callable[[str], None] | None = None,
    limit: int = 0,
) -> dict[str, Any]:
    """Segment every image of a folder (or a split subset) and score it against its labels.

    Returns a JSON-ready report: per method (``ctxseg`` and optionally ``baseline``) pooled scores over
    all images and per modality, seconds per image, and ``per_image`` rows (name, modality, AP@0.5 per
    method and ``counts``: ``[TP, FP, FN]`` per method, which :func:`bootstrap_ap_interval` resamples).
    """
    from .segment import SegmentRequest, segment_steps
    from .training import _find, read_array, read_split

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"limit must be a whole number >= 0 (0: every image), got {limit!r}")
    images, labels = Path(images), Path(labels)
    names = (
        read_split(names_file, subset)
        if names_file is not None
        else sorted(p.stem for p in labels.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png"))
    )
    if limit:
        names = names[:limit]
    say = progress or (lambda s: None)
    options = dict(options or {})
    counts: dict[str, dict[str, list[int]]] = {"ctxseg": {}, **({"baseline": {}} if baseline else {})}
    seconds: dict[str, float] = {m: 0.0 for m in counts}
    per_image = []
    for i, name in enumerate(names):
        image = read_array(_find(images, name))
        gt = read_array(_find(labels, name))
        mod = modality(image)
        t0 = time.perf_counter()
        pred = run_to_end(segment_steps(SegmentRequest(image=image, **options))).labels
        seconds["ctxseg"] += time.perf_counter() - t0
        row: dict[str, Any] = {"name": name, "modality": mod, "counts": {}}
        preds = {"ctxseg": pred}
        if baseline:
            t0 = time.perf_counter()
            d = options.get("diameter")
            preds["baseline"] = baseline_watershed(image, diameter=d if isinstance(d, int | float) else 20.0)
            seconds["baseline"] += time.perf_counter() - t0
        for method, p in preds.items():
            c = match_counts(p, gt)
            for key in (mod, "all"):
                acc = counts[method].setdefault(key, [0, 0, 0])
                for j in range(3):
                    acc[j] += c[j]
            row[method] = pooled_scores(*c)["ap50"]
            row["counts"][method] = list(c)
        per_image.append(row)
        say(f"[{i + 1}/{len(names)}] {name} ({mod}): AP50 " + ", ".join(f"{m} {row[m]:.3f}" for m in preds))
    report = {
        "images": len(names),
        "subset": subset if names_file else None,
        "options": {
            k: (v if isinstance(v, int | float | str | type(None)) else str(v)) for k, v in options.items()
        },
        "methods": {
            m: {
                key: {
                    **pooled_scores(*c),
                    "images": sum(r["modality"] == key or key == "all" for r in per_image),
                }
                for key, c in sorted(counts[m].items())
            }
            for m in counts
        },
        "seconds_per_image": {m: seconds[m] / max(1, len(names)) for m in seconds},
        "per_image": per_image,
    }
    return report


def bootstrap_ap_interval(
    per_image: list[dict[str, Any]],
    method: str = "ctxseg",
    modality: str | None = None,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of pooled AP@0.5 over images.

    The images are the sampling unit (objects of one image are not independent): each resample draws
    as many images as there are, with replacement, and pools their counts.

    Parameters
    ----------
    per_image
        The ``per_image`` rows of an :func:`evaluate_folder` report.
    method
        ``"ctxseg"`` or ``"baseline"``.
    modality
        Only the images of this modality; ``None`` or ``"all"`` (the reports' key) for all.
    resamples, level, seed
        Number of bootstrap resamples, the interval's coverage and the random seed.

    Returns
    -------
    tuple of float
        The lower and upper ends of the interval.

    Raises
    ------
    ValueError
        If no image matches, or a row has no counts for ``method``.
    """
    counts = _image_counts(_select(per_image, modality), method, modality)
    rng = np.random.default_rng(seed)
    ap = _pooled_ap(counts, rng.integers(0, len(counts), size=(resamples, len(counts))))
    return _percentiles(ap, level)


def paired_ap_difference(
    per_image_a: list[dict[str, Any]],
    per_image_b: list[dict[str, Any]],
    method: str = "ctxseg",
    modality: str | None = None,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Pooled AP@0.5 of B minus that of A on the same images, with a paired bootstrap interval.

    Both reports must score the same images. Each resample draws one set of images and pools both
    models' counts on it, so what the images have in common (an easy or a hard image) cancels: the
    interval of the difference is much narrower than either model's own interval.

    Parameters
    ----------
    per_image_a, per_image_b
        The ``per_image`` rows of two :func:`evaluate_folder` reports (for example two checkpoints).
    method, modality, resamples, level, seed
        As for :func:`bootstrap_ap_interval`.

    Returns
    -------
    tuple of float
        The difference B - A on all the images, and the lower and upper ends of its interval.

    Raises
    ------
    ValueError
        If the reports score different images, or as for :func:`bootstrap_ap_interval`.
    """
    rows_a, rows_b = _select(per_image_a, modality), _select(per_image_b, modality)
    by_name_b = {r["name"]: r for r in rows_b}
    if sorted(r["name"] for r in rows_a) != sorted(by_name_b):
        raise ValueError("the two reports score different images; compare reports of the same images")
    a = _image_counts(rows_a, method, modality)
    b = _image_counts([by_name_b[r["name"]] for r in rows_a], method, modality)
    everything = np.arange(len(a))[None]
    difference = float(_pooled_ap(b, everything)[0] - _pooled_ap(a, everything)[0])
    draws = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    low, high = _percentiles(_pooled_ap(b, draws) - _pooled_ap(a, draws), level)
    return difference, low, high


def _select(per_image: list[dict[str, Any]], modality: str | None) -> list[dict[str, Any]]:
    """The rows of one modality (all of them for ``None`` or ``"all"``)."""
    if modality in (None, "all"):
        return list(per_image)
    return [r for r in per_image if r["modality"] == modality]


def _image_counts(rows: list[dict[str, Any]], method: str, modality: str | None) -> np.ndarray:
    """(images, 3) TP/FP/FN of selected rows; ``modality`` names the selection in the error."""
    if not rows:
        raise ValueError(f"no images of modality {modality!r}")
    try:
        return np.array([r["counts"][method] for r in rows], dtype=np.int64)
    except KeyError:
        raise ValueError(f"the report has no per-image counts for {method!r}") from None


def _pooled_ap(counts: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Pooled AP@0.5 of each row of image indices ``draws`` (resamples, n) -> (resamples,)."""
    tp, fp, fn = counts[draws].sum(axis=1).T
    total = tp + fp + fn
    return np.divide(tp, total, out=np.zeros(len(draws)), where=total > 0)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def format_report(report: dict[str, Any], min_images: int = MIN_INTERVAL_IMAGES) -> str:
    """A plain-text table of a report from :func:`evaluate_folder`.

    Rows of at least ``min_images`` images also give the 95 % bootstrap interval of their pooled AP@0.5
    (:func:`bootstrap_ap_interval`): how much the figure could move with another draw of images.
    """
    lines = [
        f"{'method':<10} {'modality':<13} {'images':>6} {'TP':>6} {'FP':>6} {'FN':>6} "
        f"{'AP@0.5':>7} {'F1@0.5':>7}  AP@0.5 95 % interval"
    ]
    for method, by_mod in report["methods"].items():
        for mod, s in by_mod.items():
            interval = ""
            if s["images"] >= min_images:
                low, high = bootstrap_ap_interval(report["per_image"], method, mod)
                interval = f"  {low:.3f}-{high:.3f}"
            lines.append(
                f"{method:<10} {mod:<13} {s['images']:>6} {s['tp']:>6} {s['fp']:>6} {s['fn']:>6} "
                f"{s['ap50']:>7.3f} {s['f1_50']:>7.3f}{interval}"
            )
    for method, sec in report["seconds_per_image"].items():
        lines.append(f"{method}: {sec:.2f} s per image")
    return "\n".join(lines)
