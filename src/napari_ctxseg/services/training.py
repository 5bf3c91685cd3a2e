"""Training and fine-tuning as a service: folders or in-memory pairs in, a checkpoint out.

Used by ``ctxseg train`` / ``ctxseg finetune`` and by the napari fine-tune widget. Work is a generator of
:class:`~napari_ctxseg.core.train.trainer.TrainProgress`; closing it stops training after the current step
and still writes the best weights so far (nothing is lost on cancel).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ConfigError, CtxSegWarning, InputError
from ..core.io.checkpoint import CheckpointInfo, save_checkpoint
from ..core.nn.config import ModelConfig
from ..core.nn.models import SegP, build_model
from ..core.train.data import AnnotatedImage, AugmentConfig, CropSampler, acquisition_key, annotate
from ..core.train.trainer import TrainConfig, Trainer, TrainProgress
from .devices import resolve_device
from .models import PRESETS, load_model
from .outputs import check_checkpoint_output

__all__ = ["TrainRequest", "load_folder_pairs", "read_split", "run_training"]


def read_split(path: str | os.PathLike, subset: str) -> list[str]:
    """Names of one subset (``"train"``/``"val"``) of a JSON split file ``{"train": [...], "val": [...]}``."""
    data = json.loads(Path(path).read_text())
    if subset not in data:
        raise InputError(f"split file {path} has no {subset!r} subset (has {sorted(data)})")
    return [str(n) for n in data[subset]]


def _find(folder: Path, name: str) -> Path:
    for ext in (".tif", ".tiff", ".png", ".npy"):
        p = folder / f"{name}{ext}"
        if p.is_file():
            return p
    raise InputError(f"no image named {name!r} in {folder}")


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF, PNG or .npy file into a numpy array.

    Raises
    ------
    InputError
        A missing file, a folder, or a file that cannot be read as an image of its kind (not an image,
        truncated, an object array), or an array of fewer than two dimensions.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; expected an image file")
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from skimage.io import imread

            array = imread(path)
    except MemoryError:
        raise
    except Exception as exc:  # readers raise many types for a foreign, corrupt or truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read {path} as an image (corrupt, truncated or not an image?): {reason}"
        ) from exc
    array = np.asarray(array)
    if array.ndim < 2:
        raise InputError(f"{path} holds an array of shape {array.shape}; expected an image of 2 or more axes")
    return array


def _load_pair(images: Path, labels: Path, name: str) -> AnnotatedImage:
    return annotate(read_array(_find(images, name)), read_array(_find(labels, name)), name=name)


def load_folder_pairs(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    workers: int = 0,
) -> list[AnnotatedImage]:
    """Annotated images from two folders with the same file names (flows computed once here).

    ``workers`` > 0 reads and computes flows in that many processes (same result, in ``names`` order).
    """
    images, labels = Path(images), Path(labels)
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder; expected a folder of images")
    if names is None:
        names = sorted(
            p.stem for p in labels.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png", ".npy")
        )
        unlabelled = sorted(
            {p.stem for p in images.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png", ".npy")}
            - set(names)
        )
        if unlabelled:
            shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
            warnings.warn(
                f"{len(unlabelled)} image(s) in {images} have no label file in {labels} and are left "
                f"out: {shown}",
                CtxSegWarning,
                stacklevel=2,
            )
    if not names:
        raise InputError(f"no label images found in {labels}")
    if workers > 0 and len(names) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(names))) as pool:
            return list(pool.map(_load_pair, [images] * len(names), [labels] * len(names), names))
    return [_load_pair(images, labels, n) for n in names]


@dataclass
class TrainRequest:
    """What to train, on what, and where to write it.

    Parameters
    ----------
    output
        Destination checkpoint (``.safetensors``).
    train_images, val_images
        Annotated images (:func:`load_folder_pairs`, :func:`~napari_ctxseg.core.train.data.annotate`).
    preset, base
        Start from a fresh model of a preset size, or from a checkpoint (``"default"`` or a path) to
        fine-tune. Exactly one is used; ``base`` wins.
    config
        Training settings.
    device
        ``auto``/``cpu``/``cuda``/``mps``.
    state_path
        Resumable training state (written every ``state_every`` steps); ``resume`` continues from one.
    provenance
        Extra facts recorded in the checkpoint (e.g. layer names and hashes).
    half
        Store the weights as float16 (half the file size).
    checkpoint_every
        Also write the checkpoint every N steps (0: only at the end).
    workers
        Processes drawing training batches (see :class:`~napari_ctxseg.core.train.trainer.Trainer`).
    groups
        One key per training image: images with equal keys serve as context references for each other
        (e.g. the data set folder). ``None``: :func:`~napari_ctxseg.core.train.data.acquisition_key`.
    image_weights
        Optional sampling factor per training image (e.g. a fixed share of crops per data set).
    """

    output: str | os.PathLike
    train_images: list[AnnotatedImage]
    val_images: list[AnnotatedImage] = field(default_factory=list)
    preset: str = "small"
    base: str | os.PathLike | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    state_path: str | os.PathLike | None = None
    state_every: int = 200
    resume: str | os.PathLike | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    half: bool = False
    checkpoint_every: int = 0
    workers: int = 0
    groups: list[Any] | None = None
    image_weights: list[float] | None = None


def _initial_model(req: TrainRequest) -> tuple[SegP, dict[str, Any], float, dict[str, Any] | None]:
    """The model to train, its provenance, its sigma_data and the sampler declaration it inherits."""
    if req.base is not None:
        loaded = load_model(req.base, device="cpu")
        model = build_model(loaded.info.config)
        model.load_state_dict(loaded.model.state_dict())
        base = {"base_checkpoint": loaded.name, "base_sha256": loaded.info.sha256}
        return model, base, loaded.sigma_data, _inherited_sampling(loaded.info)  # type: ignore[return-value]
    if req.preset not in PRESETS:
        raise ConfigError(f"unknown preset {req.preset!r}; expected one of {sorted(PRESETS)}")
    torch.manual_seed(req.config.seed)
    config: ModelConfig = PRESETS[req.preset]
    return build_model(config), {"preset": req.preset}, req.config.sigma_data, None  # type: ignore[return-value]


def _inherited_sampling(base: CheckpointInfo) -> dict[str, Any] | None:
    """The sampler declaration of a fine-tuned model: its base's, marked as not measured again.

    Minutes of fine-tuning do not teach the noise levels the base was weak at, so the same warnings stay
    useful.
    """
    if not base.sampling:
        return None
    name = base.path.name if base.path is not None else "the base checkpoint"
    evidence = f"inherited from {name}, not measured after fine-tuning"
    if base.sampling.get("evidence"):
        evidence += f"; {name}: {base.sampling['evidence']}"
    return {**base.sampling, "evidence": evidence}


def run_training(req: TrainRequest) -> Generator[TrainProgress, None, Path]:
    """Train per ``req``, yielding progress; returns the written checkpoint path.

    Closing the generator (cancel) writes the best validation weights (or the current EMA if there is no
    validation yet) to ``req.output`` before returning, so a cancelled run still leaves a usable model.
    """
    if not req.train_images:
        raise InputError("no training images")
    if not any(int(im.labels.max()) > 0 for im in req.train_images):
        raise InputError("the training labels contain no annotated objects")
    check_checkpoint_output(req.output)  # before any training: a user's file is never replaced
    cfg = req.config
    model, prov, sigma_data, sampling = _initial_model(req)
    if abs(sigma_data - cfg.sigma_data) > 1e-12:
        cfg = TrainConfig(**{**cfg.to_dict(), "sigma_data": sigma_data})
    device = resolve_device(req.device)
    torch.manual_seed(cfg.seed)
    sampler = CropSampler(
        req.train_images,
        cfg.crop_size,
        augment=cfg.augment,
        p_no_context=cfg.p_no_context,
        partial_prob=cfg.partial_prob,
        seed=cfg.seed,
        groups=req.groups
        if req.groups is not None
        else ([acquisition_key(im) for im in req.train_images] if cfg.p_other_reference else None),
        p_other_reference=cfg.p_other_reference,
        image_sampling=cfg.image_sampling,
        image_weights=req.image_weights,
        p_subset=cfg.p_subset,
    )
    val_sampler = (
        CropSampler(
            req.val_images,
            cfg.crop_size,
            augment=AugmentConfig.none(),
            p_no_context=cfg.p_no_context,
            partial_prob=0.0,
            seed=cfg.seed + 1,
        )
        if req.val_images
        else None
    )
    provenance = {
        **prov,
        **req.provenance,
        "train_images": len(req.train_images),
        "val_images": len(req.val_images),
        "train_config": cfg.to_dict(),
        "device": str(device),
        "torch": torch.__version__,
    }
    t0 = time.time()
    trainer = Trainer(
        model,
        sampler,
        cfg,
        val_sampler=val_sampler,
        device=device,
        resume=req.resume,
        state_path=req.state_path,
        state_every=req.state_every,
        workers=req.workers,
    )

    def write(last: TrainProgress | None, *, final: bool, history: list | None = None) -> Path:
        return _write(
            req,
            trainer.best_model(),
            sigma_data,
            provenance,
            last,
            t0,
            final=final,
            history=history,
            sampling=sampling,
        )

    gen = trainer.run()
    last: TrainProgress | None = None
    history = None
    try:
        while True:
            try:
                last = next(gen)
            except StopIteration as stop:
                history = stop.value.history
                break
            if req.checkpoint_every and last.step % req.checkpoint_every == 0 and last.step < cfg.steps:
                write(last, final=False)
            yield last
    finally:
        if history is None:  # cancelled or failed: keep what was learned so far
            gen.close()
            if last is not None:
                write(last, final=False)
    return write(last, final=True, history=history)


def _write(
    req: TrainRequest,
    model: SegP,
    sigma_data: float,
    provenance: dict[str, Any],
    last: TrainProgress | None,
    t0: float,
    *,
    final: bool,
    history: list | None = None,
    sampling: dict[str, Any] | None = None,
) -> Path:
    prov = dict(provenance)
    prov.update(
        {
            "steps_done": last.step if last else 0,
            "complete": final,
            "train_seconds": round(time.time() - t0, 1),
            "best_val_loss": last.best_val_loss if last else None,
        }
    )
    if history:
        prov["loss_curve"] = [
            [h["step"], round(h["loss"], 5)] for h in history[:: max(1, len(history) // 100)]
        ]
    path = save_checkpoint(
        req.output,
        model.cpu(),
        sigma_data=sigma_data,
        provenance=prov,
        dtype=torch.float16 if req.half else None,
        sampling=sampling,
    )
    return Path(path)


def attach_regions(images: list[AnnotatedImage], masks: str | os.PathLike) -> None:
    """Set each image's complete-annotation region from a folder of masks with the same names."""
    folder = Path(masks)
    for im in images:
        region = read_array(_find(folder, im.name)) != 0
        if region.shape != im.labels.shape:
            raise InputError(
                f"{im.name}: region mask shape {region.shape} does not match labels {im.labels.shape}"
            )
        if not region.any():
            raise InputError(f"{im.name}: the region mask is empty")
        im.region = region
