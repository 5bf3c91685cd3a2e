"""Flow fields of instance masks (``mask_to_flow``) and the per-object flow error (``flow_error``).

The semantics are those of the original ctxseg ``segmentation/flow.py`` (itself a JAX port of the
cellpose flows); ``shared/parity/README.md`` items 21-22 describe them precisely and the parity tests
check them against the original's outputs. The inverse, ``flow_to_mask``, lives in
:mod:`napari_ctxseg.core.flows.following`.

Layouts
-------
Everything here is **channel first**, unlike the original (channels last):

- 2D flow ``(2, H, W)`` with channels ``(dy, dx)``; batched ``(B, 2, H, W)``.
- 3D flow ``(3, D, H, W)`` with channels ``(dz, dy, dx)``; batched ``(B, 3, D, H, W)``.
- Masks are integer label images ``(H, W)`` / ``(D, H, W)`` (batched ``(B, H, W)`` / ``(B, D, H, W)``),
  0 = background.

The original's ``(H, W, 2)`` is ``np.moveaxis(flow, 0, -1)`` of ours and vice versa.

Implementation notes
--------------------
``mask_to_flow`` runs the original's heat diffusion for every object at once, on an "atlas": each
object's bounding box is copied, separated from the others by a row/column of zeros, into one float32
canvas on which the masked 3x3 mean becomes an unmasked one (8 shifted additions of the flat canvas,
in the original's neighbour order so that float32 sums round alike). No per-object Python loop, no
diffusion over background pixels; 2D slices of a 3D mask are all diffused together; objects are grouped
so that a canvas fits in the CPU caches (time grows linearly with the image).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from .postprocess import as_labels

__all__ = ["flip_flow", "flip_spatial", "flow_error", "mask_to_flow"]

_SOURCE = np.float32(1e24)  # heat injected at each object centre every iteration (original value)


# --------------------------------------------------------------------------------------------------
# flips
# --------------------------------------------------------------------------------------------------


def flip_spatial(x: torch.Tensor, flip_y: bool, flip_x: bool) -> torch.Tensor:
    """``x`` (..., H, W) flipped upside down (``flip_y``) and/or left-right (``flip_x``)."""
    dims = [d for d, on in ((-2, flip_y), (-1, flip_x)) if on]
    return x.flip(dims) if dims else x


def flip_flow(flow: torch.Tensor, flip_y: bool, flip_x: bool) -> torch.Tensor:
    """The 2D flow (..., 2, H, W), channels (dy, dx), of the image flipped as in :func:`flip_spatial`.

    The field is flipped and the flipped axis's component negated; the flip is its own inverse.

    Raises
    ------
    InputError
        If the third-last axis does not hold the 2 components (for example a 3D flow).
    """
    if flow.ndim < 3 or flow.shape[-3] != 2:
        raise InputError(f"flip_flow needs a 2D flow (..., 2, H, W), got shape {tuple(flow.shape)}")
    if not (flip_y or flip_x):
        return flow
    sign = torch.tensor(
        [-1.0 if flip_y else 1.0, -1.0 if flip_x else 1.0], dtype=flow.dtype, device=flow.device
    )
    return flip_spatial(flow, flip_y, flip_x) * sign.view(2, 1, 1)


# --------------------------------------------------------------------------------------------------
# mask -> flow
# --------------------------------------------------------------------------------------------------


def _check_labels(mask: np.ndarray | torch.Tensor, what: str = "mask") -> np.ndarray:
    """A 2D/3D integer label image as numpy (tensors are copied to the CPU)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return as_labels(mask, (2, 3), what)


