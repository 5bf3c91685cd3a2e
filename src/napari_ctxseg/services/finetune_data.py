"""Fine-tuning data from in-memory arrays: validate pairs, focus on the annotation, hold out validation.

Pure numpy (no Qt, no napari): the fine-tune widget turns its layers into :class:`TrainingPair` values and
:func:`~napari_ctxseg.services.finetune.finetune_request_from_arrays` calls the functions here.

Layouts: images ``(H, W)`` or ``(H, W, C)``; labels and regions ``(H, W)``. A stack (labels ``(Z, H, W)``
with an image ``(Z, H, W[, C])``) is split into frames here, once.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from ..core.errors import InputError
from ..core.train.data import AnnotatedImage, annotate

__all__ = ["TrainingPair", "array_digest", "check_pairs", "focus", "prepare", "split_validation"]


class TrainingPair(NamedTuple):
    """An image with its labels, an optional complete-annotation region, a name and its layers' names.

    A plain ``(image, labels, region, name)`` tuple is accepted wherever a pair is expected.
    """

    image: np.ndarray
    labels: np.ndarray
    region: np.ndarray | None = None
    name: str = ""
    layers: tuple[str, ...] = ()


def array_digest(a: np.ndarray | None) -> str | None:
    """Short SHA-256 of an array's shape, dtype and bytes (provenance of the training data)."""
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.data.cast("B"))
    return h.hexdigest()[:16]


def _frames(p: TrainingPair) -> list[TrainingPair]:
    """A 2D pair as is; a (Z, H, W) stack as one pair per annotated frame."""
    image, labels, region = np.asarray(p.image), np.asarray(p.labels), p.region
    if region is not None:
        region = np.asarray(region) != 0
        if region.shape != labels.shape and region.shape != labels.shape[-2:]:
            raise InputError(
                f"{p.name}: region mask shape {region.shape} does not match labels shape {labels.shape}"
            )
        if not region.any():
            raise InputError(
                f"{p.name}: the region mask is all zero; mark where the annotation is complete "
                f"(non-zero pixels) or use no region"
            )
    if labels.ndim == 2:
        if image.shape[:2] != labels.shape or image.ndim not in (2, 3):
            raise InputError(
                f"{p.name}: labels shape {labels.shape} does not match image shape "
                f"{image.shape}; expected an image (H, W) or (H, W, C) over the same pixels"
            )
        return [TrainingPair(image, labels, region, p.name, p.layers)]
    if labels.ndim != 3 or image.shape[:3] != labels.shape or image.ndim not in (3, 4):
        raise InputError(
            f"{p.name}: labels shape {labels.shape} does not match image shape {image.shape}; "
            f"expected labels (H, W) or a stack (Z, H, W) with an image of the same shape"
        )
    out = []
    per_slice_region = region is not None and region.ndim == 3
    for z in range(labels.shape[0]):
        reg = None if region is None else (region[z] if per_slice_region else region)
        if labels[z].any() or (per_slice_region and reg is not None and reg.any()):
            out.append(TrainingPair(image[z], labels[z], reg, f"{p.name}[{z}]", p.layers))
    return out


