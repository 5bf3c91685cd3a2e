"""Training: a tiny smoke run on real crops, determinism, resume, cancel keeps the weights."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_ctxseg.core.errors import ConfigError, InputError
from napari_ctxseg.core.nn.load import load_checkpoint
from napari_ctxseg.core.train.data import AugmentConfig, CropSampler, annotate
from napari_ctxseg.core.train.trainer import TrainConfig
from napari_ctxseg.services.progress import run_to_end
from napari_ctxseg.services.training import TrainRequest, run_training
from tests.conftest import blobs, dsb_pair


def _images():
    img, lab = dsb_pair(crop=96)
    img2, lab2 = blobs((80, 90), seed=2)
    return [annotate(img, lab, name="dsb"), annotate(img2, lab2, name="blobs")]


def _run(req: TrainRequest):
    progress = []
    path = run_to_end(run_training(req), progress.append)
    return progress, path


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(
        **{**dict(steps=4, batch_size=2, crop_size=64, warmup=1, val_every=2, val_batches=1), **kw}
    )


def test_smoke_training_writes_a_loadable_checkpoint_with_provenance(tmp_path) -> None:
    req = TrainRequest(
        output=tmp_path / "m.safetensors",
        train_images=_images(),
        val_images=_images()[:1],
        preset="tiny",
        config=_cfg(),
        device="cpu",
        provenance={"note": "smoke"},
    )
    progress, path = _run(req)
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert all(np.isfinite(p.loss) for p in progress)
    assert progress[1].val_loss is not None and progress[-1].best_val_loss is not None
    _, info = load_checkpoint(path)
    assert info.provenance["complete"] is True and info.provenance["steps_done"] == 4
    assert info.provenance["note"] == "smoke" and info.provenance["preset"] == "tiny"


def test_same_seed_same_weights_and_resume_continues_exactly(tmp_path) -> None:
    kw = dict(train_images=_images(), preset="tiny", device="cpu")
    _run(TrainRequest(output=tmp_path / "a.safetensors", config=_cfg(val_every=0), **kw))
    _run(TrainRequest(output=tmp_path / "b.safetensors", config=_cfg(val_every=0), **kw))
    a, _ = load_checkpoint(tmp_path / "a.safetensors")
    b, _ = load_checkpoint(tmp_path / "b.safetensors")
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # stop after 2 steps (state written every 2), then resume to 4
    req = TrainRequest(
        output=tmp_path / "c.safetensors",
        config=_cfg(val_every=0),
        state_path=tmp_path / "s",
        state_every=2,
        **kw,
    )
    gen = run_training(req)
    next(gen), next(gen)
    gen.close()
    assert (tmp_path / "c.safetensors").is_file()  # cancel kept the weights learned so far
    _run(
        TrainRequest(output=tmp_path / "d.safetensors", config=_cfg(val_every=0), resume=tmp_path / "s", **kw)
    )
    d, _ = load_checkpoint(tmp_path / "d.safetensors")
    for x, y in zip(a.parameters(), d.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_crops_transform_flows_consistently() -> None:
    from napari_ctxseg.core.flows.from_masks import mask_to_flow

    _, lab = blobs((64, 64), seed=3)
    im = annotate(lab.astype(np.float32) * 10 + 1, lab)
    sampler = CropSampler(
        [im], 64, augment=AugmentConfig(scale_range=(1.0, 1.0), intensity=False, invert_prob=0.0), seed=0
    )
    for _ in range(6):
        batch = sampler.sample(1, context=False)
        labels_back = (batch.image[0, 0].numpy() - batch.image[0, 0].numpy().min()) > 0.5
        flow = batch.flow[0].numpy()
        # the crop's flow equals the flow of the crop's (flipped/transposed) mask
        from skimage.measure import label

        expected = mask_to_flow(label(labels_back))
        inside = labels_back
        assert np.abs(flow[:, inside] - expected[:, inside]).mean() < 0.05


def test_target_diameter_brings_every_image_to_one_object_size() -> None:
    from skimage.measure import label

    from napari_ctxseg.core.flows.postprocess import median_diameter

    small, large = np.zeros((128, 128), np.int32), np.zeros((128, 128), np.int32)
    yy, xx = np.mgrid[:128, :128]
    for k, (cy, cx) in enumerate([(20, 20), (20, 70), (70, 20), (70, 70), (100, 100)], start=1):
        small[(yy - cy) ** 2 + (xx - cx) ** 2 <= 5**2] = k  # ~10 px discs
    for k, (cy, cx) in enumerate([(32, 32), (32, 96), (96, 64)], start=1):
        large[(yy - cy) ** 2 + (xx - cx) ** 2 <= 20**2] = k  # ~40 px discs
    images = [annotate(lab.astype(np.float32) + 1, lab, name=n) for lab, n in ((small, "s"), (large, "l"))]

    def crop_sizes(target):
        aug = AugmentConfig(scale_range=(1.0, 1.0), intensity=False, invert_prob=0.0, target_diameter=target)
        sampler = CropSampler(images, 64, augment=aug, seed=0)
        out = {"s": [], "l": []}
        for _ in range(16):
            batch = sampler.sample(1, context=False)
            out[batch.names[0]].append(median_diameter(label(batch.flow[0].norm(dim=0).numpy() > 0.5)))
        return out

    plain, scaled = crop_sizes(None), crop_sizes(20.0)
    assert plain["s"] and plain["l"] and scaled["s"] and scaled["l"]
    assert max(plain["s"]) < 12 and max(plain["l"]) > 30  # as they are: ~10 and ~40 px
    assert 16 < max(scaled["s"]) < 23 and max(scaled["l"]) < 23  # both brought to ~20 px


def test_area_sampling_draws_images_by_rescaled_area() -> None:
    """ "area" draws each image by its area after the target-diameter rescaling (every object about equally
    likely); the default draws by the square root of the pixel count."""
    yy, xx = np.mgrid[:64, :64]
    small = np.zeros((64, 64), np.int32)  # ~10 px discs: rescaled 2x, 4x the area of the other image
    for k, (cy, cx) in enumerate([(12, 12), (12, 40), (40, 12), (40, 40)], start=1):
        small[(yy - cy) ** 2 + (xx - cx) ** 2 <= 5**2] = k
    large = np.zeros((64, 64), np.int32)  # one ~20 px disc: not rescaled
    large[(yy - 32) ** 2 + (xx - 32) ** 2 <= 10**2] = 1
    images = [annotate(lab.astype(np.float32) + 1, lab, name=n) for lab, n in ((small, "s"), (large, "l"))]
    aug = AugmentConfig(scale_range=(1.0, 1.0), intensity=False, invert_prob=0.0, target_diameter=20.0)

    def share_of_small(mode: str) -> float:
        sampler = CropSampler(images, 32, augment=aug, seed=0, image_sampling=mode)
        names = sampler.sample(400, context=False).names
        return names.count("s") / len(names)

    assert abs(share_of_small("sqrt-area") - 0.5) < 0.08  # same pixel count: drawn equally
    assert abs(share_of_small("area") - 0.8) < 0.06  # 4 : 1
    with pytest.raises(ConfigError, match="image_sampling"):
        CropSampler(images, 32, image_sampling="objects")
    with pytest.raises(ConfigError, match="image_sampling"):
        TrainConfig(image_sampling="objects")


def test_scale_range_bounds_the_random_rescaling() -> None:
    """Rescale factors are drawn log-uniformly within ``scale_range`` (times the image's base scale)."""
    img, lab = dsb_pair(crop=96)
    images = [annotate(img, lab, name="dsb")]
    sampler = CropSampler(images, 64, augment=AugmentConfig(scale_range=(0.35, 0.5)), seed=0)
    scales = np.array([sampler._geometry(0)[0] for _ in range(400)])
    assert scales.min() >= 0.35 and scales.max() <= 0.5
    assert np.mean(scales < np.sqrt(0.35 * 0.5)) == pytest.approx(0.5, abs=0.08)  # log-uniform median
    for bad in ((2.0, 1.0), (0.0, 1.0)):
        with pytest.raises(ConfigError, match="scale_range"):
            AugmentConfig(scale_range=bad)


def test_blur_augmentation_softens_crops_and_is_off_by_default() -> None:
    """``blur_prob`` blurs crops (less pixel-to-pixel variation, same geometry and flows); at its default 0
    it draws no random numbers, so earlier runs are reproduced exactly."""
    img, lab = dsb_pair(crop=96)
    images = [annotate(img, lab, name="dsb")]
    base = dict(scale_range=(1.0, 1.0), intensity=False, invert_prob=0.0)

    def batch(**kw):
        return CropSampler(images, 64, augment=AugmentConfig(**base, **kw), seed=3).sample(4, context=False)

    plain, blurred = batch(), batch(blur_prob=1.0, blur_sigma=(1.5, 2.0))
    torch.testing.assert_close(blurred.flow, plain.flow)  # the target is untouched
    roughness = [float((b.image.diff(dim=-1).abs()).mean()) for b in (plain, blurred)]
    assert roughness[1] < 0.6 * roughness[0]
    assert abs(float(blurred.image.mean()) - float(plain.image.mean())) < 0.02  # intensities kept
    torch.testing.assert_close(batch(blur_prob=0.0).image, plain.image)
    with pytest.raises(ConfigError, match="blur_prob"):
        AugmentConfig(blur_prob=1.5)
    with pytest.raises(ConfigError, match="blur_sigma"):
        AugmentConfig(blur_sigma=(2.0, 1.0))


def test_dim_augmentation_lowers_the_contrast_of_some_objects_only() -> None:
    """``dim_prob`` dims about half of a crop's objects towards the background level (labels and flows
    untouched); at its default 0 it draws nothing, so earlier runs are reproduced exactly."""
    img, lab = dsb_pair(crop=192)
    images = [annotate(img, lab, name="dsb")]
    base = dict(scale_range=(1.0, 1.0), flips=False, intensity=False, invert_prob=0.0)

    crops: list[tuple[torch.Tensor, ...]] = []

    def batch(**kw):
        sampler = CropSampler(images, 192, augment=AugmentConfig(**base, **kw), seed=3)
        crop = sampler._crop
        sampler._crop = lambda *a: crops.append(crop(*a)) or crops[-1]
        return sampler.sample(1, context=False)

    plain, dimmed = batch(), batch(dim_prob=1.0, dim_factor=(0.2, 0.2))
    torch.testing.assert_close(dimmed.flow, plain.flow)  # the same crop, the target untouched
    labels = crops[0][2]
    assert torch.equal(crops[1][2], labels) and torch.equal(plain.image[0], crops[0][0])
    bg = labels == 0
    level = plain.image[0][:, bg].median(dim=1).values.view(-1, 1)
    ratios = []
    for i in torch.unique(labels[labels > 0]):
        inside = labels == i
        a = (plain.image[0][:, inside] - level).mean()
        b = (dimmed.image[0][:, inside] - level).mean()
        ratios.append(float(b / a))
    dimmed_objects = sum(r < 0.5 for r in ratios)
    kept = sum(r > 0.9 for r in ratios)
    assert dimmed_objects >= 1 and kept >= 1 and dimmed_objects + kept >= 0.8 * len(ratios)
    far = torch.from_numpy(~ndi.binary_dilation(labels.numpy() > 0, iterations=6))
    torch.testing.assert_close(dimmed.image[0][:, far], plain.image[0][:, far])  # background kept
    torch.testing.assert_close(batch(dim_prob=0.0).image, plain.image)
    with pytest.raises(ConfigError, match="dim_prob"):
        AugmentConfig(dim_prob=-0.1)
    with pytest.raises(ConfigError, match="dim_factor"):
        AugmentConfig(dim_factor=(0.5, 1.5))


def test_training_input_errors(tmp_path) -> None:
    img, lab = blobs()
    with pytest.raises(InputError, match="does not match labels"):
        annotate(img, lab[:50])
    with pytest.raises(InputError, match="region mask is empty"):
        annotate(img, lab, np.zeros_like(lab, bool))
    with pytest.raises(InputError, match="no annotated objects"):
        _run(
            TrainRequest(
                output=tmp_path / "x.safetensors",
                train_images=[annotate(img, np.zeros_like(lab))],
                preset="tiny",
                config=_cfg(),
                device="cpu",
            )
        )


def test_time_budget_stops_early_as_a_complete_run_with_a_decayed_rate(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from napari_ctxseg.core.train import trainer as training
    from napari_ctxseg.core.train.trainer import _lr_at

    # the trainer's clock advances 0.04 s per reading (about 0.08 s per step): how many steps fit the
    # budget does not depend on how loaded the test machine is
    clock = iter(0.04 * i for i in range(1_000_000))
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: next(clock)))

    cfg = _cfg(steps=10_000, val_every=0, warmup=1, time_budget_s=1.0)
    # progress is the larger of the step and time fractions: half the budget is half the cosine
    assert _lr_at(5, cfg, elapsed_s=0.5) == pytest.approx(cfg.lr * 0.55, rel=1e-3)
    assert _lr_at(5, cfg, elapsed_s=5.0) == pytest.approx(cfg.lr * 0.1)
    req = TrainRequest(
        output=tmp_path / "t.safetensors", train_images=_images(), preset="tiny", config=cfg, device="cpu"
    )
    progress, path = _run(req)
    assert 5 <= len(progress) <= 20
    assert progress[-1].total == progress[-1].step and progress[-1].eta_s == 0.0
    assert progress[-1].elapsed_s >= 1.0 and progress[-1].lr < cfg.lr * 0.2
    _, info = load_checkpoint(path)
    assert info.provenance["complete"] is True and info.provenance["steps_done"] == len(progress)
    with pytest.raises(Exception, match="time_budget_s"):
        _cfg(time_budget_s=-1)


