"""Image preprocessing shared by training and inference (numpy, channels-last (H, W[, C]) in and out).

The one normalisation used everywhere is :func:`normalize_image`: per image (all channels together),
the 1st and 99.8th percentiles map to 0 and 1 (values outside are kept, not clipped, so bright objects
keep their contrast). This is more robust to hot pixels than the original's ``image / image.max()``.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["center_crop", "normalize_image", "pad_channel"]

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8


def normalize_image(
    image: np.ndarray, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE
) -> np.ndarray:
    """Percentile-normalise an image to float32: ``(x - p_low) / (p_high - p_low)``.

    Parameters
    ----------
    image
        (H, W) or (H, W, C) numeric array.
    low, high
        Percentiles mapped to 0 and 1.

    Returns
    -------
    np.ndarray
        float32 array of the same shape.

    Raises
    ------
    InputError
        Empty image, non-finite values (NaN/inf), or a constant image (nothing to segment).

    Examples
    --------
    >>> normalize_image(np.array([[0, 50], [100, 200]])).dtype
    dtype('float32')
    """
    image = np.asarray(image)
    if image.size == 0:
        raise InputError(f"the image is empty (shape {image.shape})")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise InputError(f"expected a real-valued image, got dtype {image.dtype}")
    x = image.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        n_bad = int((~np.isfinite(x)).sum())
        raise InputError(f"the image contains {n_bad} NaN or infinite values; expected finite numbers")
    lo, hi = np.percentile(x, [low, high])
    if hi - lo <= 1e-12 * max(1.0, abs(float(hi))):
        lo, hi = float(x.min()), float(x.max())
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            raise InputError(f"the image is constant (every pixel is {lo:g}); there is nothing to segment")
    return ((x - lo) / (hi - lo)).astype(np.float32, copy=False)


def pad_channel(image: np.ndarray) -> np.ndarray:
    """3 channels as the original: grey repeated, 2 channels + a zero one. (H, W[, C]) -> (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] > 3:
        raise InputError(f"expected (H, W) or (H, W, C<=3), got shape {image.shape}")
    c = image.shape[-1]
    if c == 1:
        return np.concatenate([image] * 3, axis=-1)
    if c == 2:
        return np.concatenate([image, np.zeros_like(image[..., :1])], axis=-1)
    return image


def center_crop(image: np.ndarray, mask: np.ndarray | None = None, *, crop_size: int = 512):
    """The original's centre crop: pad bottom/right with zeros up to ``crop_size``, then take the centre.

    Returns the cropped (H, W, C) image, or ``(image, mask)`` when a mask is given.
    """
    if image.ndim == 2:
        image = image[..., None]
    h, w = image.shape[:2]
    if mask is not None and mask.shape != (h, w):
        raise InputError(f"mask shape {mask.shape} does not match image shape {(h, w)}")
    pad = [(0, max(0, crop_size - h)), (0, max(0, crop_size - w))]
    if any(p[1] for p in pad):
        image = np.pad(image, [*pad, (0, 0)])
        mask = None if mask is None else np.pad(mask, pad)
        h, w = image.shape[:2]
    sl = (
        slice((h - crop_size) // 2, (h + crop_size) // 2),
        slice((w - crop_size) // 2, (w + crop_size) // 2),
    )
    return image[sl] if mask is None else (image[sl], mask[sl])
