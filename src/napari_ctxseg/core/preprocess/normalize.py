"""Image preparation: intensity normalisation, channel padding, centre crop and the model input.

``pad_channel`` and ``center_crop`` follow the original ctxseg ``segmentation/utils.py`` and
``scripts/inference.py`` (``shared/parity/README.md`` items 24-25). Layouts are numpy, channels last:
``(H, W)`` or ``(H, W, C)``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = [
    "HIGH_PERCENTILE",
    "LOW_PERCENTILE",
    "center_crop",
    "intensity_limits",
    "model_input",
    "normalize_image",
    "pad_channel",
]

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8


def intensity_limits(
    image: np.ndarray, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE
) -> tuple[float, float]:
    """The intensities that :func:`normalize_image` maps to 0 and 1: the ``low`` and ``high`` percentiles.

    Parameters
    ----------
    image : np.ndarray
        Any real array; all values are pooled (channels, or the planes of a stack, together).
    low, high : float
        Percentiles (default 1 and 99.8: robust to a few hot or dead pixels).

    Returns
    -------
    (float, float)
        ``(p_low, p_high)``; the minimum and maximum instead when the two percentiles coincide (to 1e-12
        relative) on a non-constant image (e.g. a few bright spots on a flat background).

    Raises
    ------
    InputError
        If the image is empty, holds NaN or infinite values, is constant, if the percentiles are not
        ``0 <= low < high <= 100``, or if the dtype is not numeric.
    """
    return _percentile_limits(_checked_values(image), low, high)


def _percentile_limits(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    if not 0 <= low < high <= 100:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if _flat(lo, hi):
        lo, hi = float(values.min()), float(values.max())
    if _flat(lo, hi):
        raise InputError(f"image is constant (every value is {lo:g}); cannot normalise its contrast")
    return lo, hi


def normalize_image(
    image: np.ndarray,
    low: float = LOW_PERCENTILE,
    high: float = HIGH_PERCENTILE,
    *,
    clip: bool = False,
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """Per-image percentile normalisation: ``(image - p_low) / (p_high - p_low)`` as float32.

    Parameters
    ----------
    image : np.ndarray
        Any real array (e.g. ``(H, W)``, ``(H, W, C)``); all values are pooled (channels together, so that
        colours keep their balance).
    low, high : float
        Percentiles mapped to 0 and 1 (default 1 and 99.8: robust to a few hot or dead pixels, so most
        values fall in [0, 1] and the brightest 0.2 % slightly above).
    clip : bool
        Clip the result to [0, 1].
    limits : (float, float), optional
        The intensities to map to 0 and 1 instead of this image's percentiles, e.g. those of the whole
        stack a plane belongs to (:func:`intensity_limits` of the stack), so that dim planes stay dim.

    Returns
    -------
    np.ndarray
        float32 array of the same shape.

    Raises
    ------
    InputError
        If the image is empty, holds NaN or infinite values, is constant (without ``limits``), if the
        percentiles are not ``0 <= low < high <= 100``, if ``limits`` is not an increasing pair of finite
        numbers, or if the dtype is not numeric.

    Notes
    -----
    See :func:`intensity_limits` for the percentiles. The original divides by ``image.max()``.

    Examples
    --------
    >>> normalize_image(np.array([[0, 50], [100, 200]])).dtype
    dtype('float32')
    >>> normalize_image(np.array([0, 5, 10]), limits=(0, 20)).tolist()
    [0.0, 0.25, 0.5]
    """
    values = _checked_values(image)
    if limits is None:
        lo, hi = _percentile_limits(values, low, high)
    else:
        lo, hi = (float(v) for v in limits)
        if not (np.isfinite([lo, hi]).all() and hi > lo):
            raise InputError(f"intensity limits must be finite with low < high, got {tuple(limits)}")
    if values.dtype == np.float64:  # beyond float32's range: scaled in float64 (halved: hi - lo stays finite)
        out = ((values / 2 - lo / 2) / (hi / 2 - lo / 2)).astype(np.float32)
    else:
        out = (values - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0, 1) if clip else out


def _checked_values(image: np.ndarray) -> np.ndarray:
    """``image`` as float32, refusing non-numeric, empty and non-finite arrays.

    Finite values beyond float32's range (e.g. 1e300 in a float64 image) are kept as float64 instead of
    becoming infinite.
    """
    image = np.asarray(image)
    if np.iscomplexobj(image):
        raise InputError(
            f"image has complex values (dtype {image.dtype}); expected real intensities (take the "
            f"magnitude or the real part first)"
        )
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise InputError(f"image must be a real numeric array, got dtype {image.dtype}")
    if image.size == 0:
        raise InputError(f"image is empty, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        finite = np.isfinite(image)
        if not finite.all():
            bad = int((~finite).sum())
            raise InputError(f"image contains {bad} NaN or infinite values; expected finite intensities")
        if image.dtype.itemsize > 4 and float(np.abs(image).max()) > float(np.finfo(np.float32).max) / 4:
            return image.astype(np.float64)
    return image.astype(np.float32)


def _flat(lo: float, hi: float) -> bool:
    return hi - lo <= 1e-12 * max(1.0, abs(hi))


def pad_channel(image: np.ndarray, channels: int = 3) -> np.ndarray:
    """Make a ``channels``-channel ``(H, W, channels)`` image (the original's ``pad_channel`` for 3).

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` or ``(H, W, 1)`` (grey, repeated), ``(H, W, C)`` with ``1 < C < channels`` (zero
        channels appended) or ``(H, W, channels)`` (returned as is).
    channels : int
        Channels of the result.

    Returns
    -------
    np.ndarray
        ``(H, W, channels)``, same dtype.

    Raises
    ------
    InputError
        For other shapes.

    Examples
    --------
    >>> pad_channel(np.ones((2, 2, 2), np.uint8))[0, 0].tolist()
    [1, 1, 0]
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or not 1 <= image.shape[-1] <= channels:
        raise InputError(
            f"image must be (H, W) or (H, W, C) with C in 1..{channels}, got shape {image.shape}"
        )
    c = image.shape[-1]
    if c == 1:
        return np.repeat(image, channels, axis=-1)
    if c < channels:
        return np.concatenate([image, np.zeros(image.shape[:2] + (channels - c,), image.dtype)], axis=-1)
    return image


def model_input(
    image: np.ndarray, channels: int = 3, *, limits: tuple[float, float] | None = None
) -> np.ndarray:
    """Numpy image (H, W) or (H, W, C) -> normalised float32 (channels, H, W): the one layout change.

    Grey images are repeated to ``channels`` channels and others padded with zero channels
    (:func:`pad_channel`); more than ``channels`` channels raise :class:`InputError`. ``limits``:
    the intensities mapped to 0 and 1 (default: the image's own percentiles; see
    :func:`normalize_image`).

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` or ``(H, W, C)`` intensities, channels last.
    channels : int
        Channels of the model input.
    limits : tuple of float, optional
        Intensities mapped to 0 and 1.

    Returns
    -------
    np.ndarray
        float32 ``(channels, H, W)``, C-contiguous.

    Raises
    ------
    InputError
        For another number of dimensions, too many channels, or values :func:`normalize_image` refuses.

    Examples
    --------
    >>> x = model_input(np.array([[0.0, 1.0], [2.0, 4.0]]), limits=(0.0, 4.0))
    >>> x.shape, x.dtype, x[:, 1, 1].tolist()
    ((3, 2, 2), dtype('float32'), [1.0, 1.0, 1.0])
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise InputError(f"expected a 2D image (H, W) or (H, W, C), got shape {image.shape}")
    c = image.shape[-1]
    if c > channels:
        raise InputError(f"image has {c} channels; expected at most {channels} (H, W, C) with C last")
    norm = normalize_image(image, limits=limits)  # refuses complex values (a cast would drop them)
    return np.ascontiguousarray(pad_channel(norm, channels).transpose(2, 0, 1), dtype=np.float32)


def center_crop(
    image: np.ndarray, mask: np.ndarray | None = None, *, crop_size: int = 512
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Centre crop (or zero-pad) an image, and optionally its mask, to ``crop_size x crop_size``.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` or ``(H, W, C)``; a 2D image gets a channel axis, as in the original.
    mask : np.ndarray, optional
        ``(H, W)`` labels cropped the same way.
    crop_size : int
        Output height and width.

    Returns
    -------
    np.ndarray or tuple of np.ndarray
        ``(crop_size, crop_size, C)``, plus the cropped mask if one was given.

    Raises
    ------
    InputError
        For a wrong image or mask shape or a non-positive crop size.

    Notes
    -----
    An axis shorter than ``crop_size`` is first zero-padded at the end (bottom / right); then the crop
    starts at ``(size - crop_size) // 2``.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise InputError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if int(crop_size) != crop_size or crop_size < 1:
        raise InputError(f"crop_size must be a positive integer, got {crop_size!r}")
    h, w = image.shape[:2]
    if mask is not None and np.shape(mask) != (h, w):
        raise InputError(f"mask must have the image's (H, W) = {(h, w)}, got {np.shape(mask)}")
    pad = [(0, max(0, crop_size - h)), (0, max(0, crop_size - w))]
    image = np.pad(image, [*pad, (0, 0)])
    h, w = image.shape[:2]
    window = tuple(slice((n - crop_size) // 2, (n + crop_size) // 2) for n in (h, w))
    if mask is None:
        return image[window]
    return image[window], np.pad(np.asarray(mask), pad)[window]
