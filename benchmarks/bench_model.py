"""Forward time and memory of the full-size CtxSegP (179.3M parameters, random weights) on the CPU.

Prints the time to encode a 1x3x512x512 image (``prepare``: the ConvNeXt image encoder) and the time of
one denoiser call (``predict`` on 1x2x512x512), median of repeats, plus the peak RSS of the process, for
float32 contiguous (NCHW) and channels-last memory formats. The original JAX/Flax code measured here on
2 cores: 5.4-6.3 s to encode the image and 3.4-3.8 s per denoiser step; pass ``--jax`` to run it side by
side when ``jax``/``flax`` and a clone of the original (``--orig PATH``, with ``ctxseg`` importable from
it) are available.

Usage: ``python benchmarks/bench_model.py [--repeats 3] [--size 512] [--preset original|small]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from napari_ctxseg.core.nn.models import build_model
from napari_ctxseg.services.models import PRESETS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(model: torch.nn.Module, size: int, repeats: int, channels_last: bool) -> tuple[float, float]:
    image = torch.rand(1, 3, size, size)
    x = torch.randn(1, 2, size, size) * 80
    c = torch.full((1,), torch.log(torch.tensor(80.0)).item() / 4)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    enc, den = [], []
    with torch.inference_mode():
        feats = model.prepare(image)  # warm-up
        model.predict(x, c, feats)
        for _ in range(repeats):
            t0 = time.perf_counter()
            feats = model.prepare(image)
            t1 = time.perf_counter()
            model.predict(x, c, feats)
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            den.append(t2 - t1)
    return statistics.median(enc), statistics.median(den)


ORIGINAL = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp
from flax import nnx
from ctxseg.modeling.ctxseg import CtxSegP
from ctxseg.modeling.diffusion import edm_precond
size, repeats = int(sys.argv[2]), int(sys.argv[3])
model = CtxSegP(rngs=nnx.Rngs(0))
model.eval()
image = jax.random.uniform(jax.random.key(1), (1, size, size, 3))
x = jax.random.normal(jax.random.key(2), (1, size, size, 2)) * 80
fn = nnx.jit(lambda m, x, s: edm_precond(m.predict, sigma_data=1.0)(x, s))
model.set_image(image); jax.block_until_ready(fn(model, x, 80.0))  # compile
enc, den = [], []
for _ in range(repeats):
    t0 = time.perf_counter()
    model.set_image(image)
    jax.block_until_ready(model.x_skips)
    t1 = time.perf_counter()
    jax.block_until_ready(fn(model, x, 80.0))
    t2 = time.perf_counter()
    enc.append(t1 - t0); den.append(t2 - t1)
n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(json.dumps({"params": int(n), "encode": statistics.median(enc), "denoise": statistics.median(den),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_original(python: str, orig: str, size: int, repeats: int) -> dict | None:
    """Time the original JAX/Flax CtxSegP in another interpreter (which has jax and flax)."""
    import json
    import subprocess

    out = subprocess.run(
        [python, "-c", ORIGINAL, orig, str(size), str(repeats)], capture_output=True, text=True
    )
    if out.returncode != 0:
        print("original failed:", out.stderr.strip().splitlines()[-1:])
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--preset", default="original", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--jax-python", help="a python with jax + flax 0.11 to time the original side by side")
    ap.add_argument(
        "--orig", help="folder containing the original ctxseg package (a clone of jiyuuchc/ctxseg)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(PRESETS[args.preset]).eval()
    n = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.preset}: {n:,} parameters; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"image 1x3x{args.size}x{args.size}; median of {args.repeats}")
    print(f"{'implementation':<28} {'encode s':>9} {'denoise s':>10} {'peak RSS MB':>12}")
    ours = {}
    for cl in (False, True):
        e, d = bench(model, args.size, args.repeats, cl)
        ours[cl] = (e, d)
        name = "port, channels-last" if cl else "port, contiguous NCHW"
        print(f"{name:<28} {e:>9.2f} {d:>10.2f} {peak_rss_mb():>12.0f}")
    if args.jax_python and args.orig and args.preset == "original":
        ref = run_original(args.jax_python, args.orig, args.size, args.repeats)
        if ref:
            print(
                f"{'original JAX/Flax (jit)':<28} {ref['encode']:>9.2f} {ref['denoise']:>10.2f} "
                f"{ref['rss']:>12.0f}"
            )
            e, d = min(ours.values(), key=lambda v: v[0] + v[1])
            print(
                f"ratio original/port (best port layout): encode {ref['encode'] / e:.2f}x, "
                f"denoise {ref['denoise'] / d:.2f}x; original params {ref['params']:,}"
            )
    elif args.preset == "original":
        print("original (JAX/Flax, quoted in the issue, 2 cores): encode 5.4-6.3 s, denoise 3.4-3.8 s")


if __name__ == "__main__":
    main()
