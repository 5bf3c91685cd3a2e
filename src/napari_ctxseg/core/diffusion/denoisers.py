"""Denoisers of a whole image: tile by tile, averaged over flipped views, with the context's features.

A sampler sees one denoiser ``D(x, sigma)`` of the whole (padded) image. Behind it:

- :class:`ViewDenoiser` is the EDM denoiser of one tile, averaged over flipped views of the tile
  (test-time augmentation; one view is the plain denoiser);
- :class:`TiledDenoiser` evaluates the view denoisers tile by tile and blends their outputs with ramp
  weights (:func:`~napari_ctxseg.core.diffusion.tiling.blend_weight`);
- :class:`StreamingBlend` does the same blending for a one-step run, whose tiles are denoised once each
  and need not be kept.

Layouts: NCHW tensors; the latent and the denoised flows are ``(N, 2, H, W)`` (samples, (dy, dx)).
"""

from __future__ import annotations

import torch

from ..flows.from_masks import flip_flow, flip_spatial
from ..nn.models import ImageFeatures, PContext, SegP
from .edm import EDMDenoiser
from .tiling import Tile, blend_weight

__all__ = ["TTA_FLIPS", "StreamingBlend", "TiledDenoiser", "ViewDenoiser", "context_features"]

#: The views of test-time augmentation, as (flip_y, flip_x); the first is the image itself.
TTA_FLIPS = ((False, False), (True, False), (False, True), (True, True))


def context_features(model: SegP, image: torch.Tensor, contexts: list[PContext]) -> ImageFeatures:
    """Image features with the context features averaged over all references (as the original's set_image).

    Each reference counts with its number of reference images (``PContext.num_refs``).
    """
    if len(contexts) <= 1:
        return model.prepare(image, contexts[0] if contexts else None)
    per_ref = [model.prepare(image, c) for c in contexts]
    feats = [f.ref_features for f in per_ref if f.ref_features is not None]  # all: each has a context
    n = sum(c.num_refs for c in contexts)
    mean = []
    for k in range(len(feats[0])):
        total = feats[0][k] * contexts[0].num_refs
        for f, c in zip(feats[1:], contexts[1:]):
            total = total + f[k] * c.num_refs
        mean.append(total / n)
    return ImageFeatures(per_ref[0].x_skips, mean)


class ViewDenoiser:
    """D(x, sigma) of one tile, averaged over flipped views: the mean over g of g(D(g(x) | g(image))).

    A flip g maps the image, the noisy flow x and the denoised flow alike
    (:func:`~napari_ctxseg.core.flows.from_masks.flip_flow` negates the flipped component); one view, the
    image itself, is the plain denoiser. Contexts are not flipped: the model was trained with references
    flipped independently of their target.
    """

    def __init__(
        self,
        model: SegP,
        sigma_data: float,
        image: torch.Tensor,
        contexts: list[PContext],
        views: tuple[tuple[bool, bool], ...] = TTA_FLIPS[:1],
    ) -> None:
        self.views = views
        self.denoisers = [
            EDMDenoiser(lambda xi, c, f=f: model.predict(xi, c, f), sigma_data=sigma_data)
            for f in (context_features(model, flip_spatial(image, *v), contexts) for v in views)
        ]

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The denoised flow of the noisy flow ``x`` at noise level ``sigma``, averaged over the views."""
        outs = [flip_flow(den(flip_flow(x, *v), sigma), *v) for v, den in zip(self.views, self.denoisers)]
        # one view is returned as it is, so that the plain path stays bit-identical to the denoiser
        return outs[0] if len(outs) == 1 else sum(outs[1:], outs[0]) / len(outs)


class TiledDenoiser:
    """D(x, sigma) evaluated tile by tile (one :class:`ViewDenoiser` each), blended with ramp weights."""

    def __init__(
        self, tiles: list[Tile], denoisers: list[ViewDenoiser], shape: tuple[int, int], overlap: int
    ) -> None:
        self.tiles, self.denoisers, self.shape = tiles, denoisers, shape
        self.weights = [blend_weight(t, shape, overlap) for t in tiles]

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The denoised flow of the whole (padded) image: the tiles' outputs, blended."""
        if len(self.tiles) == 1:
            return self.denoisers[0](x, sigma)
        out = torch.zeros_like(x)
        norm = torch.zeros(self.shape, dtype=x.dtype, device=x.device)
        for tile, den, w in zip(self.tiles, self.denoisers, self.weights):
            w = w.to(x.device, x.dtype)
            out[(..., *tile.slices)] += den(x[(..., *tile.slices)], sigma) * w
            norm[tile.slices] += w
        return out / norm


class StreamingBlend:
    """Accumulates weighted tile outputs (on the CPU) and normalises at the end.

    Examples
    --------
    >>> from napari_ctxseg.core.diffusion.tiling import plan_tiles
    >>> tiles = plan_tiles((64, 96), 64, 16)
    >>> blend = StreamingBlend((1, 2, 64, 96), (64, 96), 16)
    >>> for t in tiles:
    ...     blend.add(t, torch.ones(1, 2, t.size_y, t.size_x))
    >>> torch.allclose(blend.result(), torch.ones(1, 2, 64, 96))
    True
    """

    def __init__(self, shape: tuple[int, ...], spatial: tuple[int, int], overlap: int) -> None:
        self.out = torch.zeros(shape)
        self.norm = torch.zeros(spatial)
        self.spatial, self.overlap = spatial, overlap

    def add(self, tile: Tile, value: torch.Tensor) -> None:
        """Add a tile's output ``(..., size_y, size_x)``, weighted by its blending ramp."""
        w = blend_weight(tile, self.spatial, self.overlap)
        self.out[(..., *tile.slices)] += value * w
        self.norm[tile.slices] += w

    def result(self) -> torch.Tensor:
        """The blended output: the weighted sum divided by the summed weights."""
        return self.out / self.norm