def mask_to_flow(mask: np.ndarray, *, within_labels: bool = False) -> np.ndarray:
    """Flow field of an instance mask (the original's heat-diffusion flows).

    Parameters
    ----------
    mask : np.ndarray
        Integer labels ``(H, W)`` or ``(D, H, W)``, 0 = background. Labels need not be consecutive and
        may be large (e.g. the output of :func:`flow_to_mask`). Bool masks are one object.
    within_labels : bool
        ``False`` (default): the original's flows, on which the bundled model was trained. Their gradient
        reads the heat of a neighbouring label across a shared border, so where two objects touch some
        border pixels point into the neighbour (a thin object beside a large one can lose most of its
        pixels to it). ``True``: pixels of another label read as background, so every object's flow is
        the flow it would have alone: no pixel's flow has a component towards a pixel of another label
        above, below, left or right of it. Pixels with no such neighbour get the same flow either way.

    Returns
    -------
    np.ndarray
        float32 ``(2, H, W)`` with channels ``(dy, dx)`` for a 2D mask, ``(3, D, H, W)`` with channels
        ``(dz, dy, dx)`` for a 3D mask. Channel first (the original returns channels last).

    Raises
    ------
    InputError
        If the mask is not 2D/3D, not integer, or has negative labels.

    Notes
    -----
    Per object (2D): the centre is the object pixel closest to the coordinate-wise median of its pixels
    (ties: first in row-major order). On the mask zero-padded by one pixel, ``n_iter = 2 * max over
    objects of (bbox height + 1 + bbox width + 1)`` iterations of "set every centre to 1e24, then replace
    each object pixel by the mean of its 3x3 neighbourhood (9 values, self included) where pixels of
    another label count as 0" run in float32; then ``T = log(1 + T)``, ``dy = T[y+1, x] - T[y-1, x]``,
    ``dx = T[y, x+1] - T[y, x-1]`` (read whatever the neighbour's label, or as 0 where it is another
    label with ``within_labels``) and ``(dy, dx)`` is divided by ``1e-20 + |(dy, dx)|``. A mask with
    fewer than two foreground pixels gives zeros.

    3D: the sum of the 2D flows of every z-slice (into dy, dx), y-slice (dz, dx) and x-slice (dz, dy),
    **not** renormalised (magnitudes up to about 2.4), as in the original. Each slice uses its own
    ``n_iter``.

    Examples
    --------
    >>> m = np.zeros((5, 5), int); m[1:4, 1:4] = 1
    >>> mask_to_flow(m)[:, 1, 2]  # top-middle pixel points down, to the centre
    array([1., 0.], dtype=float32)

    A thin object (label 2) along a large one: in the original's flow, pixels of its left column point
    into label 1; with ``within_labels`` none does.

    >>> m = np.zeros((22, 12), int); m[1:21, 1:9] = 1; m[1:21, 9:11] = 2
    >>> def into_1(flow): return int((flow[1, :, 9] < -0.5).sum())  # left column of 2, pointing left
    >>> into_1(mask_to_flow(m)), into_1(mask_to_flow(m, within_labels=True))
    (11, 0)
    """
    mask = _check_labels(mask)
    within = bool(within_labels)
    if mask.ndim == 2:
        return _slice_flows(mask[None], within)[0]
    flow = np.zeros((3, *mask.shape), np.float32)
    # z-slices (H, W) give (dy, dx); y-slices (D, W) give (dz, dx); x-slices (D, H) give (dz, dy)
    flow[[1, 2]] += _slice_flows(mask, within).transpose(1, 0, 2, 3)
    flow[[0, 2]] += _slice_flows(mask.transpose(1, 0, 2), within).transpose(1, 2, 0, 3)
    flow[[0, 1]] += _slice_flows(mask.transpose(2, 0, 1), within).transpose(1, 2, 3, 0)
    return flow