def test_loader_workers_train_and_are_repeatable(tmp_path) -> None:
    from napari_ctxseg.core.train.data import BatchStream

    images = _images()
    sampler = CropSampler(images, 64, seed=0)
    a = next(iter(BatchStream(sampler, 2, context=True, seed=(0, 0))))
    b = next(iter(BatchStream(sampler, 2, context=True, seed=(0, 0))))
    c = next(iter(BatchStream(sampler, 2, context=True, seed=(0, 5))))
    assert torch.equal(a.image, b.image) and torch.equal(a.ref_flow, b.ref_flow)
    assert not torch.equal(a.image, c.image)  # a resumed run (other start step) draws other batches
    kw = dict(train_images=images, preset="tiny", device="cpu", config=_cfg(val_every=0), workers=2)
    progress, _ = _run(TrainRequest(output=tmp_path / "w1.safetensors", **kw))
    _run(TrainRequest(output=tmp_path / "w2.safetensors", **kw))
    assert [p.step for p in progress] == [1, 2, 3, 4] and all(np.isfinite(p.loss) for p in progress)
    m1, _ = load_checkpoint(tmp_path / "w1.safetensors")
    m2, _ = load_checkpoint(tmp_path / "w2.safetensors")
    for x, y in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_load_folder_pairs_in_worker_processes_matches_serial(tmp_path) -> None:
    import tifffile

    from napari_ctxseg.services.training import load_folder_pairs

    (tmp_path / "i").mkdir(), (tmp_path / "l").mkdir()
    for k, (img, lab) in enumerate([dsb_pair(crop=64), blobs((50, 60), seed=4), blobs((40, 40), seed=5)]):
        tifffile.imwrite(tmp_path / "i" / f"n{k}.tif", img)
        tifffile.imwrite(tmp_path / "l" / f"n{k}.tif", lab)
    serial = load_folder_pairs(tmp_path / "i", tmp_path / "l")
    pooled = load_folder_pairs(tmp_path / "i", tmp_path / "l", workers=2)
    assert [p.name for p in pooled] == [p.name for p in serial] == ["n0", "n1", "n2"]
    for p, s in zip(pooled, serial):
        np.testing.assert_array_equal(p.flow, s.flow)
        np.testing.assert_array_equal(p.image, s.image)


