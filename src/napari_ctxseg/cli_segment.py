"""``ctxseg segment``, ``convert`` and ``eval`` subcommands (registered by :mod:`napari_ctxseg.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .core.diffusion.solvers import SOLVERS


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


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


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
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


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _segment_options(args: argparse.Namespace) -> dict:
    from .services.segment import FlowParams

    flow = FlowParams(min_size=args.min_size, min_contrast=args.min_contrast)
    if args.flow_threshold is not None:
        flow = replace(flow, flow_threshold=args.flow_threshold)
    return dict(
        checkpoint=args.checkpoint,
        device=args.device,
        steps=args.steps,
        solver=args.solver,
        num_samples=args.samples,
        tta=args.tta,
        seed=args.seed,
        diameter=args.diameter,
        flow=flow,
        tile_size=args.tile_size,
    )


def _warn_sampler(args: argparse.Namespace) -> None:
    from .services.models import sampler_warning

    advice = sampler_warning(args.checkpoint, args.steps, args.solver)
    if advice:
        print(f"warning: {advice}", file=sys.stderr)


def _channels(args: argparse.Namespace) -> dict:
    """The channel choice of ``ctxseg segment`` as request fields (empty: the images as they are)."""
    from .core.errors import InputError

    channel = getattr(args, "channel", None)
    if channel is None:
        if getattr(args, "nuclear_channel", None) is not None:
            raise InputError("--nuclear-channel needs --channel (the channel to segment)")
        return {}
    return {"channel": channel, "nuclear_channel": args.nuclear_channel, "channel_axis": args.channel_axis}


def _has_context(args: argparse.Namespace) -> bool:
    return args.context_image is not None or getattr(args, "context", None) is not None


def _context_arrays(args: argparse.Namespace) -> tuple:
    """The context of ``args`` as arrays (image, labels, region): a pack, or files (channels chosen)."""
    from .services.batch import _read_context

    ctx = _read_context(
        None
        if args.context_image is None
        else (
            str(args.context_image),
            str(args.context_labels),
            None if args.context_region is None else str(args.context_region),
        ),
        None if getattr(args, "context", None) is None else str(args.context),
        _channels(args) if hasattr(args, "channel") else None,
    )
    return ctx["context_image"], ctx["context_labels"], ctx["context_region"]


def _cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .core.errors import InputError
    from .services.batch import collect_inputs, segment_files

    if args.context is not None and args.context_image is not None:
        raise InputError("give a context as --context PACK or as --context-image/--context-labels, not both")
    if args.context_image is None and (args.context_labels is not None or args.context_region is not None):
        raise InputError("--context-labels and --context-region need --context-image (the annotated image)")
    inputs = collect_inputs(args.inputs)
    _warn_sampler(args)
    options = _segment_options(args)
    options.update(_channels(args))
    if args.volume_3d:
        options["volume_3d"] = True
    options["stack_normalize"] = args.normalize
    options["stitch_threshold"] = args.stitch_threshold
    if args.context is not None:
        options["context_pack"] = str(args.context)
    if args.context_image is not None:
        if args.context_labels is None:
            raise InputError("--context-image needs --context-labels")
        options["context_paths"] = (
            str(args.context_image),
            str(args.context_labels),
            None if args.context_region is None else str(args.context_region),
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ctxseg-adapted-") as tmp:
        if args.adapt:
            if not _has_context(args):
                raise InputError(
                    "--adapt needs a context: --context PACK, or --context-image and --context-labels"
                )
            # one adapted copy of the model serves the whole batch
            options["checkpoint"] = str(_adapt_from_args(args, Path(tmp) / "adapted.safetensors"))
        if args.calibrate:
            if not _has_context(args):
                raise InputError(
                    "--calibrate needs a context: --context PACK, or --context-image and --context-labels"
                )
            options.update(_calibrate_from_args(args, options))
        with tqdm(
            total=len(inputs),
            unit="image",
            desc="segment",
            disable=args.quiet,
            dynamic_ncols=True,
            file=sys.stderr,
        ) as bar:

            def done_one(record: dict) -> None:
                bar.update(1)
                bar.set_postfix_str(f"{Path(record['input']).name}: {record['status']}")

            done = segment_files(
                inputs,
                args.output,
                options=options,
                overwrite=args.overwrite,
                workers=args.workers,
                scheduler=args.scheduler,
                on_record=done_one,
            )
    failed = [r for r in done if r["status"] == "failed"]
    for record in done:
        if record["status"] != "failed":
            print(
                f"{record['input']} -> {record['labels']} ({record['objects']} objects, {record['status']})"
            )
    if not failed:
        return 0
    if len(done) == 1:
        raise InputError(f"{failed[0]['input']}: {failed[0]['error']}")
    reasons = "; ".join(f"{r['input']}: {r['error']}" for r in failed[:3]) + (
        "; ..." if len(failed) > 3 else ""
    )
    print(
        f"ctxseg segment: error: {len(done) - len(failed)} of {len(done)} files done, {len(failed)} failed "
        f"({reasons})",
        file=sys.stderr,
    )
    return 2


def _adapt_from_args(args: argparse.Namespace, output: Path) -> Path:
    """Run ``adapt`` on the context of ``args`` (seconds: ``args.adapt``), with a progress bar by time."""
    from tqdm import tqdm

    from .services.adapt import adapt

    image, labels, region = _context_arrays(args)
    seconds = float(args.adapt)
    with tqdm(
        total=round(seconds),
        unit="s",
        desc=f"adapt {Path(str(args.checkpoint)).name}",
        disable=args.quiet,
        dynamic_ncols=True,
        file=sys.stderr,
    ) as bar:

        def report(p) -> None:
            bar.update(max(0, min(round(seconds), round(p.elapsed_s)) - bar.n))
            bar.set_postfix(step=p.step, loss=f"{p.loss:.3f}", refresh=False)

        path = adapt(
            image,
            labels,
            region,
            checkpoint=args.checkpoint,
            seconds=seconds,
            seed=args.seed,
            output=output,
            device=args.device,
            diameter=args.diameter,
            on_progress=report,
        )
        bar.update(round(seconds) - bar.n)
    if not args.quiet:
        _progress(f"adapted model: {path}")
    return path


def _calibrate_from_args(args: argparse.Namespace, options: dict) -> dict:
    """Calibrate diameter and flow settings on the context once for the batch; print the self-score."""
    from .services.calibrate import calibrate_steps
    from .services.progress import run_to_end
    from .services.segment import SegmentRequest

    image, labels, region = _context_arrays(args)
    skip = ("image", "channel", "nuclear_channel", "channel_axis")  # the context's channels are chosen
    req = SegmentRequest(
        image=image,
        **{k: v for k, v in options.items() if k in SegmentRequest.__dataclass_fields__ and k not in skip},
        context_image=image,
        context_labels=labels,
        context_region=region,
    )
    if not args.quiet:
        _progress("calibrating on the context ...")
    cal = run_to_end(calibrate_steps(req))
    # the self-score is a result, printed even with --quiet
    print(
        f"context self-score AP@0.5 {cal.self_score:.3f} (with the given settings {cal.default_score:.3f}): "
        f"diameter {cal.diameter:.1f} px, flow threshold {cal.flow.flow_threshold}, "
        f"min size {cal.flow.min_size}",
        file=sys.stderr,
    )
    return {"diameter": cal.diameter, "flow": cal.flow}


def _cmd_adapt(args: argparse.Namespace) -> int:
    from .core.errors import InputError

    if args.output.suffix != ".safetensors":
        raise InputError(f"the adapted checkpoint must be a .safetensors file, got {args.output}")
    if args.output.exists() and not args.overwrite:
        raise InputError(f"{args.output} exists; pass --overwrite to replace it")
    if args.context is not None and args.context_image is not None:
        raise InputError("give a context as --context PACK or as --context-image/--context-labels, not both")
    if args.context is None and (args.context_image is None or args.context_labels is None):
        raise InputError("a context is needed: --context PACK, or --context-image and --context-labels")
    args.adapt = args.seconds
    path = _adapt_from_args(args, args.output)
    print(f"wrote {path}")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400, got {text!r}")
    return value


def _cmd_convert(args: argparse.Namespace) -> int:
    import warnings

    from .services.convert import convert_flax_checkpoint

    overrides = {"ctx_head_dim": args.ctx_head_dim} if args.ctx_head_dim else None
    if args.trust:
        print(
            "warning: unpickling runs code from the file; only convert checkpoints you trust", file=sys.stderr
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said once above
        info = convert_flax_checkpoint(
            args.source,
            args.output,
            kind=args.model,
            trust=args.trust,
            overrides=overrides,
            sigma_data=args.sigma_data,
            half=args.half,
        )
    print(f"wrote {info.path} ({info.kind}, sha256 {info.sha256[:16]})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .services.evaluate import evaluate_folder, format_report

    if args.json is not None:
        from .services.outputs import check_file_output

        check_file_output(args.json, "JSON report")
        _check_replaceable_json(args.json)
    _warn_sampler(args)
    report = evaluate_folder(
        args.images,
        args.labels,
        names_file=args.split,
        subset=args.subset,
        options=_segment_options(args),
        baseline=args.baseline,
        progress=None if args.quiet else _progress,
        limit=args.limit,
    )
    print(format_report(report))
    if args.json:
        import json

        from .services.batch import _atomic_write

        text = json.dumps(report, indent=1)
        _atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))
    return 0


def _check_replaceable_json(path: Path) -> None:
    """An existing ``--json`` file is replaced only when it is a JSON report (never an image or a script)."""
    import json

    from .core.errors import InputError

    if not path.exists():
        return
    try:
        ok = isinstance(json.loads(path.read_text()), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"{path} exists and is not a JSON report; it is never replaced (choose another --json)"
        )


def add_segment_parsers(sub: argparse._SubParsersAction, register: Callable) -> None:
    """Add the inference-side subcommands to the ``ctxseg`` parser."""
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
        help="a context pack (.npz, saved by the widget's 'Save context...'): image, labels and region",
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
        type=_unit_interval,
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
        type=_positive_seconds,
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
    _add_sampler_args(p)
    register("segment")(_cmd_segment)

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
        type=_positive_seconds,
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
    register("adapt")(_cmd_adapt)

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
    register("convert")(_cmd_convert)

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
    _add_sampler_args(p)
    register("eval")(_cmd_eval)
