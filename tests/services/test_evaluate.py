"""Evaluation helpers: pooled report scores."""

from __future__ import annotations

import math

import pytest

from napari_ctxseg.services.evaluate import pooled_scores


def test_pooled_report_scores_of_summed_counts() -> None:
    s = pooled_scores(8, 1, 1)
    assert (s["tp"], s["fp"], s["fn"]) == (8, 1, 1)
    assert s["ap50"] == pytest.approx(0.8) and s["f1_50"] == pytest.approx(16 / 18)
    assert math.isnan(pooled_scores(0, 0, 0)["ap50"]) and math.isnan(pooled_scores(0, 0, 0)["f1_50"])
