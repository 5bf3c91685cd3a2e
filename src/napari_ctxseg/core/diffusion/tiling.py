"""Overlapping tiles and blending weights for images larger than a model call should see at once.

Flows (not labels) are blended: each tile's prediction is weighted by a ramp that falls towards the tile's
inner borders, and the weighted sum is divided by the summed weights, so objects on tile borders are
predicted consistently and segmented once by flow following on the blended field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Tile", "blend_weight", "pad_to_multiple", "plan_tiles"]


@dataclass(frozen=True)
class Tile:
    """One tile: its slice of the (padded) image, in pixels."""

    y0: int
    x0: int
    size_y: int
    size_x: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices of the tile in the padded image."""
        return slice(self.y0, self.y0 + self.size_y), slice(self.x0, self.x0 + self.size_x)


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = tile - overlap
    count = int(np.ceil((n - tile) / step)) + 1
    # spread the tiles evenly so the last one ends exactly at n
    return [int(round(i * (n - tile) / (count - 1))) for i in range(count)]


def plan_tiles(shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """Tiles of at most ``tile`` pixels covering ``shape`` with at least ``overlap`` pixels of overlap.

    Every tile has the full ``tile`` size along an axis longer than ``tile`` (so a tile size that is a
    multiple of the model stride stays one); starts are spread evenly and the last tile ends at the border.
    """
    h, w = shape
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    return [
        Tile(y, x, min(tile, h), min(tile, w))
        for y in _starts(h, tile, overlap)
        for x in _starts(w, tile, overlap)
    ]


def blend_weight(tile: Tile, shape: tuple[int, int], overlap: int, *, dtype=torch.float32) -> torch.Tensor:
    """(size_y, size_x) weights: 1 inside, a linear ramp over ``overlap`` pixels at inner borders.

    Borders on the image edge keep full weight (nothing else covers them).
    """
    h, w = shape

    def ramp(n: int, start: int, total: int) -> torch.Tensor:
        r = torch.ones(n, dtype=dtype)
        if overlap <= 0:
            return r
        ramp_up = (torch.arange(overlap, dtype=dtype) + 0.5) / overlap
        if start > 0:
            r[:overlap] = torch.minimum(r[:overlap], ramp_up[: min(overlap, n)])
        if start + n < total:
            r[-overlap:] = torch.minimum(r[-overlap:], ramp_up.flip(0)[-min(overlap, n) :])
        return r

    return ramp(tile.size_y, tile.y0, h)[:, None] * ramp(tile.size_x, tile.x0, w)[None, :]


def pad_to_multiple(
    x: torch.Tensor, multiple: int, *, min_size: int = 0, mode: str = "reflect"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two axes of an NCHW tensor at the bottom/right up to a multiple of ``multiple``.

    Returns the padded tensor and the original (H, W). Reflection is used where the image is large
    enough, else zeros.
    """
    h, w = x.shape[-2:]
    th = max(int(np.ceil(h / multiple)) * multiple, min_size)
    tw = max(int(np.ceil(w / multiple)) * multiple, min_size)
    if (th, tw) == (h, w):
        return x, (h, w)
    pad = (0, tw - w, 0, th - h)
    if mode == "reflect" and (tw - w >= w or th - h >= h):
        mode = "constant"
    return torch.nn.functional.pad(x, pad, mode=mode), (h, w)
