"""Choosing the channel(s) to segment (core.channels) and the 3 model input channels they become."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctxseg.core.errors import InputError
from napari_ctxseg.core.preprocess.channels import channel_record, select_channels
from napari_ctxseg.core.preprocess.normalize import model_input


def _image(c: int = 3, axis: int = 0) -> np.ndarray:
    data = np.stack([np.full((8, 10), 10.0 * (k + 1)) + np.arange(10) for k in range(c)], axis=axis)
    return data


def test_one_channel_of_a_channel_first_image() -> None:
    image = _image(3, axis=0)
    out = select_channels(image, 2, channel_axis=0)
    assert out.shape == (8, 10)
    np.testing.assert_array_equal(out, image[2])
    out[:] = 0
    assert image[2].any()  # a copy, never a view of the user's data


def test_channel_and_nuclear_channel_go_last_in_that_order() -> None:
    image = _image(4, axis=-1)
    out = select_channels(image, 3, 1)
    assert out.shape == (8, 10, 2)
    np.testing.assert_array_equal(out[..., 0], image[..., 3])
    np.testing.assert_array_equal(out[..., 1], image[..., 1])


def test_stack_with_a_channel_axis_keeps_its_planes() -> None:
    stack = np.random.default_rng(0).random((2, 5, 8, 8))  # (C, Z, H, W)
    assert select_channels(stack, 1, channel_axis=0).shape == (5, 8, 8)
    assert select_channels(stack, 1, 0, channel_axis=0).shape == (5, 8, 8, 2)


def test_the_model_input_rule() -> None:
    image = _image(3, axis=0)
    grey = model_input(select_channels(image, 1, channel_axis=0))
    assert grey.shape == (3, 8, 10)
    np.testing.assert_array_equal(grey[0], grey[1])
    np.testing.assert_array_equal(grey[0], grey[2])
    two = model_input(select_channels(image, 1, 0, channel_axis=0))
    assert two.shape == (3, 8, 10) and not two[2].any()  # (channel, nuclear, 0)
    assert not np.array_equal(two[0], two[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channel": 3, "channel_axis": 0}, "does not exist"),
        ({"channel": -1, "channel_axis": 0}, "does not exist"),
        ({"channel": 0, "nuclear_channel": 0, "channel_axis": 0}, "must differ"),
        ({"channel": 0, "channel_axis": 3}, "out of range"),
    ],
)
def test_bad_choices_say_what_exists(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        select_channels(_image(3, axis=0), **kwargs)


def test_a_2d_image_has_no_channel_to_choose() -> None:
    with pytest.raises(InputError, match="channel axis"):
        select_channels(np.zeros((8, 8)), 0)


def test_channel_record() -> None:
    assert channel_record(None) is None
    assert channel_record(0, channel_axis=0) == {
        "channel": 0,
        "nuclear_channel": None,
        "channel_axis": 0,
        "model_input": "(channel, channel, channel)",
    }