def test_context_references_from_other_images_of_the_same_group() -> None:
    from napari_ctxseg.core.train.data import acquisition_key

    (a, la), (b, lb), (c, lc) = blobs((64, 64), seed=1), blobs((64, 64), seed=2), blobs((80, 72), seed=3)
    images = [annotate(a, la, name="a"), annotate(b, lb, name="b"), annotate(c, lc, name="c")]
    keys = [acquisition_key(im) for im in images]
    assert keys[0] == keys[1] != keys[2]  # same size and modality vs another size
    sampler = CropSampler(images, 32, seed=0, groups=keys, p_other_reference=1.0, p_no_context=0.0)
    calls: list[str] = []
    crop = sampler._crop
    sampler._crop = lambda im, scale, flips: (calls.append(im.name), crop(im, scale, flips))[1]
    sampler.sample(24, context=True)
    pairs = list(zip(calls[0::2], calls[1::2]))  # (target, reference) per sample
    assert {t for t, _ in pairs} == {"a", "b", "c"}
    assert all(r == {"a": "b", "b": "a", "c": "c"}[t] for t, r in pairs)  # c has no partner: itself
    with pytest.raises(InputError, match="one per image"):
        CropSampler(images, 32, groups=keys[:2])
    with pytest.raises(Exception, match="probabilities"):
        _cfg(p_other_reference=1.5)


