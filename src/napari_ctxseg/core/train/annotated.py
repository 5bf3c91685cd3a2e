"""Annotated training images: the normalised image, its labels, flows and complete-annotation region.

Layouts: an :class:`AnnotatedImage` keeps the image as float32 (C, H, W) (normalised exactly as at
inference by :func:`~napari_ctxseg.core.preprocess.normalize.model_input`), labels (H, W), flows (2, H, W)
channels (dy, dx) and an optional region (H, W) bool marking where the annotation is complete. Flows are
computed once per image (:func:`~napari_ctxseg.core.flows.from_masks.mask_to_flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..flows.from_masks import mask_to_flow
from ..preprocess.normalize import model_input

__all__ = ["AnnotatedImage", "acquisition_key", "annotate"]


@dataclass
class AnnotatedImage:
    """One training image with its labels, flows and optional complete-annotation region."""

    image: np.ndarray  # (C, H, W) float32, normalised
    labels: np.ndarray  # (H, W) int32
    flow: np.ndarray  # (2, H, W) float32
    region: np.ndarray | None = None  # (H, W) bool; None = complete everywhere
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.labels.shape


def annotate(
    image: np.ndarray, labels: np.ndarray, region: np.ndarray | None = None, *, name: str = ""
) -> AnnotatedImage:
    """Validate an (image, labels[, region]) pair and compute its flows once.

    Raises
    ------
    InputError
        Shapes differ, labels are not integers, or (with a region) no object lies in it.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"{name or 'labels'}: expected 2D labels (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name or 'labels'}: expected integer labels, got dtype {labels.dtype}")
    img = model_input(image)
    if img.shape[1:] != labels.shape:
        raise InputError(
            f"{name or 'image'}: image shape {np.asarray(image).shape} does not match labels "
            f"shape {labels.shape}"
        )
    if region is not None:
        region = np.asarray(region).astype(bool)
        if region.shape != labels.shape:
            raise InputError(
                f"{name or 'region'}: region shape {region.shape} does not match labels shape {labels.shape}"
            )
        if not region.any():
            raise InputError(
                f"{name or 'region'}: the region mask is empty; mark where the annotation is complete"
            )
    labels = labels.astype(np.int32)
    return AnnotatedImage(img, labels, mask_to_flow(labels).astype(np.float32), region, name)


def acquisition_key(image: AnnotatedImage) -> tuple[int, ...]:
    """A proxy for "same acquisition" when a data set has no such metadata: (height, width, grey or colour).

    In DSB 2018 the images of one experiment share their size and modality, so images with equal keys
    serve as context references for each other (:class:`CropSampler` ``groups``).
    """
    c = image.image
    grey = bool(np.array_equal(c[0], c[1]) and np.array_equal(c[1], c[2])) if c.shape[0] >= 3 else True
    return (*image.shape, int(grey))
