"""Resumable training state: model, EMA, AdamW moments and RNG states as safetensors plus JSON metadata.

Written atomically (a temporary file replaced into place); nothing is pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..nn.models import SegP
from .config import TrainConfig
from .data import CropSampler

__all__ = ["load_state", "save_state"]


def save_state(
    path: str | os.PathLike,
    step: int,
    model: SegP,
    ema: SegP,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    sampler: CropSampler,
    history: list[dict[str, float]],
    best_val: float | None,
    cfg: TrainConfig,
) -> None:
    """Write the state of a training run at ``step`` to ``path`` (safetensors), atomically.

    Tensors ``model.*``, ``ema.*``, ``opt.<i>.*`` (AdamW moments per parameter) and ``rng.torch``;
    metadata ``step``, ``history`` (the last 2000 entries), ``best_val``, ``sampler_rng`` (the crop
    sampler's numpy generator), ``config`` (the model's) and ``train_config``, as JSON.
    """
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = gen.get_state()
    meta = {
        "step": str(step),
        "history": json.dumps(history[-2000:]),
        "best_val": json.dumps(best_val),
        "sampler_rng": json.dumps(sampler.rng.bit_generator.state),
        "config": json.dumps(model.config.to_dict()),
        "train_config": json.dumps(cfg.to_dict()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(
    path: str | os.PathLike,
    model: SegP,
    ema: SegP,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    sampler: CropSampler,
) -> tuple[int, list[dict[str, float]], float | None]:
    """Restore a state written by :func:`save_state` into the given objects, in place.

    Returns
    -------
    tuple
        The step it was written at, the loss history and the best validation loss (or None).

    Raises
    ------
    CheckpointError
        If the file cannot be read or was written for another model configuration.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read training state {path}: {exc}") from exc
    if json.loads(meta.get("config", "null")) != model.config.to_dict():
        raise CheckpointError(f"training state {path} is for another model configuration")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in st.items()}
    gen.set_state(tensors["rng.torch"])
    sampler.rng.bit_generator.state = json.loads(meta["sampler_rng"])
    return int(meta["step"]), json.loads(meta["history"]), json.loads(meta["best_val"])
