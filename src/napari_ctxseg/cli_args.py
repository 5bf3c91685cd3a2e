"""The options of the inference-side ``ctxseg`` subcommands (``segment``, ``adapt``, ``convert``, ``eval``).

:mod:`napari_ctxseg.cli_segment` runs the commands; this module only declares their options and parses
option values (argparse ``type`` functions raise ``ArgumentTypeError`` with what was expected).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .core.diffusion.solvers import SOLVERS

__all__ = [
    "HelpFormatter",
    "add_inference_parsers",
    "add_quiet",
    "add_sampler_args",
    "parse_diameter",
    "positive_seconds",
    "unit_interval",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help line ends with its default (argparse's own formatter)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:  # a required option has no default to show
            return action.help
        return super()._get_help_string(action)


def add_quiet(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars or progress lines (results and errors are still printed)."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """The sampler, post-processing and device options of ``segment`` and ``eval``."""
    p.add_argument(
        "--checkpoint", default="default", help="a .safetensors checkpoint ('default': the bundled model)"
    )
    p.add_argument("--steps", type=int, default=1, help="sampler steps (1 = one-step prediction)")
    p.add_argument("--solver", default="edf", choices=SOLVERS, help="sampler of multi-step runs")
    p.add_argument("--samples", type=int, default=1, help="diffusion samples per image (flows are averaged)")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the flows of the image and its 3 flips (4x the network calls)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise")
    p.add_argument(
        "--diameter",
        type=parse_diameter,
        default="auto",
        help="typical object diameter in pixels; 'auto' measures it first; "
        "'none' keeps the model's training scale (20 px)",
    )
    p.add_argument("--min-size", type=int, default=15, help="remove objects smaller than this (pixels)")
    p.add_argument(
        "--flow-threshold",
        type=float,
        default=None,
        help="pixels with a shorter predicted flow are background (0 = the original; None: 0.4)",
    )
    p.add_argument(
        "--min-contrast",
        type=float,
        default=0.0,
        help="drop objects fainter than this many noise levels against their surroundings, e.g. 3 for "
        "screens with empty fields (objects found in pure noise are ~1); 0 = off. Not for "
        "faint, low-SNR cells",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    p.add_argument(
        "--tile-size", type=int, default=1024, help="images larger than this are processed in tiles"
    )
    add_quiet(p)


def parse_diameter(text: str) -> float | str | None:
    """``--diameter``: a positive number of pixels, ``auto`` or ``none``."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        value = float(word)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a diameter in pixels, 'auto' or 'none', got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the diameter must be a positive number of pixels, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number from 0 to 1 (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A number of seconds above 0 and at most a day (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400, got {text!r}")
    return value


