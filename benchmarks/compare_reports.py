"""Two evaluation reports of the same images side by side: pooled AP@0.5 of each, and B - A with a paired
95 % bootstrap interval over images (``napari_ctxseg.services.evaluate.paired_ap_difference``).

Usage: ``python benchmarks/compare_reports.py A.json B.json [--setting "1 step x 1 sample"]``, where each
file is written by ``benchmarks/eval_dsb.py --json`` (one report per setting) or holds one report of
``evaluate_folder``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_ctxseg.services.evaluate import MIN_INTERVAL_IMAGES, paired_ap_difference


def _report(path: Path, setting: str) -> dict:
    data = json.loads(path.read_text())
    report = data if "per_image" in data else data[setting]
    if not all("counts" in r for r in report["per_image"]):
        raise SystemExit(f"{path} has no per-image counts: evaluate again with this version")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--setting", default="1 step x 1 sample", help="which setting of an eval_dsb.py file")
    args = ap.parse_args()
    a, b = _report(args.a, args.setting), _report(args.b, args.setting)
    print(f"A = {args.a}, B = {args.b}: pooled AP@0.5, B - A with a paired 95 % bootstrap interval")
    print(f"{'modality':<13} {'images':>6} {'A':>7} {'B':>7} {'B - A':>7}  interval")
    for mod, s in a["methods"]["ctxseg"].items():
        if mod != "all" and s["images"] < MIN_INTERVAL_IMAGES:  # one image: no interval to speak of
            continue
        diff, low, high = paired_ap_difference(a["per_image"], b["per_image"], modality=mod)
        sb = b["methods"]["ctxseg"][mod]
        print(
            f"{mod:<13} {s['images']:>6} {s['ap50']:>7.3f} {sb['ap50']:>7.3f} {diff:>+7.3f}  "
            f"{low:+.3f} to {high:+.3f}"
        )


if __name__ == "__main__":
    main()
