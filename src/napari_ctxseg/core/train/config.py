"""Settings of a training run: :class:`TrainConfig`, validated, stored as JSON with the training state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..diffusion.train_schedules import get_schedule
from ..errors import ConfigError
from .augment import AugmentConfig
from .data import check_image_sampling

__all__ = ["MAX_CROP_SIZE", "PRECISIONS", "TrainConfig"]

PRECISIONS = ("fp32", "bf16")  # training arithmetic: float32, or bfloat16 autocast
#: larger training crops hold too much memory per batch (and teach nothing that tiles of this size do not)
MAX_CROP_SIZE = 2048


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Parameters
    ----------
    steps
        Optimiser steps.
    batch_size, crop_size
        Samples per step and their square size.
    lr, weight_decay, grad_clip
        AdamW learning rate (cosine decay to 10 % after a linear warm-up), weight decay, and the global
        gradient-norm clip.
    ema_decay
        EMA of the weights (the saved model is the EMA).
    schedule, p_sigma_max
        Training noise schedule (``"edm"``, ``"edmhat"``, ``"ncsn2"``) and the probability of training at
        sigma_max instead: one-step inference evaluates the denoiser at sigma_max only, which the
        log-normal EDM schedule almost never visits.
    weighting
        ``"unit"`` (default): loss weight 1 / c_out(sigma)^2, so the network output F has the same weight
        at every noise level (EDM's design rule, applied to ctxseg's c_out). ``"schedule"``: the
        schedule's own weight, as the original; with ctxseg's c_out = sqrt(s sd / (s^2 + sd^2)) its
        effective weight on F is 1 / (sigma sd), 6400 times smaller at sigma 80 than at 0.0125, and the
        one-step (sigma_max) prediction barely learns in a short run.
    sigma_data, sigma_max
        EDM sigma_data (stored in the checkpoint) and the sigma of one-step inference.
    p_no_context, partial_prob
        Context pairs: probability of a sample without context, and of a partially annotated reference.
    p_other_reference
        Probability that a reference comes from another image of the same acquisition group
        (:func:`~napari_ctxseg.core.train.data.acquisition_key`) instead of the sample's own image.
    p_subset
        Probability that a sample with a context is a subset task (only the larger or only the smaller
        objects annotated, in the sample and its reference; see
        :class:`~napari_ctxseg.core.train.data.CropSampler`). 0 (default) draws nothing.
    augment
        Crop augmentation.
    image_sampling
        How often each training image is drawn: ``"sqrt-area"`` (default) or ``"area"`` (area after the
        ``target_diameter`` rescaling: every object about equally likely); see
        :class:`~napari_ctxseg.core.train.data.CropSampler`.
    val_every
        Steps between validation losses (0: never).
    seed
        Seed of everything random.
    time_budget_s
        Wall-clock budget of the training loop in seconds (0: none). With a budget the run ends at
        ``steps`` or when the budget is spent, whichever comes first, and the learning-rate schedule
        follows whichever is further along, so a run stopped by time still ends on a decayed rate.
    precision
        ``"fp32"`` (default) or ``"bf16"``: forward and loss under ``torch.autocast`` with bfloat16
        (weights, optimiser state and EMA stay float32). On CPUs with AVX-512 BF16 / AMX and on recent
        GPUs it trains faster (benchmarks/bench_training.py); on other CPUs it can be slower.
    """

    steps: int = 1000
    batch_size: int = 8
    crop_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup: int = 100
    ema_decay: float = 0.999
    schedule: str = "edm"
    p_sigma_max: float = 0.5
    weighting: str = "unit"
    sigma_data: float = 1.0
    sigma_max: float = 80.0
    p_no_context: float = 0.5
    partial_prob: float = 0.5
    p_other_reference: float = 0.0
    p_subset: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_sampling: str = "sqrt-area"
    val_every: int = 100
    val_batches: int = 4
    seed: int = 0
    time_budget_s: float = 0.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            aug = dict(self.augment)
            aug["scale_range"] = tuple(aug.get("scale_range", (0.5, 2.0)))
            object.__setattr__(self, "augment", AugmentConfig(**aug))
        for name in ("steps", "batch_size", "crop_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= int(self.seed) <= 2**63 - 1:
            raise ConfigError(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        if self.crop_size > MAX_CROP_SIZE:
            raise ConfigError(
                f"crop_size must be at most {MAX_CROP_SIZE} pixels, got {self.crop_size} (a batch of "
                f"{self.batch_size} crops that size needs about "
                f"{self.batch_size * self.crop_size**2 * 64 / 2**30:.3g} GiB before the network's own memory)"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not all(
            0 <= p <= 1 for p in (self.p_sigma_max, self.p_no_context, self.p_other_reference, self.p_subset)
        ):
            raise ConfigError(
                "p_sigma_max, p_no_context, p_other_reference and p_subset must be probabilities in [0, 1]"
            )
        if not self.time_budget_s >= 0:
            raise ConfigError(f"time_budget_s must be >= 0 (0 = none), got {self.time_budget_s}")
        get_schedule(self.schedule)
        if self.weighting not in ("unit", "schedule"):
            raise ConfigError(f"unknown weighting {self.weighting!r}; expected 'unit' or 'schedule'")
        check_image_sampling(self.image_sampling)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the settings (stored with the training state)."""
        d = asdict(self)
        d["augment"]["scale_range"] = list(d["augment"]["scale_range"])
        return d
