"""Training batches (NCHW torch tensors) and their packing for worker processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Batch"]


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
