"""Seeds from landing counts, and their expansion: the labelling half of ``flow_to_mask``.

After flow following, ``counts`` holds the number of pixels that ended in each cell. The original's rule
(``shared/parity/README.md`` item 22) makes seeds of the cells that hold at least ``min_seed_cnts``
pixels and the most of their window, spreads their labels over the window and then, a few times, to
3x3 neighbours that hold a couple of pixels. ``flow_to_mask``'s default mode adds a pass at the image
border for the objects whose pixels end spread over a few cells there (``border_pass``). Both evaluate
the rule only at the cells where pixels landed, on a flat, zero-padded layout of the batch
(:class:`_Grid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__: list[str] = []

#: cells from the image border where ``_label_cells``'s ``border_pass`` looks for spread sinks
BORDER = 3


class _Grid:
    """Flat indexing of a batch of images zero-padded by ``pad`` cells on every side of every axis.

    Neighbour reads up to ``pad`` cells away then need no bounds checks and never cross images.
    """

    def __init__(self, batch: int, spatial: Sequence[int], pad: int, device: torch.device) -> None:
        self.spatial, self.pad, self.device = list(spatial), pad, device
        self.batch = batch
        padded = self.padded = [s + 2 * pad for s in spatial]
        self.strides = [int(np.prod(padded[j + 1 :])) for j in range(len(spatial))]
        self.image_size = int(np.prod(padded))
        self.size = batch * self.image_size

    def index(self, cells: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Flat index of the cells ``(d, N)`` (unpadded coordinates) of images ``image`` ``(N,)``."""
        idx = image * self.image_size
        for j, stride in enumerate(self.strides):
            idx = idx + (cells[j] + self.pad) * stride
        return idx

    def interior(self, values: torch.Tensor) -> torch.Tensor:
        """The (unpadded) images of the flat ``values``: a view ``(B, *spatial)``."""
        inside = tuple(slice(self.pad, self.pad + s) for s in self.spatial)
        return values.view(self.batch, *self.padded)[(slice(None), *inside)]

    def window(self, size: int) -> torch.Tensor:
        """Flat offsets of a ``size``-wide window, XLA ``'SAME'``: ``-((size - 1) // 2) .. size // 2``."""
        lo = (size - 1) // 2
        offsets = np.zeros(1, np.int64)
        for stride in self.strides:
            offsets = (offsets[:, None] + np.arange(-lo, size - lo)[None, :] * stride).reshape(-1)
        return torch.from_numpy(offsets).to(self.device)

    def near_border(self, idx: torch.Tensor, margin: int) -> torch.Tensor:
        """Whether the flat cells ``idx`` lie within ``margin`` cells of their image's border."""
        rem = idx % self.image_size
        out = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        for size, stride in zip(self.spatial, self.strides, strict=True):
            c = rem // stride - self.pad
            out |= (c < margin) | (c >= size - margin)
            rem = rem % stride
        return out

    def image_id(self, idx: torch.Tensor) -> torch.Tensor:
        """``1 +`` the row-major index, inside its (unpadded) image, of the flat cells ``idx``."""
        rem = idx % self.image_size
        out = torch.zeros_like(idx)
        for j, stride in enumerate(self.strides):
            inner = int(np.prod(self.spatial[j + 1 :]))
            out = out + (rem // stride - self.pad) * inner
            rem = rem % stride
        return out + 1


#: values per vectorised window read: under torch's 32768-element threshold for multi-threading (see
#: ``following._CHUNK_VALUES``)
_WINDOW_VALUES = (1 << 15) - 1


def _window_values(values: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The flat ``values`` over the window ``offsets`` around each cell of ``idx``: ``(n, k)`` pieces.

    One gather per piece of at most ``_WINDOW_VALUES`` values instead of one per offset.
    """
    rows = max(_WINDOW_VALUES // offsets.numel(), 1)
    return [
        values.index_select(0, (part[:, None] + offsets[None, :]).reshape(-1)).view(-1, offsets.numel())
        for part in idx.split(rows)
    ]


def _window_max_at(values: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Max of the flat ``values`` over the window ``offsets`` around each cell of ``idx``."""
    if idx.numel() == 0:
        return values[:0]
    return torch.cat([v.amax(1) for v in _window_values(values, idx, offsets)])


def _window_sum_at(
    values: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, floor: int, labels: torch.Tensor
) -> torch.Tensor:
    """Window sums around the cells ``idx`` of the flat ``values`` >= ``floor`` at unlabelled cells."""
    if idx.numel() == 0:
        return values[:0]
    pieces = zip(_window_values(values, idx, offsets), _window_values(labels, idx, offsets), strict=True)
    return torch.cat([torch.where((v >= floor) & (lab == 0), v, 0).sum(1) for v, lab in pieces])


def _label_cells(
    counts: torch.Tensor,
    grid: _Grid,
    window_size: int,
    min_seed_cnts: int,
    expand_repeats: int,
    expand_min_cnts: int,
    border_pass: bool = False,
) -> torch.Tensor:
    """Label of every cell (flat, padded ``grid``) from the number of pixels that landed in it.

    Both count thresholds must be >= 1 (so that padding cells are never labelled).

    The original's rule (``reduce_window`` maxima with ``'SAME'`` padding), computed only at the cells
    where it can give a label (``counts >= min_seed_cnts`` for seeds, ``>= expand_min_cnts`` for the
    expansion): the rest of the image is background whatever the window maxima are there.

    ``border_pass`` adds a second pass over the cells within ``BORDER`` (3) cells of the image border
    that the original's rule leaves unlabelled: a seed is also made where such a cell holds at least a
    third of ``min_seed_cnts`` and the most of its window (among unlabelled cells), and the window holds
    at least ``min_seed_cnts`` pixels in cells of at least an eighth of ``min_seed_cnts`` (and of
    ``expand_min_cnts``) each; these seeds are expanded as the others, into unlabelled cells only. Every
    label of the original's rule stays as it is. This finds the thin objects cut by the image border: the
    flow read outside the image is 0, so their pixels oscillate across the object and creep along the
    border; after the original's 200 iterations they are still spread over a few cells with fewer than
    ``min_seed_cnts`` in each (the default 1024 lets them converge). Away from the border the pass is
    not made: on the bundled model's flows it would add more false objects (fragments of split sinks)
    than it finds true ones; cells of 2 or 3 pixels (a noisy background drifting) do not count.
    """
    labels = torch.zeros_like(counts)
    window = grid.window(window_size)
    strong = torch.nonzero(counts >= min_seed_cnts)[:, 0]
    _seed(labels, counts, grid, strong, window, min_seed_cnts)
    _expand(labels, counts, grid, expand_repeats, expand_min_cnts)
    if border_pass:  # full-size work only where an unlabelled cell at the border holds enough pixels
        floor = max(expand_min_cnts, -(-min_seed_cnts // 3))
        candidates = torch.nonzero(counts >= floor)[:, 0]
        unlabelled = labels.index_select(0, candidates) == 0
        candidates = candidates[unlabelled & grid.near_border(candidates, BORDER)]
        held = max(expand_min_cnts, -(-min_seed_cnts // 8))
        candidates = candidates[_window_sum_at(counts, candidates, window, held, labels) >= min_seed_cnts]
        if candidates.numel():
            free = torch.where(labels == 0, counts, 0)
            more = torch.zeros_like(counts)
            _seed(more, free, grid, candidates, window, floor)
            _expand(more, free, grid, expand_repeats, expand_min_cnts)
            labels = torch.where(labels == 0, more, labels)
    return labels


def _seed(
    labels: torch.Tensor,
    counts: torch.Tensor,
    grid: _Grid,
    strong: torch.Tensor,
    window: torch.Tensor,
    floor: int,
) -> None:
    """Label (in place) the cells ``strong`` that hold the most of their window, and spread over it."""
    if strong.numel() == 0:
        return
    threshold = _window_max_at(counts, strong, window).clamp_min(floor)
    seeds = strong[counts.index_select(0, strong) >= threshold]
    labels.index_copy_(0, seeds, grid.image_id(seeds))
    labels.index_copy_(0, strong, _window_max_at(labels, strong, window))  # reads seeds only


def _expand(labels: torch.Tensor, counts: torch.Tensor, grid: _Grid, repeats: int, min_cnts: int) -> None:
    """``repeats`` times, label (in place) the unlabelled cells of ``min_cnts`` by their 3x3 maximum."""
    neighbours = grid.window(3)
    grow = torch.nonzero((counts >= min_cnts) & (labels == 0))[:, 0]
    for _ in range(repeats):
        if grow.numel() == 0:
            break
        new = _window_max_at(labels, grow, neighbours)  # all cells update from the same old labels
        labels.index_copy_(0, grow, new)
        grow = grow[new == 0]
