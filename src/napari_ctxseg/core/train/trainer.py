"""Training loop of the P models (SegP / CtxSegP): EDM loss, AdamW, EMA, clipping, resumable state.

:func:`train` is a generator: it yields a :class:`TrainProgress` after every step (loss, samples/s, ETA,
validation loss when computed), so a CLI progress bar and the napari fine-tune widget both drive it and can
stop it between steps. Everything random comes from the seed.

Training state for ``--resume`` is written as safetensors (model, EMA, AdamW moments, RNG states) plus JSON
metadata, atomically; nothing is pickled.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..nn.models import CtxSegP, SegP
from .batch import Batch
from .config import TrainConfig
from .data import BatchStream, CropSampler
from .loss import mixed_max_schedule, weighted_edm_loss
from .state import load_state, save_state

__all__ = [
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "Trainer",
    "mixed_max_schedule",
    "train",
    "weighted_edm_loss",
]


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
            self.step, self.history, self.best_val = load_state(
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
                save_state(
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
