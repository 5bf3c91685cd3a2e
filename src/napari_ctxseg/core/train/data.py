"""Training data: random crops of annotated images with augmentation, context pairs, batch streams.

:class:`CropSampler` draws square crops of :class:`~napari_ctxseg.core.train.annotated.AnnotatedImage`
objects (and context crops) into :class:`~napari_ctxseg.core.train.batch.Batch` objects;
:class:`BatchStream` streams them to DataLoader workers. The training data types are importable from here
too (this module is the one import of the training data API).

Flows are transformed with the crop: rescaling resizes them bilinearly and renormalises them to unit length
inside objects, flips negate a component, transposes swap the components. Pixels outside the region carry
no loss (partial annotations are not taught as background).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..flows.from_masks import flip_flow, flip_spatial
from ..flows.postprocess import median_diameter
from .annotated import AnnotatedImage, acquisition_key, annotate
from .augment import AugmentConfig, dim_objects, intensity, partial_region
from .batch import Batch

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
]


def check_image_sampling(value: str) -> str:
    """Return ``value`` if it is one of :data:`IMAGE_SAMPLING`; raise :class:`ConfigError` otherwise."""
    if value not in IMAGE_SAMPLING:
        raise ConfigError(f"unknown image_sampling {value!r}; expected one of {IMAGE_SAMPLING}")
    return value


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
            imgs.append(intensity(dim_objects(image, labels, self.augment, self.rng), self.augment, self.rng))
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
                    r_region = r_region & partial_region(r_labels, self.rng)
                threshold = self._median_area[index]
                if self.p_subset and self.rng.random() < self.p_subset and threshold > 0:
                    large = bool(self.rng.integers(2))
                    keep, ambiguous = self._subset(index, labels, large, threshold)
                    flows[-1] = flow * keep[None]
                    weights[-1] = weights[-1] * (~ambiguous)[None]
                    r_keep, r_ambiguous = self._subset(ref_index, r_labels, large, threshold)
                    r_flow = r_flow * r_keep[None]
                    r_region = r_region & ~r_ambiguous
                r_imgs.append(intensity(r_image, self.augment, self.rng))
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
