"""Speed of the flow ops: ours vs a faithful numpy re-implementation of the original, and vs cellpose.

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_flows.py [--threads N] [--rounds R] [--big] [--quick]
        [--real N] [--ideal N] [--cellpose-only] [--niter-only]

Inputs: a real 512x512 crop of a DSB 2018 label image (``../shared/data``) with ~120 nuclei (a synthetic
image of ellipses if the data are absent), its flow, and tilings of it for the scaling table; and the
bundled model's predicted flows on the first ``--real`` images of the DSB ``val`` split; and the flows of
the first ``--ideal`` masks of that split, ideal (``within_labels=True``) and the original's (recovery:
every connected object of >= 30 pixels, ``min_seed_cnts``, should come back; ours in both modes, ours at
the original's 200 iterations, and cellpose).
Timings alternate A and B (A/B/A/B...) and report the median and the minimum of the rounds; the ratio is
of the medians. The machine load is printed because a busy machine slows torch's thread pool a lot.

cellpose (optional, not a dependency): ``pip install --no-deps cellpose opencv-python-headless fastremap
fill_voids``. cellpose's ``transforms`` module imports torchvision at import time, for its training
augmentations only; ``dynamics.compute_masks`` never calls it, and torchvision wheels built for another
torch fail to import ("operator torchvision::nms does not exist"). So this script puts empty ``torchvision``
modules into ``sys.modules`` before importing ``cellpose.dynamics`` (only if torchvision itself does not
import), and prints the cellpose and torch versions it compared. The comparison runs at 1 and 2 torch
threads and all cores (``THREADS``; both sides at each, A/B alternating), on the ideal flow (cellprob +5
inside the mask, -5 outside, ``dP = 5 * flow``) and on the predicted flows (the pipeline's foreground,
``FlowParams.flow_threshold`` with holes filled, as cellprob +-5; both sides get the same masked flow and
their labels the same resizing and ``min_size``), with AP@0.5 of both against the ground truth.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

from napari_ctxseg.core.flows.following import flow_to_mask
from napari_ctxseg.core.flows.from_masks import mask_to_flow
from napari_ctxseg.core.flows.postprocess import relabel_sequential, remove_small_instances
from napari_ctxseg.core.metrics.scores import matching_scores

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_train"
BENCH_IMAGE = "a891bbc89143bca7"  # 520x696 fluorescence, 121 nuclei in the top-left 512x512
THREADS = tuple(sorted({1, 2, os.cpu_count() or 1}))  # torch threads compared: 1, 2 and all cores


# --------------------------------------------------------------------------------------------------
# the original algorithm, re-implemented in numpy float32 (reference for timing and agreement only)
# --------------------------------------------------------------------------------------------------


def original_mask_to_flow_2d(masks: np.ndarray) -> np.ndarray:
    """ctxseg ``_mask_to_flow`` line by line (jax -> numpy, float32), channel first ``(2, H, W)``."""
    if masks.max() == 0 or (masks != 0).sum() == 1:
        return np.zeros((2, *masks.shape), "float32")
    ly0, lx0 = masks.shape
    padded = np.zeros((ly0 + 2, lx0 + 2), dtype=np.int64)
    padded[1:-1, 1:-1] = masks
    y, x = np.nonzero(padded)
    ny = np.stack((y, y - 1, y + 1, y, y, y - 1, y - 1, y + 1, y + 1), axis=0)
    nx = np.stack((x, x, x, x - 1, x + 1, x - 1, x + 1, x - 1, x + 1), axis=0)
    slices = ndi.find_objects(masks)
    centers = np.zeros((masks.max(), 2), dtype=int)
    for i, si in enumerate(slices):
        if si is not None:
            sr, sc = si
            yi, xi = np.nonzero(masks[sr, sc] == (i + 1))
            yi, xi = yi.astype(np.int32) + 1, xi.astype(np.int32) + 1
            ymed, xmed = np.median(yi), np.median(xi)
            imin = np.argmin((xi - xmed) ** 2 + (yi - ymed) ** 2)
            centers[i] = yi[imin] + sr.start, xi[imin] + sc.start
    neighbour_labels = padded[ny, nx]
    is_neighbour = (neighbour_labels == neighbour_labels[0]).astype(np.float32)
    ext = np.array([[s[0].stop - s[0].start + 1, s[1].stop - s[1].start + 1] for s in slices if s])
    n_iter = 2 * ext.sum(axis=1).max()
    heat = np.zeros(padded.shape, np.float32)
    for _ in range(n_iter):
        heat[centers[:, 0], centers[:, 1]] = 1e24
        heat[y, x] = (heat[ny, nx] * is_neighbour).mean(axis=0, dtype=np.float32)
    heat = np.log(np.float32(1.0) + heat)
    mu = np.stack((heat[y + 1, x] - heat[y - 1, x], heat[y, x + 1] - heat[y, x - 1]))
    mu /= 1e-20 + (mu**2).sum(axis=0) ** 0.5
    out = np.zeros((2, ly0, lx0), np.float32)
    out[:, y - 1, x - 1] = mu
    return out


def _original_bilinear(img: np.ndarray, locs: np.ndarray) -> np.ndarray:
    """``sub_pixel_samples`` (2D, zeros outside) for locations ``(N, 2)`` in pixel-centre coordinates."""
    il = np.floor(locs).astype(np.int64)
    res = (locs - il).astype(np.float32)
    out = np.zeros((locs.shape[0], img.shape[-1]), np.float32)
    shape = np.array(img.shape[:2])
    for i in range(4):
        off = np.array([i & 1, (i >> 1) & 1])
        ii = il + off
        w = np.where(off[0], res[:, 0], 1 - res[:, 0]) * np.where(off[1], res[:, 1], 1 - res[:, 1])
        inside = ((ii >= 0) & (ii < shape)).all(axis=1)
        v = img[tuple(np.clip(ii, 0, shape - 1).T)]
        out = out + np.where(inside[:, None], v, 0) * w[:, None].astype(np.float32)
    return out


def original_flow_to_mask(flow: np.ndarray, niter: int = 200) -> np.ndarray:
    """ctxseg ``_flow_to_mask`` (2D, default parameters) in numpy float32; ``flow`` is ``(2, H, W)``."""
    h, w = flow.shape[1:]
    step = np.moveaxis(flow, 0, -1).astype(np.float32) * np.float32(0.5)
    p = np.stack(np.mgrid[:h, :w], -1).reshape(-1, 2).astype(np.float32) + np.float32(0.5)
    top = np.array([h, w], np.float32) - np.float32(0.001)
    for _ in range(niter):
        p = np.clip(p + np.clip(_original_bilinear(step, p - np.float32(0.5)), -1, 1), 0, top)
    cells = p.astype(np.int64)
    counts = np.zeros((h, w), np.int64)
    np.add.at(counts, (cells[:, 0], cells[:, 1]), 1)
    th = np.maximum(ndi.maximum_filter(counts, 5, mode="constant", cval=30), 30)
    seed = np.where(counts >= th, np.arange(h * w).reshape(h, w) + 1, 0)
    seed = np.where(counts >= 30, ndi.maximum_filter(seed, 5, mode="constant", cval=0), 0)
    for _ in range(5):
        seed = np.where((counts >= 2) & (seed == 0), ndi.maximum_filter(seed, 3, mode="constant"), seed)
    return seed[cells[:, 0], cells[:, 1]].reshape(h, w).astype(np.uint32)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def load_mask() -> tuple[np.ndarray, str]:
    path = DATA / "labels" / f"{BENCH_IMAGE}.tif"
    try:
        import tifffile

        return tifffile.imread(path).astype(np.int32)[:512, :512], f"DSB {BENCH_IMAGE}[:512, :512]"
    except (ImportError, FileNotFoundError):
        rng = np.random.default_rng(0)
        mask = np.zeros((512, 512), np.int32)
        yy, xx = np.mgrid[:512, :512]
        for label in range(1, 126):
            cy, cx = rng.uniform(10, 502, 2)
            ry, rx = rng.uniform(5, 14, 2)
            mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = label
        return mask, "synthetic: 125 random ellipses"


def timeit(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Run each function once to warm up, then ``rounds`` times, alternating between them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def fmt(ts: list[float]) -> str:
    return f"median {np.median(ts) * 1e3:8.1f} ms   min {min(ts) * 1e3:8.1f} ms"


def ap50(pred: np.ndarray, gt: np.ndarray) -> float:
    return matching_scores(pred, gt, thresholds=(0.5,))[0.5].ap


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


def bench_mask_to_flow(mask: np.ndarray, rounds: int) -> np.ndarray:
    print("\n## mask_to_flow, 512x512")
    t = timeit(
        {"original (numpy)": lambda: original_mask_to_flow_2d(mask), "ours": lambda: mask_to_flow(mask)},
        max(3, rounds // 2),
    )
    for name, ts in t.items():
        print(f"{name:18s} {fmt(ts)}")
    print(f"speed-up (medians): {np.median(t['original (numpy)']) / np.median(t['ours']):.1f}x")
    ours, ref = mask_to_flow(mask), original_mask_to_flow_2d(mask)
    print(f"max |ours - original| = {np.abs(ours - ref).max():.2e}")
    return ours


def bench_flow_to_mask(flow: np.ndarray, mask: np.ndarray, rounds: int, reference: bool) -> None:
    print("\n## flow_to_mask, 512x512 flow (the original's mask_to_flow)")
    t = timeit(
        {"exact": lambda: flow_to_mask(flow, mode="exact"), "fast": lambda: flow_to_mask(flow)}, rounds
    )
    for name, ts in t.items():
        print(f"{name:18s} {fmt(ts)}")
    print(f"exact / fast (medians): {np.median(t['exact']) / np.median(t['fast']):.2f}")
    exact, fast = flow_to_mask(flow, mode="exact"), flow_to_mask(flow)
    big = remove_small_instances(mask, 30)  # min_seed_cnts: smaller objects cannot make a seed
    print(f"pixels differing fast vs exact: {(exact != fast).sum()}")
    print(
        f"AP@0.5 vs source mask: exact {ap50(exact, mask):.4f}, fast {ap50(fast, mask):.4f} "
        f"({len(np.unique(mask)) - 1} objects); objects >= 30 px: exact {ap50(exact, big):.4f}, "
        f"fast {ap50(fast, big):.4f} ({len(np.unique(big)) - 1} objects)"
    )
    if reference:
        start = time.perf_counter()
        ref = original_flow_to_mask(flow)  # its default, 200 iterations
        elapsed = time.perf_counter() - start
        exact, fast = flow_to_mask(flow, mode="exact", niter=200), flow_to_mask(flow, niter=200)
        print(
            f"original (numpy re-implementation, 1 run, niter 200): {elapsed:.2f} s; pixels differing "
            f"from ours at niter 200: exact {(ref != exact).sum()}, fast {(ref != fast).sum()}"
        )


def import_cellpose_dynamics():
    """``(cellpose.dynamics, version)``, or ``(None, reason)``; see the module docstring for the stub."""
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a torchvision built for another torch
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        names = ("torchvision", "torchvision.transforms")
        stubs = {n: types.ModuleType(n) for n in (*names, "torchvision.transforms.functional")}
        stubs["torchvision.transforms._functional_tensor"] = types.ModuleType("_functional_tensor")
        stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]  # type: ignore[attr-defined]
        stubs["torchvision.transforms"]._functional_tensor = stubs[
            "torchvision.transforms._functional_tensor"
        ]  # type: ignore[attr-defined]
        sys.modules.update(stubs)
    try:
        from importlib.metadata import version

        from cellpose import dynamics
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"
    return dynamics, version("cellpose")


def cellpose_masks(dynamics, flow: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """cellpose ``compute_masks`` (its defaults) on our flow: ``dP = 5 * flow``, cellprob +-5."""
    cellprob = np.where(inside, 5.0, -5.0).astype(np.float32)
    out = dynamics.compute_masks(flow * 5.0, cellprob, device=torch.device("cpu"))
    return np.asarray(out[0] if isinstance(out, tuple) else out).astype(np.int64)


def ab_threads(fns: dict[str, Callable[[], object]], rounds: int, threads: tuple[int, ...]) -> dict:
    """Medians per thread count of A/B-alternating rounds (``timeit``) of each function."""
    out = {}
    for n in threads:
        torch.set_num_threads(n)
        out[n] = {name: float(np.median(ts)) for name, ts in timeit(fns, rounds).items()}
        print(
            f"  ({n} thread(s): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out[n].items()) + ")",
            flush=True,
        )
    return out


def print_ab(title: str, res: dict, ours: str, theirs: str, ap: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'threads':>7s} {theirs:>24s} {ours:>24s} {'ratio':>7s}")
    for n, t in res.items():
        print(f"{n:>7d} {t[theirs] * 1e3:>21.1f} ms {t[ours] * 1e3:>21.1f} ms {t[theirs] / t[ours]:>6.1f}x")
    print("AP@0.5 vs ground truth: " + ", ".join(f"{k} {v:.4f}" for k, v in ap.items()))


def bench_cellpose(
    mask: np.ndarray,
    flow: np.ndarray,
    rounds: int,
    n_real: int,
    flows_only: bool = False,
    n_ideal: int = 0,
) -> None:
    print(f"\n## cellpose 4 vs ours, {THREADS} torch threads (optional)")
    dynamics, version = import_cellpose_dynamics()
    if dynamics is None:
        print(f"cellpose not importable ({version})")
        return
    threads0 = torch.get_num_threads()
    print(f"cellpose {version}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print("cellpose compute_masks with its defaults (niter 200, flow_threshold 0.4); ours: flow_to_mask with")
    print("its defaults (mode 'fast')", flush=True)
    mask = relabel_sequential(mask)  # cellpose wants labels 1..n
    if not flows_only:
        to_flows = getattr(dynamics, "masks_to_flows_gpu", None) or dynamics.masks_to_flows
        dev = torch.device("cpu")
        fns = {
            "cellpose masks_to_flows": lambda: to_flows(mask, device=dev),
            "ours mask_to_flow": lambda: mask_to_flow(mask),
        }
        res = ab_threads(fns, max(3, rounds // 2), THREADS)
        print_ab("mask_to_flow, 512x512", res, "ours mask_to_flow", "cellpose masks_to_flows", {})
    inside = mask > 0
    res = ab_threads(
        {
            "cellpose compute_masks": lambda: cellpose_masks(dynamics, flow, inside),
            "ours flow_to_mask": lambda: flow_to_mask(flow),
        },
        rounds,
        THREADS,
    )
    ap = {
        "cellpose": ap50(cellpose_masks(dynamics, flow, inside), mask),
        "ours": ap50(flow_to_mask(flow), mask),
    }
    print_ab(
        f"flow_to_mask, ideal flow of the 512x512 mask ({mask.max()} objects)",
        res,
        "ours flow_to_mask",
        "cellpose compute_masks",
        ap,
    )
    big = remove_small_instances(mask, 30)
    print(
        f"objects >= 30 px (min_seed_cnts; {len(np.unique(big)) - 1}): cellpose "
        f"{ap50(cellpose_masks(dynamics, flow, inside), big):.4f}, ours {ap50(flow_to_mask(flow), big):.4f}"
    )
    if n_ideal:
        bench_ideal_val(dynamics, n_ideal)
    real = predicted_flows(n_real)
    if real:
        fns = {  # one round = every image, A then B: a burst of load hits both sides alike
            "cellpose compute_masks": lambda: [cellpose_masks(dynamics, f, m) for f, m, *_ in real],
            "ours flow_to_mask": lambda: [flow_to_mask(f) for f, *_ in real],
        }
        times = ab_threads(fns, rounds, THREADS)
        scores = {"cellpose": [], "ours": []}
        for flow_i, inside_i, gt, out_shape in real:
            scores["cellpose"].append(
                finish(cellpose_masks(dynamics, flow_i, inside_i), inside_i, out_shape, gt)
            )
            scores["ours"].append(finish(flow_to_mask(flow_i).astype(np.int64), inside_i, out_shape, gt))
        pooled = {k: pooled_ap(v) for k, v in scores.items()}
        sizes = ", ".join(f"{f.shape[1]}x{f.shape[2]}" for f, *_ in real)
        title = f"flow_to_mask, bundled model's flows on {len(real)} DSB val images ({sizes}), all per round"
        print_ab(title, times, "ours flow_to_mask", "cellpose compute_masks", pooled)
    torch.set_num_threads(threads0)


def bench_ideal_val(dynamics, n: int) -> None:
    """Recovery from the flows of the first ``n`` DSB ``val`` masks (objects of >= 30 px): their ideal
    flows (``within_labels=True``) and the original's flows, which cross the borders of touching objects."""
    import json

    from napari_ctxseg.core.metrics.scores import matching_scores as scores

    try:
        import tifffile

        names = json.loads((DATA / "split.json").read_text())["val"][:n]
    except (ImportError, FileNotFoundError):
        print("DSB data not found: ideal val flows skipped")
        return
    runs: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "cellpose": lambda flow, gt: cellpose_masks(dynamics, flow, gt > 0),
        "ours (fast)": lambda flow, gt: flow_to_mask(flow).astype(np.int64),
        "ours (exact)": lambda flow, gt: flow_to_mask(flow, mode="exact").astype(np.int64),
        "ours (fast, niter 200)": lambda flow, gt: flow_to_mask(flow, niter=200).astype(np.int64),
    }
    kinds = {"ideal (within_labels=True)": True, "original (within_labels=False)": False}
    rows = {(kind, key): [] for kind in kinds for key in runs}
    perfect = dict.fromkeys(rows, 0)
    for name in names:
        gt = tifffile.imread(DATA / "labels" / f"{name}.tif").astype(np.int64)
        kept = connected_objects(gt, 30)
        for kind, within in kinds.items():
            flow = mask_to_flow(gt, within_labels=within)
            for key, run in runs.items():
                m = scores(run(flow, gt), kept, thresholds=(0.5,))[0.5]
                rows[kind, key].append((m.tp, m.fp, m.fn))
                perfect[kind, key] += (m.fp, m.fn) == (0, 0)
    print(f"\nflows of {len(names)} DSB val masks, connected objects >= 30 px (pooled AP@0.5, TP/FP/FN)")
    for (kind, key), r in rows.items():
        tp, fp, fn = (sum(x[i] for x in r) for i in range(3))
        ap, n_ok = pooled_ap(r), perfect[kind, key]
        counts = f"TP/FP/FN {tp}/{fp}/{fn}"
        print(f"  {kind:31s} {key:23s} AP {ap:.4f}  {counts}  masks with AP 1.0: {n_ok}/{len(names)}")