def check_pairs(pairs: list[TrainingPair] | list[tuple]) -> list[TrainingPair]:
    """Validate pairs cheaply (no flows) and split stacks into 2D frames.

    Raises
    ------
    InputError
        No pairs; labels that do not match their image; an all-zero region mask; labels without any
        annotated object (a pair may lack objects only if its region marks confirmed background).
    """
    if not pairs:
        raise InputError("no training data: add at least one (image, labels) pair")
    out: list[TrainingPair] = []
    for i, raw in enumerate(pairs):
        p = TrainingPair(*raw)
        p = p._replace(name=p.name or f"pair {i + 1}")
        labels = np.asarray(p.labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{p.name}: labels must be integers (a labels layer), got dtype {labels.dtype}")
        frames = _frames(p)
        if not labels.any() and p.region is None:
            raise InputError(
                f"{p.name}: the labels contain no annotated objects (all zero); paint at least "
                f"one object, or mark a region of confirmed background"
            )
        out.extend(frames)
    if not any(f.labels.any() and (f.region is None or (f.labels[f.region] > 0).any()) for f in out):
        raise InputError(
            "no annotated objects inside the marked regions: paint at least one object where "
            "the annotation is complete"
        )
    return out


def _box(mask: np.ndarray, margin: int, min_size: int) -> tuple[slice, slice]:
    """Bounding box of ``mask`` grown by ``margin`` and to at least ``min_size``, clipped to the image."""
    box = []
    for axis in (0, 1):
        idx = np.flatnonzero(mask.any(axis=1 - axis))
        n = mask.shape[axis]
        lo, hi = max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, n)
        size = min(max(hi - lo, min_size), n)
        lo = min(max(lo - (size - (hi - lo)) // 2, 0), n - size)
        box.append(slice(lo, lo + size))
    return box[0], box[1]


def focus(im: AnnotatedImage, margin: int, min_size: int) -> tuple[AnnotatedImage, list[int]]:
    """Crop an annotated image to its region's bounding box (plus ``margin``) so crops land on annotation.

    Cropping happens after :func:`annotate`: normalisation and flows are those of the whole image.
    Returns the cropped image and its box ``[y0, y1, x0, x1]``.
    """
    h, w = im.shape
    if im.region is None:
        return im, [0, h, 0, w]
    ys, xs = _box(im.region, margin, min_size)
    cropped = AnnotatedImage(
        im.image[:, ys, xs], im.labels[ys, xs], im.flow[:, ys, xs], im.region[ys, xs], im.name
    )
    return cropped, [ys.start, ys.stop, xs.start, xs.stop]


def prepare(
    p: TrainingPair, *, partial: bool, ring: int, margin: int, min_size: int
) -> tuple[AnnotatedImage, list[int]]:
    """Annotate a 2D pair (flows once) and crop it to where the annotation is.

    With ``partial`` and no region, the region is the objects grown by ``ring`` pixels: only the painted
    objects and a thin ring of background around them are taught; the rest carries no loss.
    """
    region = p.region
    if region is None and partial:
        from scipy.ndimage import binary_dilation

        region = binary_dilation(np.asarray(p.labels) > 0, iterations=max(int(ring), 1))
    im = annotate(p.image, p.labels, region, name=p.name)
    return focus(im, margin, min_size)


def _sub(im: AnnotatedImage, ys: slice, xs: slice, suffix: str) -> AnnotatedImage:
    region = None if im.region is None else im.region[ys, xs]
    return AnnotatedImage(
        im.image[:, ys, xs], im.labels[ys, xs], im.flow[:, ys, xs], region, im.name + suffix
    )


def _strip(im: AnnotatedImage, axis: int, sl: slice, suffix: str) -> AnnotatedImage:
    """The rows (``axis`` 0) or columns (1) ``sl`` of ``im``."""
    full = slice(None)
    return _sub(im, sl, full, suffix) if axis == 0 else _sub(im, full, sl, suffix)


def _has_objects(im: AnnotatedImage) -> bool:
    return bool((im.labels > 0).any() if im.region is None else (im.labels[im.region] > 0).any())


def _annotated(im: AnnotatedImage) -> bool:
    return im.region is None or bool(im.region.any())


def split_validation(
    images: list[AnnotatedImage], fraction: float, seed: int
) -> tuple[list[AnnotatedImage], list[AnnotatedImage], str]:
    """Hold out a ``fraction`` of the data for validation; returns ``(train, val, description)``.

    Several images: whole images (frames, pairs) are held out, chosen with ``seed``, keeping at least one
    training image with objects. One image: a strip at one end of its longer side is held out (the first
    end whose both parts remain usable). When no split is possible there is no validation and the
    description says why.
    """
    if fraction <= 0:
        return images, [], "none"
    if len(images) >= 2:
        order = np.random.default_rng(seed).permutation(len(images))
        k = min(max(1, round(fraction * len(images))), len(images) - 1)
        for shift in range(len(images)):
            val_idx = {int(i) for i in np.roll(order, shift)[:k]}
            train = [im for i, im in enumerate(images) if i not in val_idx]
            if any(_has_objects(im) for im in train):
                val = [im for i, im in enumerate(images) if i in val_idx]
                return train, val, f"{k} of {len(images)} images held out: {', '.join(im.name for im in val)}"
        return images, [], "none: too few annotated images to hold any out"
    im = images[0]
    axis = int(np.argmax(im.shape))
    n = im.shape[axis]
    cut = round(n * min(fraction, 0.5))
    if cut < 8:
        return images, [], f"none: the annotated area is too small ({n} px) to hold out a strip"
    for val_sl, train_sl, where in (
        (slice(n - cut, n), slice(0, n - cut), "end"),
        (slice(0, cut), slice(cut, n), "start"),
    ):
        val_im = _strip(im, axis, val_sl, " (validation strip)")
        train_im = _strip(im, axis, train_sl, "")
        if _has_objects(train_im) and _annotated(val_im):
            axis_name = "rows" if axis == 0 else "columns"
            return [train_im], [val_im], f"strip of {cut} {axis_name} at the {where} of {im.name} held out"
    return images, [], "none: no strip leaves annotated objects on both sides"
