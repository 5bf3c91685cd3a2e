"""Evaluation helpers: pooled report scores, per-image counts and their bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

from napari_ctxseg.services.evaluate import (
    bootstrap_ap_interval,
    evaluate_folder,
    format_report,
    match_counts,
    paired_ap_difference,
    pooled_scores,
)
from tests.conftest import blobs


def test_pooled_report_scores_of_summed_counts() -> None:
    s = pooled_scores(8, 1, 1)
    assert (s["tp"], s["fp"], s["fn"]) == (8, 1, 1)
    assert s["ap50"] == pytest.approx(0.8) and s["f1_50"] == pytest.approx(16 / 18)
    assert math.isnan(pooled_scores(0, 0, 0)["ap50"]) and math.isnan(pooled_scores(0, 0, 0)["f1_50"])


def test_match_counts_counts_an_exact_tie() -> None:
    """IoU == threshold is a match (the ``>=`` rule of matching_scores), one-to-one when pairs tie."""
    assert match_counts(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]])) == (1, 0, 0)
    assert match_counts(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]]), threshold=0.6) == (0, 1, 1)
    assert match_counts(np.array([[1, 1, 1, 0]]), np.array([[1, 1, 1, 1]]), threshold=0.75) == (1, 0, 0)
    assert match_counts(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]])) == (1, 1, 0)


def test_evaluate_folder_keeps_per_image_counts_summing_to_the_pooled_ones(tmp_path, tiny_checkpoint) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for i in range(3):
        img, lab = blobs((64, 64), seed=i)
        tifffile.imwrite(images / f"im{i}.tif", img)
        tifffile.imwrite(labels / f"im{i}.tif", lab.astype(np.uint16))
    report = evaluate_folder(
        images,
        labels,
        options=dict(checkpoint=str(tiny_checkpoint), device="cpu", diameter=None),
        baseline=True,
    )
    assert [r["name"] for r in report["per_image"]] == ["im0", "im1", "im2"]
    for method in ("ctxseg", "baseline"):
        summed = np.sum([r["counts"][method] for r in report["per_image"]], axis=0)
        pooled = report["methods"][method]["all"]
        assert list(summed) == [pooled["tp"], pooled["fp"], pooled["fn"]]
    # the watershed finds these discs: its counts are real, not zeros
    assert report["methods"]["baseline"]["all"]["tp"] > 0
    low, high = bootstrap_ap_interval(report["per_image"], "baseline")
    assert 0.0 <= low <= report["methods"]["baseline"]["all"]["ap50"] <= high <= 1.0


def _rows(counts: list[tuple[int, int, int]], modality: str = "fluorescence") -> list[dict]:
    return [{"modality": modality, "counts": {"ctxseg": list(c)}} for c in counts]


def test_bootstrap_interval_brackets_the_pooled_score_and_is_seeded() -> None:
    rows = _rows([(9, 1, 0), (5, 3, 2), (2, 4, 4), (8, 0, 1), (7, 2, 2)]) + _rows([(0, 5, 5)], "colour")
    fluor = [r for r in rows if r["modality"] == "fluorescence"]
    tp, fp, fn = np.sum([r["counts"]["ctxseg"] for r in fluor], axis=0)
    point = tp / (tp + fp + fn)
    low, high = bootstrap_ap_interval(rows, modality="fluorescence")
    assert low < point < high and high - low > 0.05
    assert bootstrap_ap_interval(rows, modality="fluorescence") == (low, high)
    assert bootstrap_ap_interval(rows, modality="fluorescence", seed=1) != (low, high)
    # the colour image pulls the interval over all images down
    assert bootstrap_ap_interval(rows)[0] < low
    # a wider coverage gives a wider interval
    wide = bootstrap_ap_interval(rows, modality="fluorescence", level=0.99)
    assert wide[0] <= low and wide[1] >= high


def test_bootstrap_interval_of_identical_images_is_their_score() -> None:
    low, high = bootstrap_ap_interval(_rows([(8, 1, 1)] * 4))
    assert low == pytest.approx(0.8) and high == pytest.approx(0.8)


def test_bootstrap_interval_refuses_what_it_cannot_resample() -> None:
    with pytest.raises(ValueError, match="no images of modality 'colour'"):
        bootstrap_ap_interval(_rows([(1, 0, 0)]), modality="colour")
    with pytest.raises(ValueError, match="no per-image counts for 'baseline'"):
        bootstrap_ap_interval(_rows([(1, 0, 0)]), "baseline")


def test_report_table_gives_intervals_only_where_there_are_enough_images() -> None:
    rows = _rows([(9, 1, 0), (5, 3, 2), (2, 4, 4), (8, 0, 1), (7, 2, 2)]) + _rows([(0, 5, 5)], "colour")
    methods = {"ctxseg": {"all": {**pooled_scores(31, 15, 14), "images": 6}}}
    methods["ctxseg"]["colour"] = {**pooled_scores(0, 5, 5), "images": 1}
    table = format_report({"methods": methods, "seconds_per_image": {"ctxseg": 0.5}, "per_image": rows})
    low, high = bootstrap_ap_interval(rows)
    all_row, colour_row = (line for line in table.splitlines() if line.startswith("ctxseg "))
    assert all_row.endswith(f"{low:.3f}-{high:.3f}")
    assert colour_row.endswith("0.000")  # one image: no interval


def _named(counts: list[tuple[int, int, int]]) -> list[dict]:
    return [{**row, "name": f"im{i}"} for i, row in enumerate(_rows(counts))]


def test_paired_difference_cancels_what_the_images_share() -> None:
    # B finds one more object than A on every image: a small, consistent gain on very unequal images
    a = _named([(90, 5, 5), (10, 10, 30), (40, 2, 8), (5, 5, 20), (70, 10, 10), (20, 5, 25)])
    b = _named([(tp + 1, fp, fn - 1) for tp, fp, fn in (r["counts"]["ctxseg"] for r in a)])
    diff, low, high = paired_ap_difference(a, b)
    assert diff == pytest.approx(6 / 370)  # one TP more per image, same total: (241 - 235) / 370
    assert 0 < low <= diff <= high
    lone = bootstrap_ap_interval(a)
    assert high - low < 0.2 * (lone[1] - lone[0])
    # reports of the same images in another order pair by name
    assert paired_ap_difference(a, b[::-1]) == (diff, low, high)
    # with no change the difference is exactly zero
    assert paired_ap_difference(a, a) == (0.0, 0.0, 0.0)


def test_paired_difference_needs_the_same_images() -> None:
    a = _named([(9, 1, 0), (5, 3, 2)])
    with pytest.raises(ValueError, match="different images"):
        paired_ap_difference(a, a[:1])


def test_compare_reports_script_prints_the_paired_difference(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    a = _named([(90, 5, 5), (10, 10, 30), (40, 2, 8), (5, 5, 20), (70, 10, 10), (20, 5, 25)])
    b = _named([(tp + 1, fp, fn - 1) for tp, fp, fn in (r["counts"]["ctxseg"] for r in a)])
    for name, rows in (("a", a), ("b", b)):
        tp, fp, fn = np.sum([r["counts"]["ctxseg"] for r in rows], axis=0).tolist()
        report = {
            "methods": {"ctxseg": {"all": {**pooled_scores(tp, fp, fn), "images": 6}}},
            "per_image": rows,
        }
        # eval_dsb.py --json writes one report per setting
        (tmp_path / f"{name}.json").write_text(json.dumps({"1 step x 1 sample": report}))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_reports.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a.json"), str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    diff, low, high = paired_ap_difference(a, b)
    assert f"{diff:>+7.3f}  {low:+.3f} to {high:+.3f}" in out.splitlines()[-1]


def test_eval_dsb_script_scores_tta_beside_the_plain_setting(tmp_path, tiny_checkpoint) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    names = [f"im{i}" for i in range(5)]
    for i, name in enumerate(names):
        img, lab = blobs((64, 64), seed=i)
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", img)
        tifffile.imwrite(tmp_path / "labels" / f"{name}.tif", lab.astype(np.uint16))
    (tmp_path / "split.json").write_text(json.dumps({"val": names, "train": []}))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_dsb.py"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(tmp_path),
        "--multi",
        "1x1",
        "--diameter",
        "none",
    ]
    out = subprocess.run(
        [sys.executable, str(script), *args, "--tta", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    reports = json.loads((tmp_path / "r.json").read_text())
    tta = reports["1 step x 1 sample + flips (TTA)"]
    assert len(reports) == 3 and len(tta["per_image"]) == 5
    diff, low, high = paired_ap_difference(reports["1 step x 1 sample"]["per_image"], tta["per_image"])
    assert "TTA minus 1 step x 1 sample" in out
    assert f"all           {diff:+.3f} [{low:+.3f}, {high:+.3f}]" in out
