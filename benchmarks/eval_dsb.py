"""DSB 2018 `val` split: pooled AP@0.5 / F1@0.5 per modality for the bundled model (1 step x 1 sample and a
multi-step, multi-sample setting) and the Otsu + watershed baseline, side by side in one run.

Usage: ``python benchmarks/eval_dsb.py [--checkpoint default] [--data ../shared/data/dsb2018_train]
[--limit N] [--json out.json] [--multi 2x4] [--diameter auto|none|PX] [--tta]``

``--tta`` adds a third setting, 1 step x 1 sample averaged over the image and its flips, and its paired
difference from the plain 1 step x 1 sample on the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_ctxseg.cli_segment import parse_diameter
from napari_ctxseg.services.evaluate import (
    MIN_INTERVAL_IMAGES,
    bootstrap_ap_interval,
    evaluate_folder,
    paired_ap_difference,
)

ROOT = Path(__file__).resolve().parents[1]
TTA = "1 step x 1 sample + flips (TTA)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dsb2018_train")
    ap.add_argument("--subset", default="val")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--multi",
        default="2x4",
        help="steps x samples of the multi-step setting (default 2x4: the bundled model is validated for "
        "1-2 steps; 4x4 scores 0.43 on val, docs/model_card.md 'Sampler steps')",
    )
    ap.add_argument(
        "--diameter", type=parse_diameter, default="auto", help="'auto' (the default), 'none' or pixels"
    )
    ap.add_argument(
        "--tta", action="store_true", help="also score 1 step x 1 sample with test-time flips (4x the calls)"
    )
    args = ap.parse_args()
    steps, samples = (int(v) for v in args.multi.split("x"))
    settings = {
        "1 step x 1 sample": dict(steps=1, num_samples=1),
        f"{steps} steps x {samples} samples (edf)": dict(steps=steps, num_samples=samples, solver="edf"),
    }
    if args.tta:
        settings[TTA] = dict(steps=1, num_samples=1, tta=True)
    rows, reports = [], {}
    for i, (name, opts) in enumerate(settings.items()):
        report = evaluate_folder(
            args.data / "images",
            args.data / "labels",
            names_file=args.data / "split.json",
            subset=args.subset,
            options=dict(checkpoint=args.checkpoint, device="cpu", diameter=args.diameter, **opts),
            baseline=i == 0,
            limit=args.limit,
        )
        reports[name] = report
        for method, by_mod in report["methods"].items():
            label = name if method == "ctxseg" else "Otsu + watershed baseline"
            for mod, s in by_mod.items():
                rows.append(
                    (
                        label,
                        mod,
                        s["images"],
                        s["tp"],
                        s["fp"],
                        s["fn"],
                        s["ap50"],
                        s["f1_50"],
                        report["seconds_per_image"][method],
                    )
                )
    print(
        f"DSB 2018 {args.subset}: pooled one-to-one matching at IoU 0.5; checkpoint {args.checkpoint}; "
        f"diameter {args.diameter}"
    )
    print(
        f"{'method':<34} {'modality':<13} {'n':>3} {'TP':>5} {'FP':>5} {'FN':>5} "
        f"{'AP@0.5':>7} {'F1@0.5':>7} {'s/img':>6}"
    )
    for r in rows:
        print(
            f"{r[0]:<34} {r[1]:<13} {r[2]:>3} {r[3]:>5} {r[4]:>5} {r[5]:>5} "
            f"{r[6]:>7.3f} {r[7]:>7.3f} {r[8]:>6.2f}"
        )
    first = next(iter(reports.values()))
    scores = first["methods"]["ctxseg"]
    groups = [mod for mod, s in scores.items() if mod == "all" or s["images"] >= MIN_INTERVAL_IMAGES]
    print("95 % bootstrap intervals over images (2000 resamples) of pooled AP@0.5, 1 step x 1 sample:")
    for mod in groups:
        low, high = bootstrap_ap_interval(first["per_image"], modality=mod)
        print(f"  {mod:<13} {scores[mod]['ap50']:.3f} [{low:.3f}, {high:.3f}]")
    if TTA in reports:
        print("TTA minus 1 step x 1 sample, paired over the same images (95 % bootstrap interval):")
        for mod in groups:
            diff, low, high = paired_ap_difference(
                first["per_image"], reports[TTA]["per_image"], modality=mod
            )
            print(f"  {mod:<13} {diff:+.3f} [{low:+.3f}, {high:+.3f}]")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
