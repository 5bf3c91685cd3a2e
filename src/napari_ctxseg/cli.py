"""The ``ctxseg`` command line: segment, train, finetune, convert, eval.

Errors of the user's input or files print one line (``ctxseg: error: ...``) and exit with status 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__

__all__ = ["main"]

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS[name] = fn
        return fn

    return deco


#: ``ctxseg finetune`` defaults, sized to end in a predictable time on 2 CPU cores beside other work: the
#: time budget ends the training (the learning rate decays by time), the steps bound it on a faster machine
FINETUNE_BUDGET_MIN = 10.0
FINETUNE_STEPS = 1500
FINETUNE_BATCH = 4


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")


# ---- train / finetune -------------------------------------------------------------------------------------


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, type=Path, help="folder of images")
    p.add_argument(
        "--labels", required=True, type=Path, help="folder of label images with the same file names"
    )
    p.add_argument(
        "--masks", type=Path, help="folder of region masks (non-zero where annotation is complete)"
    )
    p.add_argument("--split", type=Path, help="JSON file with 'train' (and 'val') lists of names")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--steps", type=int, default=2000, help="optimiser steps (the most steps when a time budget is set)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples (crops) per step")
    p.add_argument("--crop-size", type=int, default=128, help="side of the square training crops (pixels)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (after a short warm-up)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument(
        "--val-every", type=int, default=500, help="validate every N steps (with a --split 'val' list)"
    )
    p.add_argument("--no-augment", action="store_true", help="no flips, rescaling or intensity changes")
    p.add_argument(
        "--target-diameter",
        type=float,
        default=None,
        help="rescale each image so its median object diameter is this many pixels before the "
        "random rescaling of --scale-range (None: images as they are)",
    )
    p.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("LOW", "HIGH"),
        help="random rescale factors, drawn log-uniformly",
    )
    p.add_argument(
        "--blur-prob",
        type=float,
        default=0.0,  # sigma: core.train.augment.AugmentConfig
        help="fraction of crops blurred by a Gaussian of 0.5-2 px (out-of-focus nuclei)",
    )
    p.add_argument(
        "--dim-prob",
        type=float,
        default=0.0,  # factors: core.train.augment.AugmentConfig
        help="fraction of crops in which about half of the objects are dimmed to 10-50 %% of their "
        "contrast (faint nuclei among bright ones)",
    )
    p.add_argument(
        "--p-sigma-max",
        type=float,
        default=0.5,
        help="fraction of samples trained at sigma_max (the one-step inference point)",
    )
    p.add_argument(
        "--p-no-context",
        type=float,
        default=0.5,
        help="fraction of samples trained without a context (the plain segmentation use)",
    )
    p.add_argument(
        "--weighting",
        default="unit",
        choices=["unit", "schedule"],
        help="loss weight: unit (1/c_out^2) or the schedule's (as the original)",
    )
    p.add_argument(
        "--p-other-reference",
        type=float,
        default=0.0,
        help="fraction of context references taken from another image of the same size and "
        "modality (0: a crop of the same image)",
    )
    p.add_argument(
        "--image-sampling",
        default="sqrt-area",
        choices=["sqrt-area", "area"],  # core.train.data.IMAGE_SAMPLING
        help="how often each image is drawn: sqrt-area or area (its area after "
        "--target-diameter rescaling, so every object is about equally likely)",
    )
    p.add_argument("--resume", type=Path, help="training state to continue from")
    p.add_argument("--state", type=Path, help="where to write the resumable training state")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also write the checkpoint every N steps (0: at the end)",
    )
    p.add_argument("--half", action="store_true", help="store weights as float16")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],  # core.train.config.PRECISIONS
        help="training arithmetic: fp32 or bf16 autocast (faster on CPUs with "
        "AVX-512 BF16 or AMX and on recent GPUs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: all cores; 1 is faster on a busy machine)",
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="processes that load images and draw batches (0: none; use on a GPU)",
    )
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=0.0,
        help="stop after this many minutes of training (the learning rate decays by time; 0: no budget)",
    )
    _add_device(p)
    from .cli_args import add_quiet

    add_quiet(p)


def _train_request(
    args: argparse.Namespace, *, preset: str | None, base: str | None, lr: float | None = None
):
    from .core.train.data import AugmentConfig
    from .core.train.trainer import TrainConfig
    from .services.outputs import check_checkpoint_output
    from .services.training import TrainRequest, load_folder_pairs, read_split

    check_checkpoint_output(args.output)  # before any image is read or any step is trained
    # the settings are checked (ConfigError) before any image is read
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        lr=lr if lr is not None else args.lr,
        seed=args.seed,
        val_every=args.val_every,
        p_sigma_max=args.p_sigma_max,
        p_no_context=args.p_no_context,
        weighting=args.weighting,
        p_other_reference=args.p_other_reference,
        image_sampling=args.image_sampling,
        augment=(
            AugmentConfig.none()
            if args.no_augment
            else AugmentConfig(
                scale_range=tuple(args.scale_range),
                target_diameter=args.target_diameter,
                blur_prob=args.blur_prob,
                dim_prob=args.dim_prob,
            )
        ),
        warmup=min(200, max(1, args.steps // 10)),
        time_budget_s=60.0 * args.time_budget_min,
        precision=args.precision,
    )
    train_names = read_split(args.split, "train") if args.split else None
    # validation images are only read when validation runs
    val_names = read_split(args.split, "val") if args.split and args.val_every > 0 else []
    workers = max(0, args.loader_workers)
    train_images = load_folder_pairs(args.images, args.labels, train_names, workers=workers)
    if args.masks is not None:
        from .services.training import attach_regions

        attach_regions(train_images, args.masks)
    val_images = load_folder_pairs(args.images, args.labels, val_names, workers=workers) if val_names else []
    return TrainRequest(
        output=args.output,
        train_images=train_images,
        val_images=val_images,
        preset=preset or "small",
        base=base,
        config=cfg,
        device=args.device,
        state_path=args.state,
        resume=args.resume,
        half=args.half,
        checkpoint_every=args.checkpoint_every,
        workers=workers,
        provenance={
            "images": str(args.images),
            "labels": str(args.labels),
            "split": str(args.split) if args.split else None,
        },
    )


def _run_training(req, threads: int = 0, quiet: bool = False) -> int:
    import torch

    from .services.training import run_training

    if threads:
        torch.set_num_threads(threads)
    # TF32 matrix units on Ampere+ GPUs (ignored on CPU): ~1e-3 relative error, far below SGD noise
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    from tqdm import tqdm

    gen = run_training(req)
    bar = tqdm(total=req.config.steps, unit="step", disable=quiet, dynamic_ncols=True, file=sys.stderr)
    val = ""
    try:
        while True:
            p = next(gen)
            if p.val_loss is not None:
                val = f"{p.val_loss:.4f}"
            bar.total = p.total  # a time budget may end it sooner; the bar shows the steps' upper bound
            bar.update(p.step - bar.n)
            bar.set_postfix(loss=f"{p.loss:.4f}", val=val or "-", refresh=False)
    except StopIteration as stop:
        bar.close()
        print(f"wrote {stop.value}")
        return 0
    except KeyboardInterrupt:
        gen.close()
        bar.close()
        print(f"interrupted; best weights so far written to {req.output}")
        return 130


@_command("train")
def _cmd_train(args: argparse.Namespace) -> int:
    return _run_training(_train_request(args, preset=args.preset, base=None), args.threads, args.quiet)


@_command("finetune")
def _cmd_finetune(args: argparse.Namespace) -> int:
    req = _train_request(args, preset=None, base=getattr(args, "from"))
    return _run_training(req, args.threads, args.quiet)


# ---- parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``ctxseg`` (subcommands register their options here)."""
    from .cli_args import HelpFormatter
    from .cli_segment import add_segment_parsers

    parser = argparse.ArgumentParser(
        prog="ctxseg",
        description="In-context cell segmentation with diffusion models (napari-ctxseg).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"napari-ctxseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model from scratch on folders of images and labels",
        formatter_class=HelpFormatter,
    )
    _add_train_args(p)
    p.add_argument(
        "--preset", default="small", help="model size: tiny, small (the bundled model's), medium, original"
    )

    p = sub.add_parser(
        "finetune",
        help="adapt a model to your own annotated images",
        description=f"Fine-tune a model on folders of images and labels. With the defaults it trains for "
        f"{FINETUNE_BUDGET_MIN:g} minutes ({FINETUNE_STEPS} steps of {FINETUNE_BATCH} crops at most; on 2 "
        f"CPU cores the time budget ends it first); reading the images and saving come on top (seconds). "
        f"Set --time-budget-min 0 to train for all --steps.",
        formatter_class=HelpFormatter,
    )
    _add_train_args(p)
    p.add_argument(
        "--from", default="default", help="checkpoint to start from ('default': the bundled model)"
    )
    p.set_defaults(
        lr=3e-4, steps=FINETUNE_STEPS, batch_size=FINETUNE_BATCH, time_budget_min=FINETUNE_BUDGET_MIN
    )

    add_segment_parsers(sub, _command)
    return parser


def _one_line_warning(command: str, fallback: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` that prints a :class:`CtxSegWarning` as one line (others as Python does)."""
    from .core.errors import CtxSegWarning

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if issubclass(category, CtxSegWarning):
            print(f"ctxseg {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, *args, **kwargs)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctxseg`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .core.errors import CtxSegError, CtxSegWarning

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CtxSegWarning)
            warnings.showwarning = _one_line_warning(args.command, warnings.showwarning)
            return _COMMANDS[args.command](args)
    except CtxSegError as exc:
        print(f"ctxseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"ctxseg {args.command}: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be read or written, a full disk
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ctxseg {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"ctxseg {args.command}: interrupted; every output written so far is complete (a re-run resumes)",
            file=sys.stderr,
        )
        return 130
    finally:
        if getattr(args, "verbose", False):
            print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
