"""Peak memory and time of segmenting large images with the bundled model (tiled, one step, CPU).

Each size runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. The image is a
real DSB nuclei image tiled to the requested size (so flow following has real objects to find).

Usage: ``python benchmarks/bench_large_images.py [--sizes 2048 4096 8192] [--checkpoint default]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from napari_ctxseg._sample_data import read_sample
from napari_ctxseg.services.segment import segment
size, ckpt, tile = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
base = read_sample("nuclei")
reps = (-(-size // base.shape[0]), -(-size // base.shape[1]))
image = np.tile(base, reps)[:size, :size]
t0 = time.perf_counter()
r = segment(image, checkpoint=ckpt, device="cpu", tile_size=tile)
dt = time.perf_counter() - t0
print(json.dumps({"size": size, "seconds": dt, "objects": int(r.labels.max()), "tiles": r.metadata["tiles"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--tile-size", type=int, default=1024)
    args = ap.parse_args()
    print(f"{'size':>6} {'tiles':>6} {'objects':>8} {'seconds':>8} {'peak RSS MB':>12}")
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(size), args.checkpoint, str(args.tile_size)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{size:>6} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['size']:>6} {r['tiles']:>6} {r['objects']:>8} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