def connected_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """The connected pieces of every label of ``mask`` with at least ``min_size`` pixels, labelled 1..n."""
    out = np.zeros(mask.shape, np.int64)
    n = 0
    for label, box in enumerate(ndi.find_objects(mask), start=1):
        if box is None:
            continue
        pieces, _ = ndi.label(mask[box] == label)
        for k in np.flatnonzero(np.bincount(pieces.ravel())[1:] >= min_size) + 1:
            n += 1
            out[box][pieces == k] = n
    return out


def predicted_flows(n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]]:
    """(masked flow, foreground, ground truth, image shape) of the first ``n`` DSB val images."""
    import json

    try:
        import tifffile

        names = json.loads((DATA / "split.json").read_text())["val"][:n]
        from napari_ctxseg.services.segment import FlowParams, segment, strong_flow_mask
    except (ImportError, FileNotFoundError):
        print("DSB data not found: predicted flows skipped")
        return []
    out = []
    for name in names:
        image = tifffile.imread(DATA / "images" / f"{name}.tif")
        gt = tifffile.imread(DATA / "labels" / f"{name}.tif").astype(np.int64)
        flows = segment(image, device="cpu", checkpoint="default").flows_model_scale[:1]
        inside = strong_flow_mask(flows, FlowParams.flow_threshold)
        out.append(((flows * inside[:, None])[0].astype(np.float32), inside[0], gt, image.shape[:2]))
    return out


