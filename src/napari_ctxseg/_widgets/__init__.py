"""Thin napari dock widgets over :mod:`napari_ctxseg.services`."""
