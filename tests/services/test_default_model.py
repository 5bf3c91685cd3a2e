"""The bundled default model on real nuclei it has never seen (DSB 2018 ``val``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctxseg.services.evaluate import baseline_watershed, match_counts, modality
from napari_ctxseg.services.models import bundled_model_path
from napari_ctxseg.services.segment import segment
from napari_ctxseg.services.training import read_array, read_split
from tests.conftest import DATA

DSB = DATA / "dsb2018_train"


def test_bundled_model_segments_unseen_fluorescence_nuclei_out_of_the_box() -> None:
    """The first 8 fluorescence images of ``val`` (split order), default settings: pooled AP@0.5 well
    above the Otsu + watershed baseline. Phase-22 weights (shipped): 0.84 against the baseline's 0.66."""
    if not (DSB / "split.json").is_file():
        pytest.skip(f"shared data not found at {DSB}")
    if not bundled_model_path().is_file():
        pytest.skip("no bundled model")
    names = read_split(DSB / "split.json", "val")
    ours, base = np.zeros(3, int), np.zeros(3, int)
    used = 0
    for name in names:
        image = read_array(DSB / "images" / f"{name}.tif")
        if modality(image) != "fluorescence":
            continue
        gt = read_array(DSB / "labels" / f"{name}.tif")
        ours += match_counts(segment(image, device="cpu").labels, gt)
        base += match_counts(baseline_watershed(image), gt)
        used += 1
        if used == 8:
            break
    ap, ap_base = ours[0] / ours.sum(), base[0] / base.sum()
    assert ap >= 0.75, (ours, ap)
    assert ap >= ap_base + 0.1, (ap, ap_base)


def test_the_sampler_settings_the_bundled_model_declares_are_the_ones_that_work() -> None:
    """The bundled checkpoint declares the steps and solvers it was validated with (the widget and the CLI
    warn outside them). On 3 ``val`` fluorescence images a declared setting (2 steps of edf) scores like
    one step, and settings the declaration flags (4 steps of edf, 2 of heun) score far below."""
    if not (DSB / "split.json").is_file():
        pytest.skip(f"shared data not found at {DSB}")
    if not bundled_model_path().is_file():
        pytest.skip("no bundled model")
    from napari_ctxseg.core.io.checkpoint import read_info, sampling_advice
    from napari_ctxseg.services.models import load_model

    info = read_info(bundled_model_path())
    assert info.sampling is not None and "edf" in info.sampling["solvers"]
    settings = [(1, "edf"), (2, "edf"), (4, "edf"), (2, "heun")]
    flagged = [sampling_advice(info, steps, solver) is not None for steps, solver in settings]
    assert flagged == [False, False, True, True]
    loaded = load_model("default", device="cpu")
    counts = {s: np.zeros(3, int) for s in settings}
    used = 0
    for name in read_split(DSB / "split.json", "val"):
        image = read_array(DSB / "images" / f"{name}.tif")
        if modality(image) != "fluorescence":
            continue
        gt = read_array(DSB / "labels" / f"{name}.tif")
        for steps, solver in settings:
            labels = segment(image, loaded=loaded, steps=steps, solver=solver).labels
            counts[(steps, solver)] += match_counts(labels, gt)
        used += 1
        if used == 3:
            break
    ap = {s: c[0] / c.sum() for s, c in counts.items()}
    assert ap[(2, "edf")] >= ap[(1, "edf")] - 0.05, ap
    assert max(ap[(4, "edf")], ap[(2, "heun")]) <= ap[(1, "edf")] - 0.3, ap
