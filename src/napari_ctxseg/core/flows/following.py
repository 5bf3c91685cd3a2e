"""Instance labels from flow fields (``flow_to_mask``): the original's flow following, made fast.

The semantics are those of the original ctxseg ``segmentation/flow.py`` (``shared/parity/README.md``
item 22); the parity tests check them against the original's outputs. Layouts are channel first, as in
:mod:`napari_ctxseg.core.flows.from_masks`: 2D flow ``(2, H, W)`` (dy, dx), 3D flow ``(3, D, H, W)``
(dz, dy, dx), optionally batched.

Implementation notes
--------------------
``flow_to_mask`` follows every pixel through the flow with bilinear reads. ``mode="exact"`` performs the
original's arithmetic, but stops following a pixel as soon as its position is provably periodic (a fixed
point or a 2-cycle: the position sequence is deterministic, so the remaining iterations are known);
this is exact, not an approximation. Pixels are independent, so they are followed in chunks of 16384
(10922 in 3D) whose state stays in the CPU caches. ``mode="fast"`` (the default) composes flow maps
instead (:mod:`napari_ctxseg.core.flows.maps`): ``log2(niter)`` bilinear reads per pixel instead of up to
``niter``. Only the pixels whose flow is not 0 are followed, counted and looked up (the others stay in
their own cell: one strided fill of the counts and one strided copy of the labels); seeds and their
expansion (:mod:`napari_ctxseg.core.flows.seeds`) are evaluated only at the cells where enough pixels
landed. The step-by-step walkers of ``"exact"`` are in :mod:`napari_ctxseg.core.flows.walkers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ..errors import InputError
from .from_masks import _as_flow_tensor, flow_error
from .maps import follow_by_composition
from .seeds import _Grid, _label_cells
from .walkers import _run, _Walkers

__all__ = ["flow_to_mask"]


class _Follower:
    """Follows pixels through a batch of flows with the original's bilinear steps (see ``flow_to_mask``).

    Positions are float32 ``(d, N)`` (one contiguous row per axis) in "edge" coordinates (pixel i covers
    [i, i+1)). The flow is read from a zero-padded table so that reads outside the image give 0 without
    bounds checks; one row of the table holds the flow at the 4 corners of a cell in the last two axes, so
    one gather (two in 3D) reads a bilinear neighbourhood. With ``table=False`` only the padded flow
    ``planes`` ``(d, R)`` is kept (for :mod:`~napari_ctxseg.core.flows.maps`, which reads it per corner).
    """

    def __init__(self, flow: torch.Tensor, scale: float = 1.0, table: bool = True) -> None:
        _, d, *spatial = flow.shape
        dev = flow.device
        self.d, self.rows = d, 0
        padded = torch.nn.functional.pad(flow, (1, 1) * d)
        if scale != 1.0:
            padded.mul_(scale)  # == pad(flow * scale): the padding stays 0, without a scaled copy
        planes = padded.movedim(1, 0).reshape(d, -1)  # (d, R): one flat plane per flow component
        sp = [s + 2 for s in spatial]
        self.strides = [int(np.prod(sp[j + 1 :])) for j in range(d)]
        sy = self.strides[-2]
        rows = self.rows = planes.shape[1]
        self.planes = planes
        # row q * d + c: component c of the flow at corner q = by + 2 * bx of the last two axes (the
        # original's order, bit j = offset along axis j), so that one gather (two in 3D) reads them all;
        # reads past the end give 0. Filled slice by slice: the table is the only full-size allocation.
        self.table = torch.zeros((4 * d, rows if table else 0), dtype=planes.dtype, device=dev)
        if table:
            for q, o in enumerate((0, sy, 1, sy + 1)):
                self.table[q * d : (q + 1) * d, : rows - o] = planes[:, o:]
            self.planes = self.table[:0]  # not needed: the table has it
        del padded, planes
        self.pad_base = sum(self.strides)  # +1 along every axis for the padding
        self.batch_stride = int(np.prod(sp))
        small = rows + self.strides[0] < 2**31  # largest index read
        self.index_dtype = torch.int32 if small else torch.int64  # int32 converts faster
        top = [np.float32(s) - np.float32(0.001) for s in spatial]
        self.upper = torch.tensor(np.array(top, np.float32), device=dev)[:, None]
        self.zero = torch.zeros((), dtype=torch.float32, device=dev)

    def _weights(self, res: torch.Tensor) -> list[torch.Tensor]:
        """Bilinear weight of each of the ``2**d`` corners: product over the axes of ``res`` or ``1 - res``.

        Corner ``i`` takes ``res[j]`` where bit ``j`` of ``i`` is set; factors multiply first axis first.
        """
        one_minus = 1 - res
        weights = [one_minus[0], res[0]]
        for j in range(1, self.d):
            weights = [f * w for f in (one_minus[j], res[j]) for w in weights]
        return weights

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Flow at the ``2**d`` corners of the cells ``idx``: ``(2**d, d, N)`` in the original's order."""
        n, d = idx.shape[0], self.d
        values = self.table.index_select(1, idx).reshape(4, 1, d, n)
        if d == 3:  # corner = bz + 2 * q
            upper = self.table.index_select(1, idx + self.strides[0]).reshape(4, 1, d, n)
            values = torch.cat((values, upper), 1)
        return values.reshape(-1, d, n)

    def velocity(self, p: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``clip(bilinear(step, p - 0.5), -1, 1)``, the move of one iteration from ``p``, and the cell read.

        The cell is returned as the index of its top-left corner in the padded table.

        Every operation works on ``(d, N)`` or ``(N,)`` tensors: broadcasting over the corners would
        make tensors large enough for torch to split them over threads, which costs more than it saves
        here (and a lot on a busy machine).
        """
        loc = p - 0.5
        cell = _floor_int(loc, self.index_dtype)
        weights = self._weights(loc - cell.to(torch.float32))
        idx = base + cell[-1]
        for j in range(self.d - 1):
            idx = idx + cell[j] * self.strides[j]
        values = self._gather(idx)
        val = values[0] * weights[0]
        for i in range(1, len(weights)):  # accumulate in corner order, as the original
            val = val + values[i] * weights[i]
        return val.clamp_(-1, 1), idx

    def clip(self, p: torch.Tensor) -> torch.Tensor:
        """Clip positions to ``[0, size - 0.001]`` per axis."""
        return torch.minimum(torch.maximum(p, self.zero), self.upper)


def _floor_int(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``floor(x)`` as int64 for ``x >= -1``: truncation, minus 1 below 0.

    This avoids ``torch.floor``, whose CPU kernel goes multi-threaded even for small tensors.
    """
    trunc = x.to(dtype)
    return trunc - (x < trunc).to(dtype)


def _initial_positions(spatial: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    """Pixel centres ``(d, B * prod(spatial))``: ``(i + 0.5, j + 0.5[, ...])``, row-major, per image."""
    axes = [torch.arange(s, dtype=torch.float32, device=device) + 0.5 for s in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(len(spatial), -1)
    return grid.repeat(1, batch) if batch > 1 else grid


# values per walker-chunk operation: small enough for the CPU caches, and to stay under torch's
# 32768-element threshold for multi-threading (on a busy machine, each multi-threaded operation
# can wait milliseconds for a descheduled thread; measured: 0.86 s instead of 15 s for 512x512 with 2
# threads under load), large enough to amortise the per-operation overhead
_CHUNK_VALUES = 1 << 15


def _follow(flow: torch.Tensor, niter: int, fast: bool, step_size: float = 1.0) -> torch.Tensor:
    """Final positions ``(d, B * prod(spatial))`` after ``niter`` iterations of ``step_size * flow``.

    Every pixel: those that do not move keep their centre (see :func:`_follow_moving`).
    """
    b, _, *spatial = flow.shape
    moving = _Moving(flow)
    moved = _follow_moving(flow, moving, niter, fast, step_size)
    return _initial_positions(spatial, b, flow.device).index_copy_(1, moving.pix, moved)


class _Moving:
    """The pixels of a batch of flows whose own flow is not 0: flat index, image and coordinates."""

    def __init__(self, flow: torch.Tensor) -> None:
        _, _, *spatial = flow.shape
        found = torch.nonzero((flow != 0).any(1))  # (M, 1 + d): image, then coordinates; no division
        self.image = found[:, 0]
        self.coords = found[:, 1:].T.contiguous()  # (d, M)
        self.pix = self.image * int(np.prod(spatial))
        for j in range(len(spatial)):
            self.pix = self.pix + self.coords[j] * int(np.prod(spatial[j + 1 :]))


def _follow_moving(
    flow: torch.Tensor, moving: _Moving, niter: int, fast: bool, step_size: float = 1.0
) -> torch.Tensor:
    """Final positions ``(d, M)`` of the ``moving`` pixels.

    Pixels whose own flow is exactly 0 never move (the first read is at their centre) and are not
    followed. ``fast``: the others by composing flow maps
    (:func:`~napari_ctxseg.core.flows.maps.follow_by_composition`). Else step by step; a pixel leaves the
    active set once its final cell is known (see :meth:`_Walkers.settled`). Walkers are independent, so
    they are followed in chunks of nearby pixels (the flow reads stay in cache); each chunk's last
    stragglers are pooled and finished together.
    """
    final = moving.coords.to(torch.float32) + 0.5  # the centres, as _initial_positions
    n = final.shape[1]
    if niter <= 0 or step_size == 0 or n == 0:
        return final
    follower = _Follower(flow, step_size, table=not fast)
    base = (moving.image * follower.batch_stride + follower.pad_base).to(follower.index_dtype)
    size = _CHUNK_VALUES // follower.d  # walkers per chunk: (d, size) positions
    if fast:
        return follow_by_composition(follower, final, base, niter, size)
    local = torch.arange(n, device=flow.device)  # walkers write into ``final`` by these
    stragglers = []
    for start in range(0, n, size):
        chunk = slice(start, start + size)
        walkers = _Walkers(local[chunk], base[chunk], final[:, chunk].clone(), niter)  # not a view
        rest = _run(walkers, follower, final, until=max(len(walkers) // 16, 1024))
        if rest is not None:
            stragglers.append(rest)
    if stragglers:
        merged = _Walkers.merge(stragglers)
        for start in range(0, len(merged), size):
            index = torch.arange(start, min(start + size, len(merged)), device=flow.device)
            _run(merged.select(index), follower, final, until=0)
    return final


def flow_to_mask(
    flow: np.ndarray | torch.Tensor,
    *,
    niter: int = 1024,
    step_size: float = 0.5,
    window_size: int = 5,
    min_seed_cnts: int = 30,
    expand_repeats: int = 5,
    expand_min_cnts: int = 2,
    max_flow_err: float = 0.0,
    mode: Literal["fast", "exact"] = "fast",
    border_seeds: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Instance labels from a flow field (the original's ``flow_to_mask``).

    Parameters
    ----------
    flow : np.ndarray or torch.Tensor
        Channel-first flow: ``(2, H, W)`` (dy, dx), ``(B, 2, H, W)``, ``(3, D, H, W)`` (dz, dy, dx) or
        ``(B, 3, D, H, W)``. A 4D input whose second axis has length 2 is read as a batch of 2D flows
        (pass ``(1, 3, 2, H, W)`` for a 3D flow of depth 2). Cast to float32; must be finite.
    niter : int
        Iterations of flow following. The original's ``flow_to_mask`` defaults to 200, after which the
        pixels of thin objects along the image border are still spread over several cells; its
        ``scripts/eval.py`` passes 1000. 1024 converges as 1000 does and, a power of two, costs
        ``"fast"`` mode one read per pixel more than 200 (``docs/history/flow_defaults.md``).
    step_size : float
        The flow is multiplied by this before following.
    window_size : int
        Window of the local maxima that make seeds.
    min_seed_cnts : int
        Minimum number of pixels landing in a cell for it to be (or join) a seed (>= 1).
    expand_repeats : int
        Number of 3x3 dilations of the seeds into unlabelled cells.
    expand_min_cnts : int
        Minimum count of a cell reached by those dilations (>= 1).
    max_flow_err : float
        If > 0, objects whose mean squared flow error (see :func:`flow_error`) exceeds this are removed
        (the original raises ``TypeError`` here; this implements its intent).
    mode : {"fast", "exact"}
        ``"exact"``: the original's arithmetic (its labels on every parity fixture, 0 pixels differ, at
        200 and 1000 iterations).
        ``"fast"``: the first 8 iterations as the original, then flow maps composed; see Notes.
    border_seeds : bool
        ``"fast"`` only: also seed the spread sinks of thin objects cut by the image border, which fewer
        iterations than the default leave unconverged (see Notes). Off by default: on the bundled model's
        flows it adds more false objects than true ones.
    device : str or torch.device, optional
        Where to compute. Default: the tensor's device, CPU for numpy input.

    Returns
    -------
    np.ndarray
        uint32 labels ``([B,] H, W)`` / ``([B,] D, H, W)``. Labels are **not consecutive**: the label
        of an object is 1 + the row-major flat index of its seed cell (use
        :func:`napari_ctxseg.core.flows.postprocess.relabel_sequential` to make them 1..n).

    Raises
    ------
    InputError
        For a flow of the wrong shape, with NaN/inf values, an unknown ``mode`` or a bad option.

    Notes
    -----
    Every pixel starts at its centre ``p = (i + 0.5, j + 0.5)``; ``niter`` times
    ``p += clip(bilinear(step_size * flow, p - 0.5), -1, 1)`` (reads outside the image are 0), then
    ``p`` is clipped to ``[0, size - 0.001]``. Final positions are truncated to cells; ``counts`` is
    the number of pixels per cell. Seeds are cells with ``counts >= max(min_seed_cnts, max of counts in
    the window)``, labelled ``1 + flat index``; labels spread over the window by maximum (only to cells
    with ``counts >= min_seed_cnts``), then ``expand_repeats`` times to unlabelled 3x3 neighbours with
    ``counts >= expand_min_cnts`` (largest label wins). Each pixel takes the label of its final cell.
    There is no foreground threshold: still background pixels get 0 because their counts are small. In a
    flow that is nowhere 0 background pixels drift, and the more iterations, the more of them gather into
    false objects: zero the background first, as
    :func:`~napari_ctxseg.core.flows.labels.labels_from_flows` does (``flow_threshold``).

    Both modes skip pixels whose own flow is exactly 0 (they never move). ``"exact"`` stops following a
    pixel once its trajectory is provably periodic (fixed point or 2-cycle), which is exact.

    ``"fast"`` follows every pixel for the first ``BASE_ITER = 8`` iterations with the original's arithmetic
    (with ``niter <= 8`` it *is* the original), which gives the displacement ``D_n`` of ``n = 1, 2, 4, 8``
    iterations at every pixel centre; then ``D_2n(x) = D_n(x) + D_n(x + D_n(x))`` (clipped to the image), the
    outer ``D_n`` read bilinearly from its values at the pixel centres, and each pixel moves by the ``D_n`` of
    ``niter``'s binary expansion. That is one bilinear read per pixel for each of the 8 steps, each doubling
    and each further bit of ``niter`` (15 for 1024, 14 for 200, 19 for 1000) instead of up to ``niter``. Where
    the map is smooth between pixel centres (inside an object, and at a sink, where all neighbours go to the
    same point) the reads are faithful; they are not across the border between two basins, which pixels have
    left after the first 8 iterations. On ideal flows of DSB masks its positions give the cells of
    ``"exact"``. On the bundled model's flows of the 66 DSB ``val`` images (the pipeline's flow threshold,
    resizing and ``min_size``) its AP@0.5 is 0.7353 against 0.7351 for ``"exact"`` (2350 / 323 / 523 against
    2353 / 328 / 520 TP / FP / FN; at 200 iterations 0.7338 and 0.7346), at several times the speed
    (``docs/benchmarks.md``). Pointer jumping on cells instead (each cell sent to the cell of its ``D_8``, the
    map squared) was tried: 1.5x faster, but 0.7165 there (sinks break into nearby fixed points and cycles of
    the cell map) and it loses the thin objects at the border.

    What the rule drops on purpose: an object is found when at least ``min_seed_cnts`` of its pixels land
    in one cell, so objects smaller than ``min_seed_cnts`` (30) pixels never are; neither are two
    objects whose sinks lie within ``window_size // 2`` cells of each other (the weaker joins the
    stronger), nor an object whose pixels end spread over several cells with fewer than
    ``min_seed_cnts`` in each. The last happens to thin objects cut by the image border: their pixels
    oscillate across the object and creep along the border, and 200 iterations are not enough for them.
    With ``border_seeds``, ``"fast"`` also seeds such spread sinks within 3 cells of the image border
    (``border_pass`` of :func:`napari_ctxseg.core.flows.seeds._label_cells`), keeping every label of the
    original's rule; it is off by default because on the bundled model's flows, through the whole
    pipeline (``benchmarks/eval_dsb.py``, 1 step x 1 sample, 66 ``val`` images, 200 iterations), it
    added 25 true and 43 false objects (AP@0.5 0.734 -> 0.732, colour images 0.636 -> 0.626).

    From the ideal flows of the 66 DSB ``val`` masks
    (:func:`~napari_ctxseg.core.flows.from_masks.mask_to_flow` with ``within_labels=True``), the
    defaults give back every connected object of >= 30 pixels; one U-shaped object, whose lobes meet only
    through a one-pixel bridge along the image border, comes back as its two lobes. ``"exact"`` also
    misses one object of exactly 30 pixels at the border, whose pixels do not all end in one cell. From
    the original's flows (``within_labels=False``) they give back every object in 60 of the masks; in the
    6 others that flow itself sends pixels into a neighbouring label, so an object loses pixels to its
    neighbour's sink or a small one gains them (``tests/core/test_flows_recovery.py``).

    On CUDA the float32 arithmetic may round differently (fused multiply-adds), so ``"exact"`` matches
    the original only up to such rounding there. Memory (``"exact"``): the flow is read from a table
    holding the 4 corners of every cell (4 times the float32 flow), plus a few values per pixel (about 52
    bytes per pixel at the peak for a 2D flow, the input not counted); ``"fast"`` keeps the padded flow
    and ``popcount(niter) + 2`` displacement fields of the same size (3 for 1024, 5 for 200: by count, 32
    and 48 bytes per pixel in 2D with the flow), plus a few values per moving pixel.

    Examples
    --------
    Three objects and their ideal flow; the third is 2 pixels wide along the image border. The default
    1024 iterations find it; the original's 200 do not:

    >>> import numpy as np
    >>> from napari_ctxseg.core.flows.from_masks import mask_to_flow
    >>> mask = np.zeros((40, 40), np.int32)
    >>> mask[5:15, 5:15], mask[20:35, 18:30], mask[12:28, :2] = 1, 2, 3
    >>> flow = mask_to_flow(mask, within_labels=True)
    >>> labels = flow_to_mask(flow)
    >>> labels.dtype, len(np.unique(labels)) - 1
    (dtype('uint32'), 3)
    >>> len(np.unique(flow_to_mask(flow, niter=200))) - 1
    2
    """
    if mode not in ("fast", "exact"):
        raise InputError(f"mode must be one of 'fast', 'exact', got {mode!r}")
    if int(niter) != niter or niter < 0:
        raise InputError(f"niter must be a non-negative integer, got {niter!r}")
    for name, value in (
        ("window_size", window_size),
        ("min_seed_cnts", min_seed_cnts),
        ("expand_min_cnts", expand_min_cnts),
    ):
        if int(value) != value or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if int(expand_repeats) != expand_repeats or expand_repeats < 0:
        raise InputError(f"expand_repeats must be a non-negative integer, got {expand_repeats!r}")
    if not math.isfinite(step_size):
        raise InputError(f"step_size must be a finite number, got {step_size!r}")
    t, batched = _as_flow_tensor(flow, device)
    b, _, *spatial = t.shape
    # a Python scalar step keeps float32
    moving = _Moving(t)
    moved = _follow_moving(t, moving, int(niter), mode == "fast", float(step_size))
    grid = _Grid(b, spatial, max((window_size - 1) // 2, window_size // 2, 1), t.device)
    own = grid.index(moving.coords, moving.image)  # the cells the moving pixels leave
    cell = grid.index(moved.to(torch.int64), moving.image)  # where they land (positions >= 0: truncation)
    del moved
    counts = torch.zeros(grid.size, dtype=torch.int64, device=t.device)
    grid.interior(counts).fill_(1)  # one pixel in each cell of an image, less those that moved
    ones = torch.ones_like(cell)
    counts.index_add_(0, own, -ones).index_add_(0, cell, ones)
    rule = (int(window_size), min_seed_cnts, expand_repeats, expand_min_cnts)
    labels = _label_cells(counts, grid, *rule, border_pass=border_seeds and mode == "fast")
    mask = grid.interior(labels).reshape(-1)  # a copy: the label of each pixel's own cell
    mask.index_copy_(0, moving.pix, labels.index_select(0, cell))  # the moving pixels: where they landed
    mask = mask.reshape(b, *spatial)
    out = mask.cpu().numpy().astype(np.uint32)
    if max_flow_err > 0:
        flows = t.cpu().numpy()
        for i in range(b):
            out[i] = _drop_bad_objects(flows[i], out[i], max_flow_err)
    return out if batched else out[0]


def _drop_bad_objects(flow: np.ndarray, labels: np.ndarray, max_err: float) -> np.ndarray:
    """Set to 0 the objects whose :func:`flow_error` is above ``max_err``."""
    bad = [lab for lab, e in flow_error(flow, labels).items() if e > max_err]
    if bad:
        labels = np.where(np.isin(labels, bad), 0, labels).astype(labels.dtype)
    return labels