def finish(labels: np.ndarray, inside: np.ndarray, out_shape: tuple[int, int], gt: np.ndarray) -> tuple:
    """The pipeline's clean-up (``labels_from_flows``): resize, ``min_size``; then (TP, FP, FN) at 0.5."""
    import torch.nn.functional as F

    from napari_ctxseg.services.segment import FlowParams

    lab = torch.from_numpy(labels * inside)[None, None].double()
    lab = F.interpolate(lab, size=out_shape, mode="nearest-exact")[0, 0].long().numpy()
    lab = remove_small_instances(lab, FlowParams.min_size)
    m = matching_scores(lab, gt, thresholds=(0.5,))[0.5]
    return m.tp, m.fp, m.fn


def pooled_ap(rows: list[tuple]) -> float:
    tp, fp, fn = (sum(r[i] for r in rows) for i in range(3))
    return tp / max(tp + fp + fn, 1)


def bench_agreement(rounds: int) -> None:
    """fast vs exact on model-like flows of real masks (val split)."""
    print("\n## fast vs exact on real-shaped flows (DSB val crops 256x256, objects >= 100 px)")
    import json

    try:
        import tifffile

        names = json.loads((DATA / "split.json").read_text())["val"]
    except (ImportError, FileNotFoundError):
        print("DSB data not found: skipped")
        return
    rng = np.random.default_rng(0)
    kinds = ["ideal", "blur1 + noise 0.02", "blur1 + smooth noise 0.05", "ideal + noise 0.1"]
    stats = {k: {"diff": 0, "pix": 0, "ap": [], "ap_gt": [], "t_exact": 0.0, "t_fast": 0.0} for k in kinds}
    for name in names[: 4 * rounds]:
        gt = remove_small_instances(tifffile.imread(DATA / "labels" / f"{name}.tif").astype(np.int32), 100)
        gt = gt[:256, :256]
        if gt.max() == 0:
            continue
        ideal = mask_to_flow(gt)
        blur = ndi.gaussian_filter(ideal, (0, 1, 1))
        flows = {
            kinds[0]: ideal,
            kinds[1]: blur + 0.02 * rng.standard_normal(ideal.shape),
            kinds[2]: blur + 0.05 * ndi.gaussian_filter(rng.standard_normal(ideal.shape), (0, 1, 1)),
            kinds[3]: ideal + 0.1 * rng.standard_normal(ideal.shape),
        }
        for kind, flow in flows.items():
            flow = flow.astype(np.float32)
            s = stats[kind]
            start = time.perf_counter()
            exact = flow_to_mask(flow, mode="exact")
            s["t_exact"] += time.perf_counter() - start
            start = time.perf_counter()
            fast = flow_to_mask(flow)
            s["t_fast"] += time.perf_counter() - start
            s["diff"] += int((exact != fast).sum())
            s["pix"] += exact.size
            s["ap"].append(ap50(fast, exact))
            s["ap_gt"].append((ap50(exact, gt), ap50(fast, gt)))
    n = len(stats[kinds[0]]["ap"])
    print(f"{n} crops")
    print(
        f"{'flow':28s} {'pixels fast!=exact':>20s} {'AP50(fast,exact) min':>22s} "
        f"{'mean AP50 vs gt exact/fast':>28s} {'time exact/fast':>18s}"
    )
    for kind, s in stats.items():
        ap_gt = np.array(s["ap_gt"])
        print(
            f"{kind:28s} {s['diff']:>9d} ({s['diff'] / s['pix']:.4%}) {min(s['ap']):>22.4f} "
            f"{ap_gt[:, 0].mean():>13.4f} / {ap_gt[:, 1].mean():.4f} "
            f"{s['t_exact']:>8.2f} / {s['t_fast']:.2f} s"
        )