def add_inference_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the options of ``segment``, ``adapt``, ``convert`` and ``eval`` to the ``ctxseg`` subparsers."""
    p = sub.add_parser(
        "segment",
        help="segment images (files, folders or globs) and write labels + CSV",
        formatter_class=HelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (TIFF, PNG, NPY)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("ctxseg_output"),
        help="output folder (NAME_labels.tif and NAME_objects.csv per image)",
    )
    p.add_argument(
        "--context",
        type=Path,
        metavar="PACK",
        help="a context pack (.npz, saved by the widget's 'context pack: Save...'): image, labels and region",
    )
    p.add_argument("--context-image", type=Path, help="an annotated reference image (in-context use)")
    p.add_argument("--context-labels", type=Path, help="its instance labels")
    p.add_argument("--context-region", type=Path, help="where its annotation is complete (non-zero)")
    p.add_argument(
        "--channel",
        type=int,
        help="the channel to segment (0-based, along --channel-axis; None: grey or RGB images as they are); "
        "also taken from a --context-image file",
    )
    p.add_argument(
        "--nuclear-channel",
        type=int,
        help="an optional nuclear channel: the model sees (channel, nuclear, 0), not the channel as grey",
    )
    p.add_argument(
        "--channel-axis",
        type=int,
        default=-1,
        help="the axis of the channels: -1 for (H, W, C), 0 for (C, H, W) or (C, Z, H, W)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (else skipped)")
    p.add_argument(
        "--3d",
        dest="volume_3d",
        action="store_true",
        help="(Z, H, W) volumes: 2D flows on all three slice orientations, followed in 3D "
        "(default: slice by slice, stitched)",
    )
    p.add_argument(
        "--stitch-threshold",
        type=unit_interval,
        default=0.25,
        help="stacks slice by slice: objects of consecutive planes with at least this IoU share a label "
        "(0 keeps every plane's labels apart)",
    )
    p.add_argument(
        "--normalize",
        choices=["plane", "stack"],
        default="plane",
        help="stacks and volumes: map each plane's own intensity percentiles to 0-1 (plane: for time "
        "series) or the whole stack's (stack: z-stacks, whose out-of-focus planes then stay dim)",
    )
    p.add_argument(
        "--adapt",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="first fine-tune a copy of the model on the context for this many seconds (about 90 on 2 CPU "
        "cores), then segment every input with it (None: off)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="with a context: pick the diameter, flow threshold and min size that score best on the context "
        "itself, print that self-score (AP@0.5), and segment with them",
    )
    p.add_argument("--workers", type=int, default=0, help="run on a local dask cluster with N workers")
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler (None: no cluster)")
    add_sampler_args(p)

    p = sub.add_parser(
        "adapt",
        help="fine-tune a copy of a model on one annotated context image (for segment --checkpoint)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--context", type=Path, metavar="PACK", help="a context pack (.npz) to adapt to")
    p.add_argument("--context-image", type=Path, help="the annotated reference image (or --context)")
    p.add_argument("--context-labels", type=Path, help="its instance labels")
    p.add_argument("--context-region", type=Path, help="where its annotation is complete (non-zero)")
    p.add_argument(
        "--seconds",
        type=positive_seconds,
        default=90.0,
        help="training time budget in seconds (%(default)s: about right on 2 CPU cores; setup comes on top)",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="adapted checkpoint to write (.safetensors)"
    )
    p.add_argument(
        "--checkpoint", default="default", help="the model to adapt ('default': the bundled model)"
    )
    p.add_argument(
        "--diameter",
        type=parse_diameter,
        default="auto",
        help="the object diameter segmentation will use ('auto': measured from the labels)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_quiet(p)

    p = sub.add_parser(
        "convert",
        help="convert an original ctxseg (Flax) checkpoint to .safetensors",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", type=Path, help="pickle (nnx State, Module, Optimizer/EMA) or flattened .npz")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .safetensors checkpoint to write")
    p.add_argument(
        "--model",
        required=True,
        choices=["ctxseg-p", "seg-p", "seg-d", "ctxseg-d"],
        help="the kind of model the source holds",
    )
    p.add_argument(
        "--trust",
        action="store_true",
        help="allow reading a pickle: unpickling runs code from the file, use only trusted files",
    )
    p.add_argument("--ctx-head-dim", type=int, default=0, help="context attention head width (0: 128)")
    p.add_argument(
        "--sigma-data", type=float, default=1.0, help="EDM sigma_data (the original inference: 1.0)"
    )
    p.add_argument("--half", action="store_true", help="store float16 weights")

    p = sub.add_parser(
        "eval",
        help="segment annotated images and print AP/F1 (pooled and per modality)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--images", required=True, type=Path, help="folder of images")
    p.add_argument("--labels", required=True, type=Path, help="folder of label images with the same names")
    p.add_argument("--split", type=Path, help="JSON split file; evaluates its --subset list")
    p.add_argument("--subset", default="val", help="which list of the --split file to evaluate")
    p.add_argument("--baseline", action="store_true", help="also score an Otsu + watershed baseline")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0: all)")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    add_sampler_args(p)
