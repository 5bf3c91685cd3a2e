"""Choose the channel(s) to segment from a multichannel image, cellpose style.

The rule (one for the widget, the CLI and the API): the *channel to segment* (cytoplasm, membrane or the
nuclei themselves) and an optional *nuclear channel* are taken from the image's channel axis and put
channels-last, in that order. :func:`~napari_ctxseg.core.preprocess.normalize.model_input` then makes the
model's 3 input channels:

- one channel ``c``: ``(c, c, c)``, a grey image (the grey images the bundled model was trained on are
  repeated the same way);
- channel and nuclear channel ``c, n``: ``(c, n, 0)``, as a red/green picture with an empty blue channel.

All chosen channels are normalised together (one pair of percentiles), as an RGB image is. The bundled
model was trained on grey and RGB images (grey repeated to 3 channels); it has seen no 2-channel
image, so a nuclear channel is an option to try, not a tuned default. Without a choice (``channel=None``)
an image is read as before: ``(H, W)`` grey or ``(H, W, C)`` with ``C <= 3`` channels last.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["channel_record", "select_channels"]


def select_channels(
    image: np.ndarray,
    channel: int,
    nuclear_channel: int | None = None,
    *,
    channel_axis: int = -1,
) -> np.ndarray:
    """The chosen channel(s) of ``image``, channels last: ``(..., H, W)`` or ``(..., H, W, 2)``.

    Parameters
    ----------
    image : np.ndarray
        An image with a channel axis, e.g. ``(H, W, C)`` or ``(C, H, W)``, or a stack ``(C, Z, H, W)``.
    channel : int
        The channel to segment (0-based index along ``channel_axis``).
    nuclear_channel : int, optional
        A nuclear channel, put second (see the module notes).
    channel_axis : int
        The axis that holds the channels (default -1, the last); negative values count from the end.

    Returns
    -------
    np.ndarray
        A new array (never a view of ``image``): the channel axis removed for one channel, or moved last
        with the two chosen channels.

    Raises
    ------
    InputError
        An axis or channel index out of range, or the same channel chosen twice.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(3 * 8 * 8).reshape(3, 8, 8)      # (C, H, W)
    >>> select_channels(image, 1, channel_axis=0).shape
    (8, 8)
    >>> both = select_channels(image, 2, 0, channel_axis=0)
    >>> both.shape, bool((both[..., 1] == image[0]).all())
    ((8, 8, 2), True)
    """
    image = np.asarray(image)
    if image.ndim < 3:
        raise InputError(
            f"choosing a channel needs an image with a channel axis, e.g. (H, W, C) or (C, H, W); got "
            f"shape {image.shape}"
        )
    if not -image.ndim <= channel_axis < image.ndim:
        raise InputError(f"channel axis {channel_axis} is out of range for an image of shape {image.shape}")
    axis = channel_axis % image.ndim
    n = image.shape[axis]
    chosen = [channel] if nuclear_channel is None else [channel, nuclear_channel]
    for what, c in zip(("channel", "nuclear channel"), chosen):
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or not 0 <= c < n:
            raise InputError(
                f"{what} {c!r} does not exist: the image of shape {image.shape} has {n} channels "
                f"(0 to {n - 1}) along axis {axis}"
            )
    if nuclear_channel is not None and nuclear_channel == channel:
        raise InputError(f"the nuclear channel must differ from the channel to segment (both {channel})")
    moved = np.moveaxis(image, axis, -1)
    out = moved[..., int(channel)] if nuclear_channel is None else moved[..., [int(c) for c in chosen]]
    return np.array(out, copy=True)


def channel_record(
    channel: int | None, nuclear_channel: int | None = None, channel_axis: int = -1
) -> dict[str, Any] | None:
    """The channel choice as recorded in a result's provenance (None: the image as it is).

    Examples
    --------
    >>> channel_record(1, 0, channel_axis=0)
    {'channel': 1, 'nuclear_channel': 0, 'channel_axis': 0, 'model_input': '(channel, nuclear, 0)'}
    >>> channel_record(None) is None
    True
    """
    if channel is None:
        return None
    return {
        "channel": int(channel),
        "nuclear_channel": None if nuclear_channel is None else int(nuclear_channel),
        "channel_axis": int(channel_axis),
        "model_input": "(channel, channel, channel)" if nuclear_channel is None else "(channel, nuclear, 0)",
    }
