"""Does a context help? Pooled AP@0.5 per data set without context, with 1 and with 3 context images.

For every folder of the out-of-domain test bed (``../shared/data/README.md``: data the bundled model never
trained on) and for the ``val`` splits of the whole-cell folders it did train on, each complete image is
segmented

- without a context,
- with 1 other image of the same folder and its labels as the context,
- with 3 other images of the same folder as the context (features averaged over the references),

and the matches are pooled over the folder's images (AP@0.5 = TP / (TP + FP + FN), IoU >= 0.5). The
context images of image ``i`` are the next images of the folder's list, cyclically (for the ``val`` rows:
images of the folder's ``train`` split), so every image is a target exactly once. 1 sampler step, 1 sample,
``diameter="auto"`` (measured from the context's labels where there is one).

Usage::

    python benchmarks/eval_context.py [--checkpoint default] [--limit N] [--folders a,b] [--json out.json]

``--limit N`` scores the first N images of each folder (a quick look; the model card's table uses all).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_ctxseg.services.evaluate import match_counts
from napari_ctxseg.services.segment import segment

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
#: the out-of-domain test bed: never trained on by the bundled model
OUT_OF_DOMAIN = (
    "msc_seq01",
    "sim_n2dh_nuclei",
    "isbi2014_cervical",
    "he_nuclei_gbm40",
    "he_nuclei_tcga",
    "he_nuclei_cpm15",
)
#: whole-cell folders that train the bundled model: their held-out ``val`` split
IN_DOMAIN_VAL = ("usiigaci_3t3_phase", "bbbc030_cho_dic")
MODES = {"no context": 0, "1 context image": 1, "3 context images": 3}


def complete_names(folder: Path) -> list[str]:
    """Names of the completely annotated images of a folder (``frames.json`` flags them where present)."""
    frames = folder / "frames.json"
    if frames.is_file():
        return [f["name"] for f in json.loads(frames.read_text()) if f["complete"]]
    return sorted(p.stem for p in (folder / "labels").glob("*.tif"))


def split_names(folder: Path, subset: str) -> list[str]:
    """Names of one subset of the fixed split in a folder's ``meta.json``."""
    return [str(n) for n in json.loads((folder / "meta.json").read_text())["split"][subset]]


def read(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An image and its labels."""
    return tifffile.imread(folder / "images" / f"{name}.tif"), tifffile.imread(
        folder / "labels" / f"{name}.tif"
    )


def evaluate_folder(
    folder: Path, targets: list[str], pool: list[str], checkpoint: str, modes: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Pooled counts per mode; contexts for ``targets[i]`` are the next names of ``pool`` after it."""
    cache = {n: read(folder, n) for n in {*targets, *pool}}
    out = {}
    for mode, k in modes.items():
        tp = fp = fn = 0
        t0 = time.perf_counter()
        for name in targets:
            image, gt = cache[name]
            kw: dict = {}
            if k:
                start = pool.index(name) + 1 if name in pool else 0
                refs = [pool[(start + j) % len(pool)] for j in range(len(pool))]
                refs = [r for r in refs if r != name][:k]
                kw = dict(
                    context_image=[cache[r][0] for r in refs], context_labels=[cache[r][1] for r in refs]
                )
            pred = segment(image, checkpoint=checkpoint, device="cpu", **kw).labels
            a, b, c = match_counts(pred, gt)
            tp, fp, fn = tp + a, fp + b, fn + c
        out[mode] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "ap50": tp / max(1, tp + fp + fn),
            "s_per_image": (time.perf_counter() - t0) / max(1, len(targets)),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--limit", type=int, default=0, help="score the first N images per folder (0: all)")
    ap.add_argument("--folders", default="", help="comma-separated folder names (default: all)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)
    wanted = set(filter(None, args.folders.split(",")))
    rows: dict[str, dict] = {}
    jobs = [(f, "all complete images") for f in OUT_OF_DOMAIN] + [(f, "val split") for f in IN_DOMAIN_VAL]
    for name, what in jobs:
        if wanted and name not in wanted:
            continue
        folder = args.data / name
        if not folder.is_dir():
            print(f"{name}: not found under {args.data}, skipped")
            continue
        if what == "val split":
            targets, pool = split_names(folder, "val"), split_names(folder, "train")
        else:
            targets = pool = complete_names(folder)
        if args.limit:
            targets = targets[: args.limit]
        key = f"{name} ({what})"
        rows[key] = {"images": len(targets), **evaluate_folder(folder, targets, pool, args.checkpoint, MODES)}
        r = rows[key]
        print(
            f"{key:<44} n={r['images']:>3}  "
            + "  ".join(f"{m}: {r[m]['ap50']:.3f}" for m in MODES)
            + f"  ({r['no context']['s_per_image']:.2f} s/image without context)",
            flush=True,
        )
    print(f"\ncheckpoint {args.checkpoint}; pooled AP@0.5, 1 step x 1 sample, diameter auto")
    print(f"| data set | images | {' | '.join(MODES)} | 1 context - none |")
    print("|---|---|" + "---|" * (len(MODES) + 1))
    for key, r in rows.items():
        cells = " | ".join(f"{r[m]['ap50']:.3f} ({r[m]['tp']}/{r[m]['fp']}/{r[m]['fn']})" for m in MODES)
        gain = r["1 context image"]["ap50"] - r["no context"]["ap50"]
        print(f"| {key} | {r['images']} | {cells} | {gain:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
