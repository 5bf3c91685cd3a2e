"""Random augmentation of training crops: its settings and the intensity changes.

The geometric part (rescale, flips, transposes) moves the flows with the image and lives with the crops
(:class:`~napari_ctxseg.core.train.data.CropSampler`); the functions here change intensities only, so the
labels and flows stay as they are. Every random draw comes from the ``numpy.random.Generator`` passed in.
Crops are torch ``(C, S, S)`` images and ``(S, S)`` labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import binary_dilation, find_objects, gaussian_filter

from ..errors import ConfigError

__all__ = ["AugmentConfig", "dim_objects", "intensity", "partial_region"]


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of training crops.

    Parameters
    ----------
    scale_range
        Log-uniform rescale factor range (object diameters of DSB nuclei, ~10-40 px, then cover ~5-80 px).
    flips
        Random flips and transposes (the 8 symmetries of the square).
    intensity
        Random gamma, contrast, offset, noise and (RGB) channel order.
    invert_prob
        Probability of inverting intensities (bright-field vs fluorescence look).
    blur_prob, blur_sigma
        Probability of a Gaussian blur of the crop (out-of-focus and dim, densely packed nuclei), with a
        standard deviation drawn uniformly from ``blur_sigma`` (pixels of the crop). It comes before gamma,
        contrast and noise, so added noise stays sharp, as a camera's would. The default 0 draws nothing,
        so runs without it are reproduced exactly.
    dim_prob, dim_factor
        Probability that a crop has some of its objects dimmed: each object, with probability 1/2, and the
        background within 2 px of it have their contrast to the median of the background 3-6 px around
        it multiplied by a factor drawn uniformly from ``dim_factor``. The labels and flows are
        unchanged, so the model learns to find faint nuclei among bright ones (which a global gamma or
        contrast change does not teach). Before the blur. The default 0 draws nothing.
    target_diameter
        ``None``: ``scale_range`` applies to the images as they are. A number of pixels: each image is
        first rescaled so that the median diameter of its objects becomes this (as ``diameter="auto"``
        does at inference), and ``scale_range`` jitters around that.
    """

    scale_range: tuple[float, float] = (0.5, 2.0)
    flips: bool = True
    intensity: bool = True
    invert_prob: float = 0.1
    target_diameter: float | None = None
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    dim_prob: float = 0.0
    dim_factor: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0.0 < lo <= hi:
            raise ConfigError(f"scale_range must be a range 0 < low <= high, got {self.scale_range}")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ConfigError(f"blur_prob must be within [0, 1], got {self.blur_prob}")
        if not 0.0 <= self.dim_prob <= 1.0:
            raise ConfigError(f"dim_prob must be within [0, 1], got {self.dim_prob}")
        lo, hi = self.dim_factor
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"dim_factor must be a range 0 <= low <= high <= 1, got {self.dim_factor}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ConfigError(f"blur_sigma must be a range 0 < low <= high, got {self.blur_sigma}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation: scale 1, no flips, no intensity changes."""
        return cls(scale_range=(1.0, 1.0), flips=False, intensity=False, invert_prob=0.0)


def dim_objects(
    image: torch.Tensor, labels: torch.Tensor, augment: AugmentConfig, rng: np.random.Generator
) -> torch.Tensor:
    """Lower the contrast of a random half of the objects of a crop (``AugmentConfig.dim_prob``).

    ``image`` is ``(C, S, S)``, ``labels`` ``(S, S)``; draws from ``rng`` only when ``dim_prob`` is set.
    """
    a = augment
    if not a.dim_prob or rng.random() >= a.dim_prob:
        return image
    lab = labels.numpy()
    boxes = find_objects(lab)  # ascending label ids: box k - 1 of object k, None where absent
    ids = np.array([k + 1 for k, box in enumerate(boxes) if box is not None], dtype=np.int64)
    if len(ids) == 0 or lab.all():  # no object, or no background to dim towards
        return image
    chosen = ids[rng.random(len(ids)) < 0.5]
    lo, hi = a.dim_factor
    factors = rng.uniform(lo, hi, len(chosen))
    out = image.clone()
    for k, f in zip(chosen.tolist(), factors):
        # the object and the background within 2 px of it (annotations end inside the visible
        # rim of a nucleus), pulled towards the median of the background 3-6 px around it
        sl = tuple(slice(max(0, b.start - 6), b.stop + 6) for b in boxes[k - 1])
        obj, bg = lab[sl] == k, lab[sl] == 0
        near = binary_dilation(obj, iterations=2)
        ring = binary_dilation(obj, iterations=6) & ~near & bg
        if not ring.any():
            continue
        region = torch.from_numpy(obj | (near & bg))
        window = out[(slice(None), *sl)]
        level = window[:, torch.from_numpy(ring)].median(dim=1).values.view(-1, 1)
        window[:, region] = level + float(f) * (window[:, region] - level)
    return out


def intensity(image: torch.Tensor, augment: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Invert, blur, permute the colours of and change gamma, contrast, offset and noise of a crop.

    ``image`` is ``(C, S, S)``; each change as :class:`AugmentConfig` sets it, drawn from ``rng``.
    """
    a = augment
    if a.invert_prob and rng.random() < a.invert_prob:
        image = 1.0 - image
    if a.blur_prob and rng.random() < a.blur_prob:
        sigma = float(rng.uniform(*a.blur_sigma))
        blurred = gaussian_filter(image.numpy(), sigma=(0.0, sigma, sigma), mode="reflect")
        image = torch.from_numpy(blurred)
    if not a.intensity:
        return image
    if image.shape[0] == 3 and not torch.equal(image[0], image[1]) and rng.random() < 0.5:
        image = image[torch.from_numpy(rng.permutation(3))]
    gamma = float(np.exp(rng.uniform(-0.4, 0.4)))
    image = image.clamp_min(0).pow(gamma)
    image = image * float(rng.uniform(0.7, 1.3)) + float(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.3:
        noise = torch.from_numpy(rng.standard_normal(image.shape[1:]).astype(np.float32))
        image = image + float(rng.uniform(0.0, 0.08)) * noise
    return image


def partial_region(labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random union of 1-3 rectangles of an ``(S, S)`` crop marking its annotated part (bool ``(S, S)``)."""
    s = labels.shape[-1]
    region = torch.zeros_like(labels, dtype=torch.bool)
    for _ in range(int(rng.integers(1, 4))):
        hh, ww = (int(v) for v in rng.integers(s // 4, s + 1, 2))
        y, x = int(rng.integers(0, s - hh + 1)), int(rng.integers(0, s - ww + 1))
        region[y : y + hh, x : x + ww] = True
    return region
