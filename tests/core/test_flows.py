"""Flows: parity of mask_to_flow / flow_to_mask with the original (``shared/parity/flow``), round trips.

The fixtures are channels last (``(H, W, 2)``, ``(D, H, W, 3)``); the port is channel first, so the tests move
the channel axis (``np.moveaxis``) exactly once, on the fixture side.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctxseg.core.errors import InputError
from napari_ctxseg.core.flows.following import _follow, _Grid, _label_cells, flow_to_mask
from napari_ctxseg.core.flows.from_masks import flip_flow, flip_spatial, flow_error, mask_to_flow
from napari_ctxseg.core.flows.labels import FlowParams, strong_flow_mask
from napari_ctxseg.core.flows.maps import BASE_ITER
from napari_ctxseg.core.flows.postprocess import remove_small_instances
from napari_ctxseg.core.metrics.scores import matching_scores

SHARED = Path(__file__).parents[2].parent / "shared"
FLOW_NPZ = SHARED / "parity" / "flow" / "flow.npz"
DSB = SHARED / "data" / "dsb2018_train"
MASKS = ["mixed", "dense", "empty", "single_pixel", "only_one_pixel"]
RUNS = {"default": {"niter": 200}, "eval_py": {"niter": 1000}}  # the original's default; its eval.py


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run single-threaded: results do not depend on it, and on a busy 2-core machine torch's thread pool
    can make small operations wait for a descheduled thread (milliseconds each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    if not FLOW_NPZ.exists():
        pytest.skip(f"parity fixtures not found at {FLOW_NPZ}")
    with np.load(FLOW_NPZ) as data:
        return {k: data[k] for k in data.files}


def channel_first(flow: np.ndarray) -> np.ndarray:
    """Fixture layout (..., C) -> ours (C, ...), as float32 (the original casts before flow_to_mask)."""
    return np.ascontiguousarray(np.moveaxis(flow, -1, 0), dtype=np.float32)


def dsb_labels(name: str, size: int = 256) -> np.ndarray:
    path = DSB / "labels" / f"{name}.tif"
    if not path.exists():
        pytest.skip(f"DSB labels not found at {path}")
    tifffile = pytest.importorskip("tifffile")
    return tifffile.imread(path).astype(np.int32)[:size, :size]


# --------------------------------------------------------------------------------------------------
# mask -> flow
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MASKS)
def test_mask_to_flow_2d_parity(fx: dict[str, np.ndarray], name: str) -> None:
    flow = mask_to_flow(fx[f"mask.{name}"])
    assert flow.dtype == np.float32 and flow.shape == (2, *fx[f"mask.{name}"].shape)
    np.testing.assert_allclose(np.moveaxis(flow, 0, -1), fx[f"flow.{name}"], rtol=0, atol=1e-4)


def test_mask_to_flow_3d_parity(fx: dict[str, np.ndarray]) -> None:
    mask = fx["mask3d"]
    flow = mask_to_flow(mask)
    assert flow.dtype == np.float32 and flow.shape == (3, *mask.shape)
    err = np.abs(np.moveaxis(flow, 0, -1) - fx["flow3d"]).max(-1)
    # README: a few exact-symmetry voxels have a zero gradient and rounding noise picks the direction
    # (6 of 13,274 differ by ~1 between any two float32 implementations); everything else is tight
    assert (err > 1e-4).sum() <= 10, np.argwhere(err > 1e-4)
    assert (err > 1e-3).sum() <= 6
    assert np.abs(flow).max() > 1.5  # the 3D sum is not renormalised


def test_mask_to_flow_label_values_do_not_matter(fx: dict[str, np.ndarray]) -> None:
    mask = fx["mask.dense"]
    ids = np.unique(mask)[1:]
    remapped = np.zeros_like(mask, dtype=np.int64)
    for new, old in zip(ids[::-1] * 1000 + 7, ids):  # large, gapped, reversed order
        remapped[mask == old] = new
    np.testing.assert_array_equal(mask_to_flow(remapped), mask_to_flow(mask))


def test_mask_to_flow_points_to_the_centre() -> None:
    mask = np.zeros((9, 9), np.int32)
    mask[1:8, 1:8] = 3
    flow = mask_to_flow(mask)
    np.testing.assert_allclose(flow[:, 1, 4], [1, 0], atol=1e-6)  # top edge: down
    np.testing.assert_allclose(flow[:, 4, 7], [0, -1], atol=1e-6)  # right edge: left
    assert np.all(flow[:, mask == 0] == 0)
    norms = np.linalg.norm(flow[:, mask != 0], axis=0)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


def _field_towards(point: tuple[float, float], shape: tuple[int, int]) -> torch.Tensor:
    """Unit flow (2, H, W), channels (dy, dx), pointing from every pixel towards ``point``."""
    yy, xx = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    d = torch.stack([point[0] - yy, point[1] - xx]).double()
    return d / d.norm(dim=0).clamp_min(1e-9)


@pytest.mark.parametrize("flip_y, flip_x", [(True, False), (False, True), (True, True), (False, False)])
def test_flip_flow_is_the_flow_of_the_flipped_image(flip_y: bool, flip_x: bool) -> None:
    h, w = 7, 10
    point = (1.5, 2.25)  # off the grid: no pixel has a zero flow
    flow = _field_towards(point, (h, w))[None]  # batched (1, 2, H, W)
    flipped = flip_flow(flow, flip_y, flip_x)
    # the flipped image's objects (and the point all flow converges to) sit at the mirrored position
    mirrored = (h - 1 - point[0] if flip_y else point[0], w - 1 - point[1] if flip_x else point[1])
    torch.testing.assert_close(flipped[0], _field_towards(mirrored, (h, w)))
    torch.testing.assert_close(flip_flow(flipped, flip_y, flip_x), flow)  # its own inverse
    image = torch.arange(h * w).reshape(1, h, w)
    torch.testing.assert_close(flip_spatial(flip_spatial(image, flip_y, flip_x), flip_y, flip_x), image)
    assert (
        flip_spatial(image, flip_y, flip_x)[0, 0, 0]
        == image[0, h - 1 if flip_y else 0, w - 1 if flip_x else 0]
    ).item()
    with pytest.raises(InputError, match="2D flow"):
        flip_flow(torch.zeros((3, 5, h, w)), flip_y, flip_x)  # a 3D flow (dz, dy, dx) of depth 5


@pytest.mark.parametrize(
    "bad", [np.zeros(5, int), np.zeros((2, 2, 2, 2), int), np.zeros((4, 4)), -np.ones((4, 4), int)]
)
def test_mask_to_flow_rejects_bad_masks(bad: np.ndarray) -> None:
    with pytest.raises(InputError):
        mask_to_flow(bad)


# --------------------------------------------------------------------------------------------------
# flow -> mask: parity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("name", MASKS)
def test_flow_to_mask_parity(fx: dict[str, np.ndarray], name: str, noisy: bool, run: str) -> None:
    prefix = "flow_noisy" if noisy else "flow"
    ref = fx[f"recovered{'_noisy' if noisy else ''}.{run}.{name}"]
    out = flow_to_mask(channel_first(fx[f"{prefix}.{name}"]), mode="exact", **RUNS[run])
    assert out.dtype == np.uint32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)  # same pixels and the same (non-consecutive) label values


def test_flow_to_mask_batched_parity(fx: dict[str, np.ndarray]) -> None:
    batch = np.stack([channel_first(fx["flow.mixed"]), channel_first(fx["flow_noisy.mixed"])])
    out = flow_to_mask(torch.from_numpy(batch), mode="exact", niter=200)
    np.testing.assert_array_equal(out, fx["recovered_batched.default.mixed_and_noisy"])


def test_flow_to_mask_3d_parity(fx: dict[str, np.ndarray]) -> None:
    out = flow_to_mask(channel_first(fx["flow3d"]), mode="exact", niter=200)
    np.testing.assert_array_equal(out, fx["recovered3d.default"])


@pytest.mark.parametrize("niter", [1, 5, BASE_ITER])
@pytest.mark.parametrize("key", ["flow_noisy.mixed", "flow.dense", "flow3d"])
def test_fast_is_the_original_up_to_base_iter(fx: dict[str, np.ndarray], key: str, niter: int) -> None:
    """With niter <= BASE_ITER the fast mode makes only the original's steps: the same final positions."""
    step = torch.from_numpy(channel_first(fx[key]))[None] * np.float32(0.5)
    assert torch.equal(_follow(step, niter, fast=True), _follow(step, niter, fast=False))


