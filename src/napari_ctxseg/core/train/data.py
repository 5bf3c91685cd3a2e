"""Training data: annotated images, random crops with augmentation, and context pairs.

Layouts: an :class:`AnnotatedImage` keeps the image as float32 (C, H, W) (normalised exactly as at
inference by :func:`model_input`), labels (H, W), flows (2, H, W) channels (dy, dx) and an optional region
(H, W) bool marking where the annotation is complete. Batches are NCHW torch tensors.

Flows are computed once per image (:func:`mask_to_flow`) and transformed with the crop: rescaling resizes
them bilinearly and renormalises them to unit length inside objects, flips negate a component, transposes
swap the components. Pixels outside the region carry no loss (partial annotations are not taught as
background).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation, find_objects, gaussian_filter

from ..errors import ConfigError, InputError
from ..flows.from_masks import flip_flow, flip_spatial, mask_to_flow
from ..flows.postprocess import median_diameter
from ..preprocess.normalize import normalize_image

#: how :class:`CropSampler` weights images when drawing crops (see its ``image_sampling``)
IMAGE_SAMPLING = ("sqrt-area", "area")

__all__ = [
    "IMAGE_SAMPLING",
    "AnnotatedImage",
    "AugmentConfig",
    "Batch",
    "BatchStream",
    "CropSampler",
    "acquisition_key",
    "annotate",
    "check_image_sampling",
    "model_input",
]


def check_image_sampling(value: str) -> str:
    """Return ``value`` if it is one of :data:`IMAGE_SAMPLING`; raise :class:`ConfigError` otherwise."""
    if value not in IMAGE_SAMPLING:
        raise ConfigError(f"unknown image_sampling {value!r}; expected one of {IMAGE_SAMPLING}")
    return value


def model_input(
    image: np.ndarray, channels: int = 3, *, limits: tuple[float, float] | None = None
) -> np.ndarray:
    """Numpy image (H, W) or (H, W, C) -> normalised float32 (channels, H, W): the one layout change.

    Grey images are repeated to 3 channels and 2-channel images padded with a zero channel, as the
    original's ``pad_channel``; more than ``channels`` channels raise :class:`InputError`. ``limits``:
    the intensities mapped to 0 and 1 (default: the image's own percentiles; see
    :func:`~napari_ctxseg.core.preprocess.normalize.normalize_image`).
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
    if c == 1:
        norm = np.repeat(norm, channels, axis=-1)
    elif c < channels:
        norm = np.concatenate([norm, np.zeros(norm.shape[:2] + (channels - c,), np.float32)], axis=-1)
    return np.ascontiguousarray(norm.transpose(2, 0, 1), dtype=np.float32)


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


