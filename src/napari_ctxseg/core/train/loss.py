"""The training loss of a batch and the noise schedule of training (with extra weight at sigma_max)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import torch

from ..diffusion.edm import EDMDenoiser, edm_loss
from ..diffusion.train_schedules import get_schedule
from ..nn.models import CtxSegP, SegP
from .batch import Batch

__all__ = ["mixed_max_schedule", "weighted_edm_loss"]


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