class _Objects:
    """Pixels and bounding boxes of every (slice, label) object of a stack of 2D label images.

    Attributes are 1D arrays; ``pix_*`` are per foreground pixel grouped by object (row-major inside an
    object), the others per object.
    """

    def __init__(self, stack: np.ndarray) -> None:
        n, h, w = stack.shape
        flat = stack.reshape(-1)
        fg_idx = np.flatnonzero(flat)
        s = fg_idx // (h * w)
        # slices with fewer than 2 foreground pixels give zero flow (original rule): drop them
        per_slice = np.bincount(s, minlength=n)
        keep = per_slice[s] >= 2
        fg_idx, s = fg_idx[keep], s[keep]
        _, lab = np.unique(flat[fg_idx], return_inverse=True)
        key = s.astype(np.int64) * (int(lab.max(initial=0)) + 1) + lab
        _, obj = np.unique(key, return_inverse=True)
        order = np.argsort(obj, kind="stable")  # group by object, row-major inside each group
        self.pix_flat = fg_idx[order]
        self.pix_obj = obj[order]
        rem = self.pix_flat % (h * w)
        self.pix_y = rem // w
        self.pix_x = rem % w
        self.n_obj = int(obj.max(initial=-1)) + 1
        self.size = np.bincount(self.pix_obj, minlength=self.n_obj)
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]]).astype(np.int64)
        self.slice = s[order][self.start] if self.n_obj else np.zeros(0, np.int64)
        if self.n_obj == 0:
            self.y0 = self.x0 = self.h = self.w = self.n_iter = self.centre = np.zeros(0, np.int64)
            return
        self.y0 = self.pix_y[self.start]  # row-major: first pixel has the smallest row
        self.h = np.maximum.reduceat(self.pix_y, self.start) - self.y0 + 1
        self.x0 = np.minimum.reduceat(self.pix_x, self.start)
        self.w = np.maximum.reduceat(self.pix_x, self.start) - self.x0 + 1
        ext = self.h + self.w + 2  # original: (stop - start + 1) summed over both axes
        slice_iter = np.zeros(n, np.int64)
        np.maximum.at(slice_iter, self.slice, 2 * ext)
        self.n_iter = slice_iter[self.slice]
        self.centre = self._centres()

    def _medians(self, values_sorted: np.ndarray) -> np.ndarray:
        """Median per object of values sorted inside each object (np.median's convention)."""
        lo = self.start + (self.size - 1) // 2
        hi = self.start + self.size // 2
        return (values_sorted[lo].astype(np.float64) + values_sorted[hi]) / 2

    def _centres(self) -> np.ndarray:
        """Index (into the pix_* arrays) of each object's pixel closest to its median."""
        ymed = self._medians(self.pix_y)  # rows are already sorted inside each object
        xmed = self._medians(self.pix_x[np.lexsort((self.pix_x, self.pix_obj))])
        d2 = (self.pix_x - xmed[self.pix_obj]) ** 2 + (self.pix_y - ymed[self.pix_obj]) ** 2
        best = np.minimum.reduceat(d2, self.start)
        pos = np.arange(d2.size)
        cand = np.where(d2 == best[self.pix_obj], pos, d2.size)
        return np.minimum.reduceat(cand, self.start)  # first minimum in row-major order


