"""Training loop of the P models (SegP / CtxSegP): EDM loss, AdamW, EMA, clipping, resumable state.

:func:`train` is a generator: it yields a :class:`TrainProgress` after every step (loss, samples/s, ETA,
validation loss when computed), so a CLI progress bar and the napari fine-tune widget both drive it and can
stop it between steps. Everything random comes from the seed.

Training state for ``--resume`` is written as safetensors (model, EMA, AdamW moments, RNG states) plus JSON
metadata, atomically; nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from ..diffusion.edm import EDMDenoiser, edm_loss, get_schedule
from ..errors import CheckpointError, ConfigError
from ..nn.models import CtxSegP, SegP
from .data import AugmentConfig, Batch, BatchStream, CropSampler, check_image_sampling

__all__ = [
    "MAX_CROP_SIZE",
    "PRECISIONS",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "Trainer",
    "mixed_max_schedule",
    "train",
    "weighted_edm_loss",
]

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


@dataclass
class TrainProgress:
    """Yielded after every step."""

    step: int
    total: int
    loss: float
    lr: float
    samples_per_s: float
    elapsed_s: float
    eta_s: float
    val_loss: float | None = None
    best_val_loss: float | None = None


@dataclass
class TrainResult:
    """What :func:`train` returns: the EMA model, and the state to resume from."""

    model: SegP
    steps_done: int
    history: list[dict[str, float]]
    best_val_loss: float | None
    best_state: dict[str, torch.Tensor] | None


def mixed_max_schedule(
    base: str, p_max: float, sigma_max: float
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A schedule that draws sigma_max with probability ``p_max`` and the ``base`` schedule otherwise.

    The loss weight at sigma_max is the EDM weight 1/sigma^2 + 1/sigma_data^2.
    """
    base_fn = get_schedule(base)

    def schedule(
        x: torch.Tensor, *, generator: torch.Generator, sigma_data: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, weight = base_fn(x, generator=generator, sigma_data=sigma_data)
        pick = torch.rand(sigma.shape, generator=generator, device=generator.device).to(x.device) < p_max
        sigma = torch.where(pick, torch.full_like(sigma, sigma_max), sigma)
        w_max = 1 / sigma_max**2 + 1 / sigma_data**2
        weight = torch.where(pick, torch.full_like(weight, w_max), weight)
        return sigma, weight

    return schedule


def weighted_edm_loss(
    model: SegP,
    batch: Batch,
    *,
    schedule: Callable[..., Any],
    sigma_data: float,
    generator: torch.Generator,
    weighting: str = "unit",
) -> torch.Tensor:
    """The loss of a training batch: :func:`~napari_ctxseg.core.diffusion.edm.edm_loss` of the model.

    The model is preconditioned with :class:`~napari_ctxseg.core.diffusion.edm.EDMDenoiser`, the batch's
    flows are the targets, its annotated-pixel mask the per-pixel weight, and its image (plus, for a
    context model, the reference) goes to the model.
    """
    kwargs: dict[str, Any] = {"image": batch.image}
    if isinstance(model, CtxSegP) and batch.ref_image is not None:
        kwargs.update(
            image_ref=batch.ref_image,
            flow_ref=batch.ref_flow,
            ref_mask=batch.ref_mask,
            context_weight=batch.context_weight,
        )
    return edm_loss(
        EDMDenoiser(model, sigma_data=sigma_data),
        batch.flow,
        generator=generator,
        sigma_data=sigma_data,
        schedule=schedule,
        weighting=cast(Literal["schedule", "unit"], weighting),
        weight=batch.weight,
        **kwargs,
    )


def _lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 %.

    With a time budget, progress is the larger of the step and the time fractions.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_budget_s > 0:
        t = max(t, elapsed_s / cfg.time_budget_s)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # one fused update of all parameters (a kernel per tensor otherwise: launch-bound on a GPU)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


@torch.no_grad()
def _validation_loss(model: SegP, batches: Sequence[Batch], cfg: TrainConfig, device: torch.device) -> float:
    """Loss on fixed validation batches at fixed noise (comparable across steps)."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    schedule = mixed_max_schedule(cfg.schedule, cfg.p_sigma_max, cfg.sigma_max)
    losses = [
        float(
            weighted_edm_loss(
                model,
                b.to(device),
                schedule=schedule,
                sigma_data=cfg.sigma_data,
                generator=g,
                weighting=cfg.weighting,
            )
        )
        for b in batches
    ]
    return float(np.mean(losses))


class Trainer:
    """Trains ``model`` in place; :meth:`run` yields a :class:`TrainProgress` after every step.

    Parameters
    ----------
    model
        A SegP or CtxSegP (CtxSegP trains with context pairs).
    train_sampler, val_sampler
        Crop samplers of the training and (optional) validation images.
    cfg
        Settings.
    device
        Torch device.
    resume
        A training-state file written by an earlier run (continues at its step, same settings).
    state_path, state_every
        Where and how often to write the resumable training state (atomic).
    workers
        Processes that draw training batches in parallel (a :class:`torch.utils.data.DataLoader` over
        :class:`~napari_ctxseg.core.train.data.BatchStream`); 0 draws them in this process. Use
        workers to keep a GPU busy. Each worker has its own random stream seeded from ``cfg.seed``,
        the worker index and the start step, so a run is repeatable for a given worker count but not
        identical to a run with another count, and a resumed run does not replay the same batches.

    Notes
    -----
    The EMA weights (``self.ema``) and the best validation weights so far (:meth:`best_model`) are
    available between steps, so a caller that stops early still gets a usable model.
    """

    def __init__(
        self,
        model: SegP,
        train_sampler: CropSampler,
        cfg: TrainConfig,
        *,
        val_sampler: CropSampler | None = None,
        device: str | torch.device = "cpu",
        resume: str | os.PathLike | None = None,
        state_path: str | os.PathLike | None = None,
        state_every: int = 200,
        workers: int = 0,
    ) -> None:
        if not isinstance(model, SegP):
            raise ConfigError(f"only SegP/CtxSegP models can be trained here, got {type(model).__name__}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in model.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith("ref_emb") else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.99),
        )
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        self.workers = int(workers)
        # noise and sigmas are drawn on the training device (no host-to-device copy per step)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.sampler = train_sampler
        self.val_sampler = val_sampler
        self.state_path, self.state_every = state_path, state_every
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_val: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        if resume is not None:
            self.step, self.history, self.best_val = _load_state(
                resume, self.model, self.ema, self.opt, self.gen, train_sampler
            )

    def best_model(self) -> SegP:
        """A copy of the best weights so far: best validation EMA if validated, else the current EMA."""
        out = copy.deepcopy(self.ema).cpu().eval()
        if self.best_state is not None:
            out.load_state_dict(self.best_state)
        return out

    def run(self) -> Generator[TrainProgress, None, TrainResult]:
        """Train to ``cfg.steps``, yielding after every step; returns the final EMA model."""
        cfg, model, ema, device = self.cfg, self.model, self.ema, self.device
        context = isinstance(model, CtxSegP)
        schedule = mixed_max_schedule(cfg.schedule, cfg.p_sigma_max, cfg.sigma_max)
        val_batches = (
            [self.val_sampler.sample(cfg.batch_size, context=context) for _ in range(cfg.val_batches)]
            if self.val_sampler is not None and cfg.val_every > 0
            else []
        )
        start = self.step
        batches = self._batches(context, start)
        t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            lr = _lr_at(step, cfg, time.perf_counter() - t0)
            for group in self.opt.param_groups:
                group["lr"] = lr
            batch = next(batches).to(device, non_blocking=True).unpacked()
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = weighted_edm_loss(
                    model,
                    batch,
                    schedule=schedule,
                    sigma_data=cfg.sigma_data,
                    generator=self.gen,
                    weighting=cfg.weighting,
                )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step}: loss {float(loss)}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            _ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
            self.step = step + 1
            elapsed = time.perf_counter() - t0
            done = self.step - start
            out_of_time = cfg.time_budget_s > 0 and elapsed >= cfg.time_budget_s
            last = self.step == cfg.steps or out_of_time
            loss_value = float(loss.detach())
            rec = {"step": self.step, "loss": loss_value, "lr": lr}
            val = None
            if val_batches and (self.step % cfg.val_every == 0 or last):
                val = _validation_loss(ema, val_batches, cfg, device)
                rec["val_loss"] = val
                if self.best_val is None or val < self.best_val:
                    self.best_val = val
                    self.best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
            self.history.append(rec)
            if self.state_path is not None and (self.step % self.state_every == 0 or last):
                _save_state(
                    self.state_path,
                    self.step,
                    model,
                    ema,
                    self.opt,
                    self.gen,
                    self.sampler,
                    self.history,
                    self.best_val,
                    cfg,
                )
            eta = elapsed / done * (cfg.steps - self.step)
            if cfg.time_budget_s > 0:
                eta = max(0.0, min(eta, cfg.time_budget_s - elapsed))
            yield TrainProgress(
                self.step,
                self.step if out_of_time else cfg.steps,
                loss_value,
                lr,
                done * cfg.batch_size / elapsed,
                elapsed,
                0.0 if last else eta,
                val,
                self.best_val,
            )
            if out_of_time:
                break
        model.load_state_dict(ema.state_dict())
        model.eval()
        return TrainResult(model, self.step, self.history, self.best_val, self.best_state)

    def _batches(self, context: bool, start: int) -> Iterator[Batch]:
        """Training batches: drawn here, or by ``self.workers`` DataLoader processes."""
        if self.workers == 0:
            while True:
                yield self.sampler.sample(self.cfg.batch_size, context=context)
        stream = BatchStream(self.sampler, self.cfg.batch_size, context=context, seed=(self.cfg.seed, start))
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4,
        )
        yield from loader


def train(
    model: SegP, train_sampler: CropSampler, cfg: TrainConfig, **kwargs: Any
) -> Generator[TrainProgress, None, TrainResult]:
    """Shorthand for ``Trainer(model, train_sampler, cfg, **kwargs).run()``."""
    return Trainer(model, train_sampler, cfg, **kwargs).run()


# ---- resumable state (safetensors + JSON, never pickle) ---------------------------------------------------


def _save_state(
    path: str | os.PathLike,
    step: int,
    model: SegP,
    ema: SegP,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    sampler: CropSampler,
    history: list[dict[str, float]],
    best_val: float | None,
    cfg: TrainConfig,
) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = gen.get_state()
    meta = {
        "step": str(step),
        "history": json.dumps(history[-2000:]),
        "best_val": json.dumps(best_val),
        "sampler_rng": json.dumps(sampler.rng.bit_generator.state),
        "config": json.dumps(model.config.to_dict()),
        "train_config": json.dumps(cfg.to_dict()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_state(
    path: str | os.PathLike,
    model: SegP,
    ema: SegP,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    sampler: CropSampler,
) -> tuple[int, list[dict[str, float]], float | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read training state {path}: {exc}") from exc
    if json.loads(meta.get("config", "null")) != model.config.to_dict():
        raise CheckpointError(f"training state {path} is for another model configuration")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in st.items()}
    gen.set_state(tensors["rng.torch"])
    sampler.rng.bit_generator.state = json.loads(meta["sampler_rng"])
    return int(meta["step"]), json.loads(meta["history"]), json.loads(meta["best_val"])
