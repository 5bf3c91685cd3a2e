"""Shape checks of model inputs, with messages that say what was received and what was expected."""

from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["check_context", "check_image"]


def check_image(image: torch.Tensor, channels: int, stride: int, name: str = "image") -> None:
    """Raise :class:`InputError` unless ``image`` is ``(B, channels, H, W)`` with H, W multiples of stride."""
    if image.ndim != 4 or image.shape[1] != channels:
        raise InputError(f"{name} must be (B, {channels}, H, W), got shape {tuple(image.shape)}")
    if image.shape[-1] % stride or image.shape[-2] % stride:
        raise InputError(
            f"{name} height and width must be multiples of {stride}, got "
            f"{tuple(image.shape[-2:])} (pad the image first)"
        )


def check_context(
    image_ref: torch.Tensor, flow_ref: torch.Tensor, ref_mask: torch.Tensor | None, channels: int, stride: int
) -> None:
    """Raise :class:`InputError` unless the references fit together.

    They must be images ``(N, channels, H, W)`` (as :func:`check_image`), flows ``(N, 2, H, W)`` of the
    same size and an optional mask ``(N, H, W)``.
    """
    check_image(image_ref, channels, stride, "reference image")
    if flow_ref.ndim != 4 or flow_ref.shape[1] != 2:
        raise InputError(f"reference flow must be (N, 2, H, W), got shape {tuple(flow_ref.shape)}")
    if flow_ref.shape[0] != image_ref.shape[0] or flow_ref.shape[-2:] != image_ref.shape[-2:]:
        raise InputError(
            f"reference flow {tuple(flow_ref.shape)} does not match reference image {tuple(image_ref.shape)}"
        )
    if ref_mask is not None and (ref_mask.ndim != 3 or ref_mask.shape[0] != image_ref.shape[0]):
        raise InputError(
            f"reference mask must be (N, H, W) with N = {image_ref.shape[0]}, got {tuple(ref_mask.shape)}"
        )
