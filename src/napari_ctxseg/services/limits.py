"""Bounds on the settings that drive the size and time of a segmentation, checked before any allocation.

What cannot work is refused (:class:`~napari_ctxseg.core.errors.ConfigError`); what will work but need
more memory than is free, or many times the work of the default settings, is announced as a
:class:`~napari_ctxseg.core.errors.CtxSegWarning`. Memory is estimated from the image size, the scale and
the number of samples (the flows and labels held at once), so the estimate is a lower bound: the network's
own activations come on top.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..core.errors import ConfigError, CtxSegWarning

__all__ = [
    "MAX_SEED",
    "MIN_DIAMETER",
    "MIN_TILE_SIZE",
    "SLOW_FACTOR",
    "check_run_size",
    "check_seed",
    "check_segment_settings",
    "memory_estimate",
    "system_memory",
]

#: objects smaller than this (pixels) are enlarged more than ``MODEL_DIAMETER / MIN_DIAMETER`` = 10 times
MIN_DIAMETER = 2.0
#: smaller tiles show the network too little of each object and multiply the calls (overlap, overhead)
MIN_TILE_SIZE = 64
#: seeds are 64-bit (torch generators); 0 <= seed <= MAX_SEED
MAX_SEED = 2**63 - 1
#: warn when a run does this many times the network work of the default settings on the same image
SLOW_FACTOR = 64.0
GIB = 2.0**30


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int in ``[0, MAX_SEED]``.

    Raises
    ------
    ConfigError
        For a non-integer or a seed out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | float) or int(seed) != seed:
        raise ConfigError(f"{what} must be a whole number, got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"{what} must be from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)


def check_segment_settings(
    *, num_samples: int, diameter: Any, tile_size: int, tile_overlap: int, seed: Any
) -> None:
    """Refuse settings that cannot work, whatever the image.

    Raises
    ------
    ConfigError
        A diameter below ``MIN_DIAMETER`` pixels, tiles smaller than ``MIN_TILE_SIZE``, a negative tile
        overlap, or a seed out of range.
    """
    check_seed(seed)
    if isinstance(diameter, int | float) and not isinstance(diameter, bool) and diameter < MIN_DIAMETER:
        raise ConfigError(
            f"diameter {diameter!r} px is below {MIN_DIAMETER:g} px: the image would be enlarged "
            f"{20.0 / diameter:.3g} times; objects that small cannot be segmented (use 'auto' or a "
            f"diameter of at least {MIN_DIAMETER:g} px)"
        )
    if int(tile_size) != tile_size or tile_size < MIN_TILE_SIZE:
        raise ConfigError(
            f"tile size must be at least {MIN_TILE_SIZE} pixels, got {tile_size!r} (smaller tiles show the "
            f"model too little of each object and run tens of times slower; the default is 1024)"
        )
    if int(tile_overlap) != tile_overlap or tile_overlap < 0:
        raise ConfigError(f"tile overlap must be >= 0 pixels, got {tile_overlap!r}")


def system_memory() -> tuple[float, float] | None:
    """``(total, available)`` bytes of RAM, or None where they cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: float(line.split()[1]) * 1024 for line in f if ":" in line}
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", info["MemTotal"]))
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional: macOS and Windows

        vm = psutil.virtual_memory()
        return float(vm.total), float(vm.available)
    except Exception:  # not installed, or no access
        return None


def memory_estimate(shape: tuple[int, int], scale: float, num_samples: int) -> float:
    """Bytes held at once by the flows and labels of one 2D image (a lower bound).

    Per sample: the noise, the blended flows and the flow-following stack at the model's scale (about 48
    bytes a pixel), and the flows and labels at the image's size (12 bytes a pixel).
    """
    h, w = (max(8, round(n * scale)) for n in shape)
    return float(num_samples + 1) * (48.0 * h * w + 12.0 * shape[0] * shape[1])


def check_run_size(
    shape: tuple[int, int], scale: float, *, num_samples: int, views: int, what: str = "image"
) -> None:
    """Refuse a run that needs more memory than the machine has; warn when it is huge or very slow.

    Raises
    ------
    ConfigError
        When :func:`memory_estimate` exceeds the machine's total RAM.

    Warns
    -----
    CtxSegWarning
        When it exceeds half the available RAM, or when the network does at least ``SLOW_FACTOR`` times
        the work of one sample without flips at the image's own scale.
    """
    need = memory_estimate(shape, scale, num_samples)
    mem = system_memory()
    settings = f"{num_samples} sample(s) of a {shape[0]} x {shape[1]} {what} at scale {scale:.3g}"
    if mem is not None:
        total, available = mem
        if need > total:
            raise ConfigError(
                f"{settings} need about {need / GIB:.3g} GiB of memory; this machine has "
                f"{total / GIB:.3g} GiB (use fewer samples, a larger diameter, or a smaller image)"
            )
        if need > available / 2:
            warnings.warn(
                f"{settings} need about {need / GIB:.3g} GiB of memory; {available / GIB:.3g} GiB is free",
                CtxSegWarning,
                stacklevel=3,
            )
    work = num_samples * views * max(scale, 1.0) ** 2
    if work >= SLOW_FACTOR and not math.isinf(work):
        warnings.warn(
            f"{settings} with {views} view(s): about {work:.0f} times the network work of one sample "
            f"at the image's scale; this will be slow",
            CtxSegWarning,
            stacklevel=3,
        )