@dataclass
class Batch:
    """A training batch (NCHW). ``weight`` is 1 where the loss applies (inside the complete region)."""

    image: torch.Tensor  # (B, C, S, S)
    flow: torch.Tensor  # (B, 2, S, S)
    weight: torch.Tensor  # (B, 1, S, S)
    ref_image: torch.Tensor | None = None
    ref_flow: torch.Tensor | None = None
    ref_mask: torch.Tensor | None = None  # (B, S, S) bool
    context_weight: torch.Tensor | None = None  # (B,) 1 = use context, 0 = none
    names: list[str] = field(default_factory=list)
    #: packed batches only (:meth:`packed`): the rows of the batch that the ``ref_*`` tensors hold
    ref_rows: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (called by a DataLoader with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    def packed(self) -> Batch:
        """A smaller copy for handing over between processes and to the GPU; :meth:`unpacked` undoes it.

        Floating-point tensors become float16 (images and flows are O(1), so this rounds them by at most
        about 5e-4 of their value; ``weight`` of 0 / 1 stays exact) and the references keep only the rows
        whose ``context_weight`` is non-zero (the others are all-zero and never encoded). With most samples
        trained without a context (``p_no_context`` 0.8) a batch shrinks about 3x.
        """
        out = self._map(lambda t: t.half() if t.is_floating_point() and t.dim() > 1 else t)
        if self.ref_image is not None and self.context_weight is not None and self.ref_rows is None:
            rows = torch.nonzero(self.context_weight != 0).flatten()
            out.ref_rows = rows
            out.ref_image, out.ref_flow, out.ref_mask = (
                None if t is None else t.index_select(0, rows)
                for t in (out.ref_image, out.ref_flow, out.ref_mask)
            )
        return out

    def unpacked(self, dtype: torch.dtype = torch.float32) -> Batch:
        """The full batch again (on the same device): ``dtype`` floats and a reference row per sample.

        A batch that was not packed comes back with its floating-point tensors in ``dtype``.
        """
        out = self._map(lambda t: t.to(dtype) if t.is_floating_point() and t.dim() > 1 else t)
        if self.ref_rows is not None:
            rows, n = self.ref_rows.to(self.image.device), self.image.shape[0]

            def scatter(t: torch.Tensor | None) -> torch.Tensor | None:
                if t is None:
                    return None
                full = t.new_zeros((n, *t.shape[1:]))
                return full.index_copy_(0, rows, t)

            out.ref_image, out.ref_flow, out.ref_mask = (
                scatter(out.ref_image),
                scatter(out.ref_flow),
                scatter(out.ref_mask),
            )
            out.ref_rows = None
        return out

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return Batch(
            fn(self.image),
            fn(self.flow),
            fn(self.weight),
            mv(self.ref_image),
            mv(self.ref_flow),
            mv(self.ref_mask),
            mv(self.context_weight),
            self.names,
            mv(self.ref_rows),
        )


def _renormalise(flow: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    norm = flow.square().sum(0, keepdim=True).sqrt()
    return torch.where(inside, flow / norm.clamp_min(1e-6), torch.zeros_like(flow))


class CropSampler:
    """Draws augmented square crops (and context crops) from annotated images.

    Parameters
    ----------
    images
        The training images.
    crop_size
        Side of the crops (a multiple of the model stride).
    augment
        Augmentation settings.
    p_no_context
        Probability that a sample is trained without context (one model serves both uses).
    partial_prob
        Probability that a context crop is only partially annotated (random rectangles), teaching the
        model to use incomplete annotations.
    seed
        Seed of the numpy generator that makes every random choice (deterministic).
    groups
        One key per image (e.g. from :func:`acquisition_key`): images with the same key are taken to be
        of the same kind of object and acquisition. ``None``: every image is its own group.
    p_other_reference
        Probability that a context reference is cropped from *another* image of the sample's group (when
        the group has one), rather than from the same image: in use, the reference is a different image
        of the same kind, and a same-image crop lets the model copy instead of transfer.
    image_sampling
        How often each image is drawn. ``"sqrt-area"`` (default): in proportion to the square root of its
        pixel count, so large images are seen more and small ones still often. ``"area"``: in proportion
        to its area *after* the ``target_diameter`` rescaling, so every pixel of the rescaled images, and
        so roughly every object, is equally likely to fall in a crop (pooled metrics count objects; with
        ``"sqrt-area"`` an object of a large image of small nuclei is drawn several times less often than
        one of a small image).
    image_weights
        Optional factor per image multiplying the ``image_sampling`` weight, e.g. to give each data set
        of a mixture a fixed share of the crops whatever its number of images.
    p_subset
        Probability that a sample *with* a context is a subset task: only the objects larger (or, at
        even odds, not larger) than the median object of the sample's image are annotated, in the
        sample and in its reference alike, so that only the context says which objects are wanted.
        Objects within 25 % of the median area are left out of the loss and of the reference's region.
        Samples without a context always keep every object. The default 0 draws nothing.
    """

    def __init__(
        self,
        images: Sequence[AnnotatedImage],
        crop_size: int = 128,
        *,
        augment: AugmentConfig | None = None,
        p_no_context: float = 0.5,
        partial_prob: float = 0.5,
        seed: int = 0,
        groups: Sequence[Hashable] | None = None,
        p_other_reference: float = 0.0,
        image_sampling: str = "sqrt-area",
        image_weights: Sequence[float] | None = None,
        p_subset: float = 0.0,
    ) -> None:
        if not images:
            raise InputError("no training images")
        if groups is not None and len(groups) != len(images):
            raise InputError(f"{len(groups)} group keys for {len(images)} images; expected one per image")
        self.images = list(images)
        self.crop_size = int(crop_size)
        self.augment = augment or AugmentConfig()
        self.p_no_context = float(p_no_context)
        self.partial_prob = float(partial_prob)
        check_image_sampling(image_sampling)
        self.rng = np.random.default_rng(seed)
        self.p_other_reference = float(p_other_reference)
        if not 0.0 <= p_subset <= 1.0:
            raise ConfigError(f"p_subset must be within [0, 1], got {p_subset}")
        self.p_subset = float(p_subset)
        # object areas per label id (original pixels) and the median object area of each image
        self._areas = [np.bincount(im.labels.ravel()).astype(np.float32) for im in self.images]
        self._median_area = [
            float(np.median(a[1:][a[1:] > 0])) if (a[1:] > 0).sum() >= 4 else 0.0 for a in self._areas
        ]
        # per-image rescale that brings its median object diameter to augment.target_diameter
        target = self.augment.target_diameter
        self._base_scale = np.ones(len(self.images))
        if target:
            for i, im in enumerate(self.images):
                d = median_diameter(im.labels)
                self._base_scale[i] = float(np.clip(target / d, 0.25, 4.0)) if d > 0 else 1.0
        areas = np.array([im.labels.size for im in self.images], dtype=np.float64)
        weights = np.sqrt(areas) if image_sampling == "sqrt-area" else areas * self._base_scale**2
        if image_weights is not None:
            factors = np.asarray(image_weights, dtype=np.float64)
            if factors.shape != weights.shape or not np.all(factors >= 0) or not factors.sum() > 0:
                raise InputError(
                    f"image_weights must be {len(weights)} non-negative numbers, not all 0; "
                    f"got shape {factors.shape}"
                )
            weights = weights * factors
        self._p = weights / weights.sum()
        keys = list(groups) if groups is not None else list(range(len(self.images)))
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        # for every image, the other images of its group
        self._others = [[j for j in members[key] if j != i] for i, key in enumerate(keys)]

    # ---- geometry -------------------------------------------------------------------------------
    def _crop(
        self, im: AnnotatedImage, scale: float, flips: tuple[bool, bool, bool]
    ) -> tuple[torch.Tensor, ...]:
        s = self.crop_size
        src = max(2, int(round(s / scale)))
        h, w = im.shape
        y0 = int(self.rng.integers(0, max(h - src, 0) + 1))
        x0 = int(self.rng.integers(0, max(w - src, 0) + 1))
        sl = (slice(y0, y0 + src), slice(x0, x0 + src))
        image = torch.from_numpy(im.image[(slice(None), *sl)])
        flow = torch.from_numpy(im.flow[(slice(None), *sl)])
        labels = torch.from_numpy(im.labels[sl])
        region = (
            torch.ones_like(labels, dtype=torch.bool)
            if im.region is None
            else torch.from_numpy(im.region[sl])
        )
        ph, pw = src - labels.shape[0], src - labels.shape[1]
        if ph or pw:  # image smaller than the crop: pad, and teach nothing about the padding
            image = F.pad(image, (0, pw, 0, ph))
            flow = F.pad(flow, (0, pw, 0, ph))
            labels = F.pad(labels, (0, pw, 0, ph))
            region = F.pad(region, (0, pw, 0, ph), value=False)
        if src != s:
            image = F.interpolate(
                image[None], size=(s, s), mode="bilinear", align_corners=False, antialias=src > s
            )[0]
            flow = F.interpolate(flow[None], size=(s, s), mode="bilinear", align_corners=False)[0]
            labels = F.interpolate(labels[None, None].float(), size=(s, s), mode="nearest-exact")[0, 0].long()
            region = F.interpolate(region[None, None].float(), size=(s, s), mode="nearest-exact")[0, 0] > 0.5
            flow = _renormalise(flow, labels[None] > 0)
        flip_y, flip_x, transpose = flips
        image, labels, region = (flip_spatial(t, flip_y, flip_x) for t in (image, labels, region))
        flow = flip_flow(flow, flip_y, flip_x)
        if transpose:
            image, labels, region = (
                image.transpose(-1, -2),
                labels.transpose(-1, -2),
                region.transpose(-1, -2),
            )
            flow = flow.transpose(-1, -2).flip(0)  # (dy, dx) -> (dx, dy) of the transposed image
        return image.contiguous(), flow.contiguous(), labels.contiguous(), region.contiguous()

    def _geometry(self, index: int) -> tuple[float, tuple[bool, bool, bool]]:
        lo, hi = self.augment.scale_range
        scale = float(np.exp(self.rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)
        scale *= float(self._base_scale[index])
        flips = tuple(bool(b) for b in self.rng.integers(0, 2, 3)) if self.augment.flips else (False,) * 3
        return scale, flips  # type: ignore[return-value]

    # ---- intensity --------------------------------------------------------------------------------
    def _dim_objects(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Lower the contrast of a random half of the objects (``AugmentConfig.dim_prob``)."""
        a = self.augment
        if not a.dim_prob or self.rng.random() >= a.dim_prob:
            return image
        lab = labels.numpy()
        boxes = find_objects(lab)  # ascending label ids: box k - 1 of object k, None where absent
        ids = np.array([k + 1 for k, box in enumerate(boxes) if box is not None], dtype=np.int64)
        if len(ids) == 0 or lab.all():  # no object, or no background to dim towards
            return image
        chosen = ids[self.rng.random(len(ids)) < 0.5]
        lo, hi = a.dim_factor
        factors = self.rng.uniform(lo, hi, len(chosen))
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

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        a = self.augment
        if a.invert_prob and self.rng.random() < a.invert_prob:
            image = 1.0 - image
        if a.blur_prob and self.rng.random() < a.blur_prob:
            sigma = float(self.rng.uniform(*a.blur_sigma))
            blurred = gaussian_filter(image.numpy(), sigma=(0.0, sigma, sigma), mode="reflect")
            image = torch.from_numpy(blurred)
        if not a.intensity:
            return image
        if image.shape[0] == 3 and not torch.equal(image[0], image[1]) and self.rng.random() < 0.5:
            image = image[torch.from_numpy(self.rng.permutation(3))]
        gamma = float(np.exp(self.rng.uniform(-0.4, 0.4)))
        image = image.clamp_min(0).pow(gamma)
        image = image * float(self.rng.uniform(0.7, 1.3)) + float(self.rng.uniform(-0.1, 0.1))
        if self.rng.random() < 0.3:
            noise = torch.from_numpy(self.rng.standard_normal(image.shape[1:]).astype(np.float32))
            image = image + float(self.rng.uniform(0.0, 0.08)) * noise
        return image

    def _partial_region(self, labels: torch.Tensor) -> torch.Tensor:
        """A random union of rectangles (at least one object inside) marking the annotated part."""
        s = labels.shape[-1]
        region = torch.zeros_like(labels, dtype=torch.bool)
        for _ in range(int(self.rng.integers(1, 4))):
            hh, ww = (int(v) for v in self.rng.integers(s // 4, s + 1, 2))
            y, x = int(self.rng.integers(0, s - hh + 1)), int(self.rng.integers(0, s - ww + 1))
            region[y : y + hh, x : x + ww] = True
        return region

    def _subset(
        self, index: int, labels: torch.Tensor, large: bool, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objects of a crop kept by a subset task, and those too close to the threshold to teach.

        Returns two (S, S) bool masks: the kept objects' pixels, and the ambiguous objects' pixels.
        """
        area = torch.from_numpy(self._areas[index])[labels.long()]
        inside = labels > 0
        log_ratio = torch.log(area.clamp_min(1.0) / threshold)
        keep = inside & ((log_ratio > 0) if large else (log_ratio <= 0))
        ambiguous = inside & (log_ratio.abs() < float(np.log(1.25)))
        return keep, ambiguous

    # ---- batches ---------------------------------------------------------------------------------
    def sample(self, batch_size: int, *, context: bool = True) -> Batch:
        """Draw a batch; with ``context`` every sample also gets a reference crop at the same scale.

        The reference is a crop of the same image, or of another image of its group with probability
        ``p_other_reference``. With ``p_subset``, some samples with a context are subset tasks (see the
        class notes).

        A sample drawn without a context (probability ``p_no_context``; ``context_weight`` 0) gets an
        all-zero reference instead: the model skips references of weight 0, so none is cropped.
        """
        imgs, flows, weights, names = [], [], [], []
        r_imgs, r_flows, r_masks, cw = [], [], [], []
        for _ in range(batch_size):
            index = int(self.rng.choice(len(self.images), p=self._p))
            im = self.images[index]
            scale, flips = self._geometry(index)
            image, flow, labels, region = self._crop(im, scale, flips)
            imgs.append(self._intensity(self._dim_objects(image, labels)))
            flows.append(flow)
            weights.append(region[None].float())
            names.append(im.name)
            if context:
                use = self.rng.random() >= self.p_no_context
                if not use:  # weight 0: the model never encodes this reference, so none is cropped
                    r_imgs.append(torch.zeros_like(imgs[-1]))
                    r_flows.append(torch.zeros_like(flow))
                    r_masks.append(torch.zeros_like(region))
                    cw.append(0.0)
                    continue
                ref_index = index
                others = self._others[index]
                if others and self.p_other_reference and self.rng.random() < self.p_other_reference:
                    ref_index = others[int(self.rng.integers(len(others)))]
                ref = self.images[ref_index]
                r_image, r_flow, r_labels, r_region = self._crop(ref, scale, self._geometry(index)[1])
                if self.rng.random() < self.partial_prob:
                    r_region = r_region & self._partial_region(r_labels)
                threshold = self._median_area[index]
                if self.p_subset and self.rng.random() < self.p_subset and threshold > 0:
                    large = bool(self.rng.integers(2))
                    keep, ambiguous = self._subset(index, labels, large, threshold)
                    flows[-1] = flow * keep[None]
                    weights[-1] = weights[-1] * (~ambiguous)[None]
                    r_keep, r_ambiguous = self._subset(ref_index, r_labels, large, threshold)
                    r_flow = r_flow * r_keep[None]
                    r_region = r_region & ~r_ambiguous
                r_imgs.append(self._intensity(r_image))
                r_flows.append(torch.where(r_region[None], r_flow, torch.zeros_like(r_flow)))
                r_masks.append(r_region)
                cw.append(1.0)
        batch = Batch(torch.stack(imgs), torch.stack(flows), torch.stack(weights), names=names)
        if context:
            batch.ref_image = torch.stack(r_imgs)
            batch.ref_flow = torch.stack(r_flows)
            batch.ref_mask = torch.stack(r_masks)
            batch.context_weight = torch.tensor(cw)
        return batch


class BatchStream(torch.utils.data.IterableDataset):
    """An endless stream of batches from a :class:`CropSampler`, for DataLoader worker processes.

    Each worker draws from its own copy of the sampler with a numpy generator seeded from
    ``(*seed, worker index)`` and uses one torch thread (the workers already run in parallel). Iterated
    without workers, it draws from a copy seeded from ``(*seed, 0)``. It yields :meth:`Batch.packed`
    batches (float16, references of context samples only): call :meth:`Batch.unpacked` on each, after
    moving it to the training device.

    Parameters
    ----------
    sampler
        The crop sampler (its images are shared with the workers, not copied, where the platform forks).
    batch_size
        Samples per batch.
    context
        Draw context pairs (CtxSegP).
    seed
        Entropy of the workers' generators, e.g. ``(cfg.seed, start_step)``.
    pack
        Yield :meth:`Batch.packed` batches (default; ``False`` only to measure what packing saves:
        ``benchmarks/bench_loader.py``).
    """

    def __init__(
        self,
        sampler: CropSampler,
        batch_size: int,
        *,
        context: bool,
        seed: Sequence[int] = (0,),
        pack: bool = True,
    ) -> None:
        super().__init__()
        self.sampler, self.batch_size, self.context = sampler, int(batch_size), bool(context)
        self.seed = [int(v) for v in seed]
        self.pack = bool(pack)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None:
            torch.set_num_threads(1)
        sampler = copy.copy(self.sampler)
        sampler.rng = np.random.default_rng([*self.seed, worker])
        while True:  # packed: the batches cross a process boundary (and usually go on to a GPU)
            batch = sampler.sample(self.batch_size, context=self.context)
            yield batch.packed() if self.pack else batch