def _pack_shelves(
    h: np.ndarray, w: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Place the boxes ``order`` on shelves of a canvas, with a zero row/column around and between boxes.

    Returns per box (top, left) and the row just below its shelf (arrays over all boxes, filled for
    those in ``order``), plus the canvas shape.
    """
    hs, ws = h[order], w[order]
    width = int(max(ws.max() + 2, np.ceil(np.sqrt(((hs + 1) * (ws + 1)).sum() * 1.2)) + 2))
    top = np.zeros(h.size, np.int64)
    left = np.zeros(h.size, np.int64)
    shelf_end = np.zeros(h.size, np.int64)
    row, col, shelf_h = 1, 1, 0
    members: list[int] = []
    for i in order.tolist():
        if col + w[i] + 1 > width:
            row += shelf_h + 1
            shelf_end[members] = row - 1
            col, shelf_h, members = 1, 0, []
        top[i], left[i] = row, col
        col += w[i] + 1
        shelf_h = max(shelf_h, int(h[i]))
        members.append(i)
    row += shelf_h + 1
    shelf_end[members] = row - 1
    return top, left, shelf_end, (row, width)


_CANVAS = 1 << 18  # float32 cells diffused together (1 MiB): the canvas stays in the CPU caches


def _diffuse(obj: _Objects) -> np.ndarray:
    """Heat diffusion of every object for its slice's n_iter; returns float32 T per pixel (pix_* order).

    Objects are independent: they are diffused in groups whose canvas fits in the CPU caches.
    """
    order = np.lexsort((-obj.h, -obj.n_iter))  # longest runs first, then tall boxes first
    area = np.cumsum(((obj.h + 1) * (obj.w + 1))[order])
    group = np.zeros(obj.n_obj, np.int64)
    group[order] = area // _CANVAS
    pix_group = group[obj.pix_obj]
    out = np.zeros(obj.pix_flat.size, np.float32)
    for g in np.unique(group):
        members = order[group[order] == g]
        pixels = np.flatnonzero(pix_group == g)
        out[pixels] = _diffuse_group(obj, members, pixels)
    return out


def _diffuse_group(obj: _Objects, order: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Diffusion of the objects ``order`` (sorted by decreasing n_iter) whose pixels are ``pixels``."""
    top, left, shelf_end, (rows, width) = _pack_shelves(obj.h, obj.w, order)
    owner = obj.pix_obj[pixels]
    pix_c = (top[owner] + obj.pix_y[pixels] - obj.y0[owner]) * width
    pix_c += left[owner] + obj.pix_x[pixels] - obj.x0[owner]
    divisor = np.full(rows * width, np.inf, np.float32)  # x / inf = 0 off the objects
    divisor[pix_c] = 9
    t_canvas = np.zeros(rows * width, np.float32)
    acc = np.zeros_like(t_canvas)
    # the original's neighbour order (sums are accumulated in it): self, up, down, left, right, diagonals
    shifts = [-width, width, -1, 1, -width - 1, -width + 1, width - 1, width + 1]
    centres = (top + obj.pix_y[obj.centre] - obj.y0) * width + left + obj.pix_x[obj.centre] - obj.x0
    centres_sorted = centres[order]
    niter_sorted = obj.n_iter[order]
    # canvas rows that still hold a running object after k iterations (objects sorted by n_iter)
    end_sorted = np.maximum.accumulate(shelf_end[order])
    out = np.zeros(pixels.size, np.float32)
    pix_niter = obj.n_iter[owner]
    snapshots = {int(k): np.flatnonzero(pix_niter == k) for k in np.unique(pix_niter)}
    for k in range(1, int(niter_sorted[0]) + 1):
        n_run = int(np.searchsorted(-niter_sorted, -k, side="right"))  # objects with n_iter >= k
        stop = (int(end_sorted[n_run - 1]) + 1) * width  # flat end of the rows to update (a zero row)
        t = t_canvas[:stop]
        t[centres_sorted[:n_run]] = _SOURCE
        lo, hi = width + 1, stop - width - 1  # every object pixel is inside [lo, hi)
        a = acc[lo:hi]
        np.add(t[lo:hi], t[lo + shifts[0] : hi + shifts[0]], out=a)
        for d in shifts[1:]:
            a += t[lo + d : hi + d]
        np.divide(a, divisor[lo:hi], out=t[lo:hi])
        if k in snapshots:  # objects whose n_iter is k are final now
            done = snapshots[k]
            out[done] = t_canvas[pix_c[done]]
    return out


def _slice_flows(stack: np.ndarray, within_labels: bool = False) -> np.ndarray:
    """2D flows of a stack of label images ``(N, h, w)`` -> float32 ``(N, 2, h, w)``, each slice alone.

    ``within_labels``: the gradient reads pixels of other objects as 0 (see :func:`mask_to_flow`).
    """
    n, h, w = stack.shape
    flow = np.zeros((n, 2, h, w), np.float32)
    obj = _Objects(stack)
    if obj.n_obj == 0:
        return flow
    heat = np.zeros((n, h + 2, w + 2), np.float32)  # zero-padded by one pixel, as the original
    s, y, x = obj.slice[obj.pix_obj], obj.pix_y + 1, obj.pix_x + 1
    heat[s, y, x] = np.log(np.float32(1) + _diffuse(obj))
    if within_labels:
        owner = np.zeros(heat.shape, np.int64)  # 1 + object index (unique over slices), 0 = background
        owner[s, y, x] = obj.pix_obj + 1

    def read(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """The heat of the neighbours at (yy, xx); with ``within_labels``, 0 where another object's."""
        value = heat[s, yy, xx]
        return np.where(owner[s, yy, xx] == obj.pix_obj + 1, value, np.float32(0)) if within_labels else value

    dy = read(y + 1, x) - read(y - 1, x)
    dx = read(y, x + 1) - read(y, x - 1)
    norm = np.float32(1e-20) + np.sqrt(dy * dy + dx * dx)
    flow[s, 0, y - 1, x - 1] = dy / norm
    flow[s, 1, y - 1, x - 1] = dx / norm
    return flow


# --------------------------------------------------------------------------------------------------
# flow checks and errors
# --------------------------------------------------------------------------------------------------


def _as_flow_tensor(
    flow: np.ndarray | torch.Tensor, device: str | torch.device | None
) -> tuple[torch.Tensor, bool]:
    """Validate a channel-first flow and return it as float32 ``(B, d, *spatial)`` plus "was batched"."""
    if isinstance(flow, torch.Tensor):
        t = flow.detach()
    else:
        arr = np.asarray(flow)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"flow must be a real-valued array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if device is not None:
        t = t.to(device)
    shape = tuple(t.shape)
    expected = "(2, H, W), (B, 2, H, W), (3, D, H, W) or (B, 3, D, H, W) (channel first)"
    if t.ndim == 3 and shape[0] == 2:
        t, batched = t[None], False
    elif t.ndim == 4 and shape[1] == 2:
        batched = True
    elif t.ndim == 4 and shape[0] == 3:
        t, batched = t[None], False
    elif t.ndim == 5 and shape[1] == 3:
        batched = True
    else:
        raise InputError(f"flow must have shape {expected}, got {shape}")
    if min(t.shape[2:]) < 1:
        raise InputError(f"flow has an empty spatial axis: {shape}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InputError("flow contains NaN or infinite values; expected finite numbers")
    return t.contiguous(), batched


def flow_error(flow: np.ndarray | torch.Tensor, labels: np.ndarray) -> dict[int, float]:
    """Mean squared error per object between a flow and the flow of the labels.

    Parameters
    ----------
    flow : np.ndarray or torch.Tensor
        Channel-first flow ``(2, H, W)`` or ``(3, D, H, W)`` (e.g. a model prediction).
    labels : np.ndarray
        Integer labels ``(H, W)`` / ``(D, H, W)``, e.g. from :func:`flow_to_mask`.

    Returns
    -------
    dict of int to float
        For every label > 0: the mean over its pixels of ``mean over channels of
        (mask_to_flow(labels) - flow) ** 2`` (the original's ``correct_flow_err`` measure).

    Raises
    ------
    InputError
        If the shapes do not match or are not 2D/3D channel-first.
    """
    t, batched = _as_flow_tensor(flow, None)
    labels = _check_labels(labels, "labels")
    if batched or tuple(t.shape[2:]) != labels.shape or t.shape[1] != labels.ndim:
        received = tuple(t.shape if batched else t.shape[1:])
        raise InputError(
            f"flow {received} and labels {labels.shape} do not match: expected flow (2, H, W) with "
            "labels (H, W), or (3, D, H, W) with labels (D, H, W)"
        )
    err = ((mask_to_flow(labels) - t[0].cpu().numpy()) ** 2).mean(axis=0)
    fg = labels != 0
    ids, inverse = np.unique(labels[fg], return_inverse=True)
    sums = np.bincount(inverse, weights=err[fg], minlength=ids.size)
    sizes = np.bincount(inverse, minlength=ids.size)
    return {int(i): float(s / n) for i, s, n in zip(ids, sums, sizes)}