def _counted(calls: list[str], crop: Any, im: Any, scale: float, flips: Any) -> Any:
    calls.append(im.name)
    return crop(im, scale, flips)


def test_no_context_samples_get_zero_references_without_a_crop() -> None:
    """References of samples drawn without a context (weight 0) are never encoded by the model, so the
    sampler does not crop them: it hands over zeros (1.8x the samples/s at p_no_context 0.8)."""
    img, lab = blobs((64, 64), seed=4)
    images = [annotate(img, lab, name="a")]
    for p_no_context, crops_per_sample in ((1.0, 1), (0.0, 2)):
        sampler = CropSampler(images, 32, seed=0, p_no_context=p_no_context)
        calls: list[str] = []
        sampler._crop = functools.partial(_counted, calls, sampler._crop)
        batch = sampler.sample(6, context=True)
        assert len(calls) == 6 * crops_per_sample
        assert batch.ref_image.shape == batch.image.shape and batch.ref_flow.shape == batch.flow.shape
        assert batch.ref_mask.shape == (6, 32, 32) and batch.ref_mask.dtype == torch.bool
        if p_no_context == 1.0:
            assert torch.equal(batch.context_weight, torch.zeros(6))
            assert not batch.ref_image.any() and not batch.ref_flow.any() and not batch.ref_mask.any()
        else:
            assert torch.equal(batch.context_weight, torch.ones(6))
            assert all(batch.ref_image[i].any() and batch.ref_mask[i].any() for i in range(6))
    # a mixed batch: zero references exactly where the weight is 0
    batch = CropSampler(images, 32, seed=1, p_no_context=0.5).sample(32, context=True)
    unused = batch.context_weight == 0
    assert 0 < int(unused.sum()) < 32
    assert not batch.ref_image[unused].any() and all(batch.ref_image[i].any() for i in torch.nonzero(~unused))


