"""Step-by-step flow following (``flow_to_mask``'s "exact" mode): the walkers and their loop.

A walker is a pixel being followed with the original's arithmetic (:class:`_Walkers`); :func:`_run`
advances a group of them and sets aside those whose final cell is known, which is exact: a trajectory that
reaches a fixed point or a 2-cycle stays on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .following import _Follower

__all__: list[str] = []


class _Walkers:
    """Pixels being followed: index, flow-table base, positions (current and two previous), moves left.

    Each walker carries its own state, so any subset can be advanced, set aside or merged with others
    without changing its trajectory.
    """

    _FLAT = ("pix", "base", "left")
    _POSITIONS = ("p", "prev", "prev2")

    def __init__(self, pix: torch.Tensor, base: torch.Tensor, p: torch.Tensor, niter: int) -> None:
        self.pix, self.base, self.p = pix, base, p
        self.prev = self.prev2 = p
        self.left = torch.full(pix.shape, niter, dtype=torch.int32, device=pix.device)

    def __len__(self) -> int:
        return self.pix.shape[0]

    def advance(self, follower: _Follower) -> None:
        """Move every walker with moves left by one iteration (the others stay put)."""
        v, _ = follower.velocity(self.p, self.base)
        m = self.left.clamp(0, 1)
        new = self.p + v * m.to(torch.float32)  # v * 1 == v: a step is exactly the original's
        self.left = self.left - m
        self.prev2, self.prev, self.p = self.prev, self.p, follower.clip(new)

    def settled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Walkers whose final cell is known, and whether it is that of ``prev`` (else of ``p``).

        Known: no moves left; a fixed point (``p == prev``); or a 2-cycle
        (``p == prev2``: the last position is ``p`` if the moves left are even, else ``prev``). The
        position sequence is deterministic, so this is exact.
        """
        fixed = (self.p == self.prev).all(0)
        cycle = (self.p == self.prev2).all(0) & ~fixed
        done = fixed | cycle | (self.left <= 0)
        return done, cycle & (self.left & 1).bool()

    def select(self, index: torch.Tensor) -> _Walkers:
        """The walkers ``index`` (a new object)."""
        out = object.__new__(_Walkers)
        for name in self._FLAT:
            setattr(out, name, getattr(self, name).index_select(0, index))
        for name in self._POSITIONS:
            setattr(out, name, getattr(self, name).index_select(1, index))
        return out

    @staticmethod
    def merge(groups: list[_Walkers]) -> _Walkers:
        """All walkers of ``groups`` in one object."""
        out = object.__new__(_Walkers)
        for name in _Walkers._FLAT:
            setattr(out, name, torch.cat([getattr(g, name) for g in groups]))
        for name in _Walkers._POSITIONS:
            setattr(out, name, torch.cat([getattr(g, name) for g in groups], 1))
        return out


def _run(walkers: _Walkers, follower: _Follower, final: torch.Tensor, until: int) -> _Walkers | None:
    """Advance ``walkers`` until none is left (returns None) or fewer than ``until`` are (returns those).

    The final positions of the walkers that settle are written into ``final``.
    """
    step = 0
    while True:
        walkers.advance(follower)
        step += 1
        if step % 2:  # settle every second step: compacting costs about as much as a step
            continue
        done, use_prev = walkers.settled()
        if not bool(done.any()):
            continue
        idx = torch.nonzero(done)[:, 0]
        chosen = torch.where(use_prev, walkers.prev, walkers.p).index_select(1, idx)
        final.index_copy_(1, walkers.pix.index_select(0, idx), chosen)
        keep = torch.nonzero(~done)[:, 0]
        if keep.numel() == 0:
            return None
        walkers = walkers.select(keep)
        if len(walkers) < until:
            return walkers