@pytest.mark.parametrize("name", ["mixed", "dense"])
def test_fast_finds_the_originals_objects_on_parity_flows(fx: dict[str, np.ndarray], name: str) -> None:
    """Clean flows: the original's objects. Noisy flows (noise of std 0.3 on the background too): every
    object of the mask, beside more false objects from the noise than the original makes."""
    ref = fx[f"recovered.default.{name}"].astype(np.int64)
    out = flow_to_mask(channel_first(fx[f"flow.{name}"])).astype(np.int64)
    assert matching_scores(out, ref, thresholds=(0.5,))[0.5].ap == 1.0
    noisy = flow_to_mask(channel_first(fx[f"flow_noisy.{name}"])).astype(np.int64)
    assert matching_scores(noisy, fx[f"mask.{name}"].astype(np.int64), thresholds=(0.5,))[0.5].fn == 0


def test_composed_maps_are_exact_for_a_uniform_flow() -> None:
    """A uniform flow moves every pixel by step_size per iteration: composing maps must add up exactly."""
    flow = np.zeros((2, 8, 200), np.float32)
    flow[1] = 1.0  # dx: 0.5 pixel per iteration with the default step size
    for niter in (9, 16, 37, 200 // 2):
        final = _follow(torch.from_numpy(flow)[None] * np.float32(0.5), niter, fast=True)
        x0 = np.arange(200) + 0.5
        far = x0 + 0.5 * niter < 198  # the reads stay inside the flow (the padding slows the last pixels)
        np.testing.assert_array_equal(
            final[1].reshape(8, 200)[:, far].numpy(), np.tile(x0[far] + 0.5 * niter, (8, 1))
        )
        np.testing.assert_array_equal(final[0].numpy(), np.repeat(np.arange(8) + 0.5, 200))
        assert final[1].max() <= 200 - 0.001


def test_flow_to_mask_internals(fx: dict[str, np.ndarray]) -> None:
    step = torch.from_numpy(channel_first(fx["flow.dense"]))[None] * np.float32(0.5)
    final = _follow(step, 200, fast=False).T.reshape(96, 96, 2).numpy()
    ref = fx["internals.dense.p_final"]
    np.testing.assert_allclose(final, ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(final.astype(np.uint32), ref.astype(np.uint32))
    counts = fx["internals.dense.counts"].astype(np.int64)
    grid = _Grid(1, counts.shape, 2, torch.device("cpu"))
    flat = torch.from_numpy(np.pad(counts, 2).ravel())
    for repeats, key in ((0, "seeds"), (5, "seeds_expanded")):
        labels = _label_cells(flat, grid, 5, 30, repeats, 2).reshape(100, 100)[2:-2, 2:-2]
        np.testing.assert_array_equal(labels.numpy(), fx[f"internals.dense.{key}"])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_flow_to_mask_memory_savers_change_nothing(fx: dict[str, np.ndarray], monkeypatch, mode: str) -> None:
    """The step size scales the padded flow in place, and pixels are followed in chunks."""
    from napari_ctxseg.core.flows import following as flow_following

    for key in ("flow_noisy.mixed", "flow3d"):
        flow = channel_first(fx[key])
        before = flow.copy()
        ref = flow_to_mask(flow * np.float32(0.5), step_size=1.0, mode=mode)
        np.testing.assert_array_equal(flow_to_mask(flow, mode=mode), ref)  # the default step size, 0.5
        np.testing.assert_array_equal(flow, before)  # the input is not scaled in place
        monkeypatch.setattr(flow_following, "_CHUNK_VALUES", 3 * 97)  # many chunks, one partial
        np.testing.assert_array_equal(flow_to_mask(flow, mode=mode), ref)
        monkeypatch.undo()


def test_flow_to_mask_sensitivity_is_zero(fx: dict[str, np.ndarray]) -> None:
    """flow.json observed_sensitivity: a 1e-6 relative perturbation changes no pixel."""
    info = json.loads((FLOW_NPZ.parent / "flow.json").read_text())
    observed = info["observed_sensitivity"]["pixels_changed"]
    rng = np.random.default_rng(0)
    for key, changed in observed.items():
        flow = channel_first(fx[key])
        noisy = flow * (1 + 1e-6 * rng.standard_normal(flow.shape)).astype(np.float32)
        assert (flow_to_mask(noisy, mode="exact") != flow_to_mask(flow, mode="exact")).sum() == changed


# --------------------------------------------------------------------------------------------------
# flow -> mask: behaviour
# --------------------------------------------------------------------------------------------------


def objects_above(mask: np.ndarray, min_size: int) -> np.ndarray:
    """The connected pieces of every label of ``mask`` with at least ``min_size`` pixels, labelled 1..n."""
    ndi = pytest.importorskip("scipy.ndimage")
    out = np.zeros(mask.shape, np.int64)
    n = 0
    for label, box in enumerate(ndi.find_objects(mask), start=1):
        if box is None:
            continue
        pieces, _ = ndi.label(mask[box] == label)
        sizes = np.bincount(pieces.ravel())
        for k in np.flatnonzero(sizes[1:] >= min_size) + 1:
            n += 1
            out[box][pieces == k] = n
    return out


MIN_SEED_CNTS = inspect.signature(flow_to_mask).parameters["min_seed_cnts"].default


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize(
    "name",
    [
        "parity:mixed",
        "parity:dense",
        "a891bbc89143bca7",
        "ed8c31b001a0c23c",
        "a0de55384fada5cb",
        "ce88df7356d9d4a8",
    ],
)
def test_ideal_flow_gives_back_every_object_of_min_size(
    fx: dict[str, np.ndarray], name: str, mode: str
) -> None:
    """``mask_to_flow`` then ``flow_to_mask`` with default settings: every object of at least
    ``min_seed_cnts`` pixels comes back (AP@0.5 1.0). Smaller objects are dropped on purpose (fewer pixels
    than a seed needs); the flow is made from the whole mask, small objects included. Objects are the
    connected pieces of the labels (a label in two pieces has two sinks). Known exceptions, not in these
    masks (see ``flow_to_mask``, Notes): sinks within 2 cells of each other, objects whose ideal flow
    sends pixels into a neighbouring label, and, in exact mode only, thin objects cut by the image border
    (``test_flows_recovery.py``)."""
    mask = fx[f"mask.{name[7:]}"] if name.startswith("parity:") else dsb_labels(name, 512)
    kept = objects_above(mask, MIN_SEED_CNTS)
    assert kept.max() >= 4
    out = flow_to_mask(mask_to_flow(mask), mode=mode).astype(np.int64)
    scores = matching_scores(out, kept, thresholds=(0.5,))[0.5]
    assert (scores.fp, scores.fn) == (0, 0)


@pytest.mark.parametrize("name", ["ed8c31b001a0c23c", "a0de55384fada5cb", "ce88df7356d9d4a8"])
def test_round_trip_real_masks(name: str) -> None:
    gt = remove_small_instances(dsb_labels(name), 100)  # smaller objects can fall below min_seed_cnts
    out = flow_to_mask(mask_to_flow(gt))
    scores = matching_scores(out, gt, thresholds=(0.5, 0.75))
    assert scores[0.5].ap == 1.0
    assert scores[0.75].ap > 0.9


def test_fast_agrees_with_exact_on_smooth_flow_with_weak_background() -> None:
    """A model-like flow: blurred ideal flow plus weak noise everywhere (background pixels never settle).

    At the original's 200 iterations the modes differ only at a few background pixels. The longer they
    follow a flow that is nowhere 0, the more background pixels drift and gather (at 1024 both modes make
    false objects of them, and differently): with the background zeroed as the pipeline does
    (``strong_flow_mask``), the two agree at the default 1024 and find every object."""
    ndi = pytest.importorskip("scipy.ndimage")
    gt = remove_small_instances(dsb_labels("ed8c31b001a0c23c", 192), 100)
    rng = np.random.default_rng(3)
    flow = ndi.gaussian_filter(mask_to_flow(gt), (0, 1, 1)) + 0.02 * rng.standard_normal((2, *gt.shape))
    flow = flow.astype(np.float32)
    exact, fast = flow_to_mask(flow, mode="exact", niter=200), flow_to_mask(flow, mode="fast", niter=200)
    assert (exact != fast).mean() < 5e-3  # 0.33 %: background pixels
    assert matching_scores(fast, exact, thresholds=(0.5,))[0.5].ap == 1.0
    foreground = strong_flow_mask(flow[None], FlowParams().flow_threshold)[0]
    exact, fast = flow_to_mask(flow * foreground, mode="exact"), flow_to_mask(flow * foreground)
    np.testing.assert_array_equal(fast, exact)
    assert matching_scores(fast.astype(np.int64), gt, thresholds=(0.5,))[0.5].ap == 1.0


def test_seed_label_is_one_plus_flat_index() -> None:
    mask = np.zeros((20, 20), np.int32)
    mask[3:16, 5:14] = 1
    out = flow_to_mask(mask_to_flow(mask), mode="exact")
    (label,) = np.unique(out[mask == 1])
    y, x = np.unravel_index(int(label) - 1, mask.shape)
    assert mask[y, x] == 1 and np.all(out[mask == 0] == 0)


def test_batched_equals_single_and_torch_equals_numpy(fx: dict[str, np.ndarray]) -> None:
    flows = np.stack([channel_first(fx["flow.dense"]), channel_first(fx["flow.mixed"])])
    batched = flow_to_mask(torch.from_numpy(flows))
    for i in range(2):
        np.testing.assert_array_equal(batched[i], flow_to_mask(flows[i]))


def test_flow_to_mask_3d_round_trip() -> None:
    zz, yy, xx = np.mgrid[:16, :32, :32]
    mask = np.zeros((16, 32, 32), np.int32)
    mask[(zz - 8) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 < 36] = 1
    mask[(zz - 7) ** 2 + (yy - 20) ** 2 + (xx - 22) ** 2 < 49] = 2
    out = flow_to_mask(mask_to_flow(mask))
    assert out.shape == mask.shape
    assert matching_scores(out, mask, thresholds=(0.5,))[0.5].ap == 1.0


def test_flow_error_and_max_flow_err() -> None:
    mask = np.zeros((40, 60), np.int32)
    mask[5:25, 5:25] = 1
    mask[12:35, 32:55] = 2
    flow = mask_to_flow(mask)
    errors = flow_error(flow, mask)
    assert set(errors) == {1, 2} and max(errors.values()) < 1e-12
    damaged = flow.copy()
    damaged[:, mask == 2] *= 0.5  # still points to the centre: recovered, but a flow error of 0.125
    recovered = flow_to_mask(damaged)
    errors = flow_error(damaged, recovered)
    assert len(errors) == 2
    bad = max(errors, key=errors.get)
    assert errors[bad] == pytest.approx(0.125, abs=0.01) and min(errors.values()) < 1e-12
    assert np.all(mask[recovered == bad] == 2)
    kept = flow_to_mask(damaged, max_flow_err=0.05)
    np.testing.assert_array_equal(kept, np.where(recovered == bad, 0, recovered))
    np.testing.assert_array_equal(flow_to_mask(damaged, max_flow_err=0.2), recovered)


@pytest.mark.parametrize(
    "flow",
    [
        np.zeros((2, 8)),
        np.zeros((4, 8, 8)),
        np.zeros((2, 4, 8, 8)),
        np.zeros((1, 2, 3, 8, 8)),
        np.full((2, 8, 8), np.nan),
        np.array([[["a"]]]),
    ],
)
def test_flow_to_mask_rejects_bad_flows(flow: np.ndarray) -> None:
    with pytest.raises(InputError):
        flow_to_mask(flow)


def test_flow_to_mask_rejects_bad_options() -> None:
    flow = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(InputError, match="mode"):
        flow_to_mask(flow, mode="slow")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="niter"):
        flow_to_mask(flow, niter=-1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="step_size"):
            flow_to_mask(flow, step_size=bad)
    with pytest.raises(InputError):
        flow_error(flow, np.zeros((8, 9), int))