def test_packed_batches_are_smaller_and_unpack_to_the_same_batch() -> None:
    """Worker processes hand over packed batches (float16, references of context samples only); the
    trainer unpacks them on its device into the batch the sampler drew, to float16 rounding."""
    img, lab = blobs((64, 64), seed=4)
    batch = CropSampler([annotate(img, lab, name="a")], 32, seed=1, p_no_context=0.5).sample(16, context=True)
    used = torch.nonzero(batch.context_weight != 0).flatten()
    assert 0 < len(used) < 16
    packed = batch.packed()
    assert packed.image.dtype == packed.flow.dtype == packed.ref_image.dtype == torch.float16
    assert packed.ref_image.shape[0] == packed.ref_mask.shape[0] == len(used)
    assert torch.equal(packed.ref_rows, used) and torch.equal(packed.context_weight, batch.context_weight)

    def nbytes(b) -> int:
        ts = (b.image, b.flow, b.weight, b.ref_image, b.ref_flow, b.ref_mask)
        return sum(t.numel() * t.element_size() for t in ts)

    assert nbytes(packed) < 0.5 * nbytes(batch)
    back = packed.unpacked()
    assert back.ref_rows is None and back.names == batch.names
    for name in ("image", "flow", "weight", "ref_image", "ref_flow", "ref_mask", "context_weight"):
        a, b = getattr(back, name), getattr(batch, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert torch.equal(back.weight, batch.weight) and torch.equal(back.ref_mask, batch.ref_mask)
    assert not back.ref_image[batch.context_weight == 0].any()
    # an unpacked batch passes through unchanged; a batch without references packs too
    assert torch.equal(batch.unpacked().image, batch.image)
    plain = CropSampler([annotate(img, lab, name="a")], 32, seed=1).sample(4, context=False)
    assert plain.packed().ref_rows is None and torch.equal(plain.packed().unpacked().weight, plain.weight)


def test_bf16_autocast_trains_float32_weights_with_the_same_losses_to_bf16_accuracy(tmp_path) -> None:
    kw = dict(train_images=_images(), preset="tiny", device="cpu")
    p32, path32 = _run(TrainRequest(output=tmp_path / "a.safetensors", config=_cfg(val_every=0), **kw))
    p16, path16 = _run(
        TrainRequest(output=tmp_path / "b.safetensors", config=_cfg(val_every=0, precision="bf16"), **kw)
    )
    # same seed, same batches: the first loss differs only by bfloat16 rounding (8-bit mantissa)
    assert p16[0].loss == pytest.approx(p32[0].loss, rel=0.05)
    assert all(np.isfinite(p.loss) for p in p16)
    m16, info = load_checkpoint(path16)
    assert all(t.dtype == torch.float32 for t in m16.state_dict().values())
    assert info.provenance["train_config"]["precision"] == "bf16"
    m32, _ = load_checkpoint(path32)
    assert any(not torch.equal(a, b) for a, b in zip(m16.state_dict().values(), m32.state_dict().values()))
    with pytest.raises(Exception, match="precision"):
        _cfg(precision="fp16")


def test_fine_tuning_keeps_the_bases_sampler_declaration_marked_as_inherited(tmp_path) -> None:
    from napari_ctxseg.core.io.checkpoint import read_info, set_sampling

    kw = dict(train_images=_images(), device="cpu", config=_cfg(steps=2, val_every=0))
    _, base = _run(TrainRequest(output=tmp_path / "base.safetensors", preset="tiny", **kw))
    assert read_info(base).sampling is None  # a model trained from scratch declares nothing
    _, plain_tuned = _run(TrainRequest(output=tmp_path / "plain_tuned.safetensors", base=base, **kw))
    assert read_info(plain_tuned).sampling is None  # nothing to inherit
    set_sampling(base, {"solvers": ["edf"], "max_steps": 2, "evidence": "measured on val"})
    _, tuned = _run(TrainRequest(output=tmp_path / "tuned.safetensors", base=base, **kw))
    sampling = read_info(tuned).sampling
    assert sampling["solvers"] == ["edf"] and sampling["max_steps"] == 2
    assert sampling["evidence"] == (
        "inherited from base.safetensors, not measured after fine-tuning; base.safetensors: measured on val"
    )