def bench_niter(ideal: np.ndarray, n_real: int, rounds: int) -> None:
    """The cost of the default 1024 iterations against the original's 200, A/B in one process."""
    print("\n## flow_to_mask, niter 200 against the default 1024 (medians, A/B alternating)")
    inputs = {"ideal 512 x 512 flow": [ideal]}
    real = [f for f, *_ in predicted_flows(n_real)]
    if real:
        inputs[f"bundled model's flows of {len(real)} DSB val images"] = real
    threads0 = torch.get_num_threads()
    for name, flows in inputs.items():
        for n in THREADS:
            torch.set_num_threads(n)
            fns = {k: lambda k=k, fl=flows: [flow_to_mask(f, niter=k) for f in fl] for k in (200, 1024)}
            t = timeit(fns, rounds)
            a, b = np.median(t[200]) * 1e3, np.median(t[1024]) * 1e3
            print(f"  {name}, {n} thread(s): 200 {a:.1f} ms, 1024 {b:.1f} ms, ratio {b / a:.2f}")
    torch.set_num_threads(threads0)


def bench_scaling(mask: np.ndarray, big: bool) -> None:
    print("\n## scaling (tiled copies of the 512x512 mask; ideal flows; 3 runs, median)")
    print(
        f"{'size':>10s} {'objects':>8s} {'mask_to_flow':>14s} {'flow_to_mask fast':>18s} {'per Mpixel':>12s}"
    )
    for reps in (1, 2, 4, 8) if big else (1, 2, 4):
        tiled = np.zeros((512 * reps, 512 * reps), np.int64)
        n_obj = int(mask.max())
        for i in range(reps):
            for j in range(reps):
                tile = np.where(mask > 0, mask + (i * reps + j) * n_obj, 0)
                tiled[i * 512 : (i + 1) * 512, j * 512 : (j + 1) * 512] = tile
        t_flow = timeit({"m2f": lambda m=tiled: mask_to_flow(m)}, 3)["m2f"]
        flow = mask_to_flow(tiled)
        t_mask = timeit({"f2m": lambda f=flow: flow_to_mask(f)}, 3)["f2m"]
        mpix = tiled.size / 1e6
        print(
            f"{tiled.shape[0]:>5d}^2 {len(np.unique(tiled)) - 1:>10d} {np.median(t_flow):>12.3f} s "
            f"{np.median(t_mask):>16.3f} s {np.median(t_mask) / mpix:>10.3f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--big", action="store_true", help="add 4096^2 to the scaling table")
    parser.add_argument("--quick", action="store_true", help="skip the slow numpy reference flow_to_mask")
    parser.add_argument("--real", type=int, default=4, help="DSB val images for the predicted flows")
    parser.add_argument("--ideal", type=int, default=66, help="DSB val masks for the ideal-flow recovery")
    parser.add_argument("--cellpose-only", action="store_true", help="only flow_to_mask vs cellpose")
    parser.add_argument("--niter-only", action="store_true", help="only niter 200 vs 1024")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mask, source = load_mask()
    print(
        f"# bench_flows  ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(f"input: {source}, {len(np.unique(mask)) - 1} objects, {(mask > 0).mean():.0%} foreground")
    ideal = mask_to_flow(mask, within_labels=True)
    if args.niter_only:
        bench_niter(ideal, args.real, args.rounds)
    elif args.cellpose_only:
        bench_cellpose(mask, ideal, args.rounds, args.real, True, args.ideal)
    else:
        flow = bench_mask_to_flow(mask, args.rounds)  # the original's flow, compared with its code
        bench_flow_to_mask(flow, mask, args.rounds, reference=not args.quick)
        bench_cellpose(mask, ideal, args.rounds, args.real, False, args.ideal)
        bench_agreement(args.rounds)
        bench_scaling(mask, args.big)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
