"""``ctxseg segment``, ``convert`` and ``eval`` subcommands (registered by :mod:`napari_ctxseg.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .core.config import SOLVERS


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", default="default", help="a .safetensors checkpoint (default: bundled model)"
    )
    p.add_argument(
        "--steps", type=int, default=1, help="sampler steps (1 = one-step prediction, the default)"
    )
    p.add_argument("--solver", default="edf", choices=SOLVERS)
    p.add_argument("--samples", type=int, default=1, help="diffusion samples per image (flows are averaged)")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the flows of the image and its 3 flips (4x the network calls)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--diameter",
        type=parse_diameter,
        default="auto",
        help="typical object diameter in pixels; 'auto' (default) measures it first; "
        "'none' keeps the model's training scale (20 px)",
    )
    p.add_argument("--min-size", type=int, default=15, help="remove objects smaller than this (pixels)")
    p.add_argument(
        "--flow-threshold",
        type=float,
        default=None,
        help="pixels with a shorter predicted flow are background (0 = the original)",
    )
    p.add_argument(
        "--min-contrast",
        type=float,
        default=0.0,
        help="drop objects fainter than this many noise levels against their surroundings, e.g. 3 for "
        "screens with empty fields (objects found in pure noise are ~1); default 0 = off. Not for "
        "faint, low-SNR cells",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument(
        "--tile-size", type=int, default=1024, help="images larger than this are processed in tiles"
    )


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


def _cmd_segment(args: argparse.Namespace) -> int:
    from .core.errors import InputError
    from .services.batch import collect_inputs, segment_files

    if args.context_image is None and (args.context_labels is not None or args.context_region is not None):
        raise InputError("--context-labels and --context-region need --context-image (the annotated image)")
    inputs = collect_inputs(args.inputs)
    _warn_sampler(args)
    options = _segment_options(args)
    if args.volume_3d:
        options["volume_3d"] = True
    options["stack_normalize"] = args.normalize
    options["stitch_threshold"] = args.stitch_threshold
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
            if args.context_image is None:
                raise InputError("--adapt needs a context: --context-image and --context-labels")
            # one adapted copy of the model serves the whole batch
            options["checkpoint"] = str(_adapt_from_args(args, Path(tmp) / "adapted.safetensors"))
        if args.calibrate:
            if args.context_image is None:
                raise InputError("--calibrate needs a context: --context-image and --context-labels")
            options.update(_calibrate_from_args(args, options))
        done = segment_files(
            inputs,
            args.output,
            options=options,
            overwrite=args.overwrite,
            workers=args.workers,
            scheduler=args.scheduler,
            progress=_progress,
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
    """Run ``adapt`` on the context files of ``args`` (seconds: ``args.adapt``), with a progress line."""
    from .services.adapt import adapt
    from .services.training import read_array

    region = None if args.context_region is None else read_array(args.context_region)
    seconds = float(args.adapt)
    _progress(f"adapting {args.checkpoint} to the context for {seconds:g} s ...")

    def report(p) -> None:
        if p.step == 1 or p.step % 25 == 0:
            _progress(f"  adapt step {p.step}, loss {p.loss:.3f}, {p.elapsed_s:.0f} s")

    path = adapt(
        read_array(args.context_image),
        read_array(args.context_labels),
        region,
        checkpoint=args.checkpoint,
        seconds=seconds,
        seed=args.seed,
        output=output,
        device=args.device,
        diameter=args.diameter,
        on_progress=report,
    )
    _progress(f"adapted model: {path}")
    return path


def _calibrate_from_args(args: argparse.Namespace, options: dict) -> dict:
    """Calibrate diameter and flow settings on the context files once for the batch; print the self-score."""
    from .services.calibrate import calibrate_steps
    from .services.progress import run_to_end
    from .services.segment import SegmentRequest
    from .services.training import read_array

    image = read_array(args.context_image)
    region = None if args.context_region is None else read_array(args.context_region)
    req = SegmentRequest(
        image=image,
        **{k: v for k, v in options.items() if k in SegmentRequest.__dataclass_fields__ and k != "image"},
        context_image=image,
        context_labels=read_array(args.context_labels),
        context_region=region,
    )
    _progress("calibrating on the context ...")
    cal = run_to_end(calibrate_steps(req))
    _progress(
        f"context self-score AP@0.5 {cal.self_score:.3f} (with the given settings {cal.default_score:.3f}): "
        f"diameter {cal.diameter:.1f} px, flow threshold {cal.flow.flow_threshold}, "
        f"min size {cal.flow.min_size}"
    )
    return {"diameter": cal.diameter, "flow": cal.flow}


def _cmd_adapt(args: argparse.Namespace) -> int:
    from .core.errors import InputError

    if args.output.suffix != ".safetensors":
        raise InputError(f"the adapted checkpoint must be a .safetensors file, got {args.output}")
    if args.output.exists() and not args.overwrite:
        raise InputError(f"{args.output} exists; pass --overwrite to replace it")
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
        progress=_progress,
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
    p = sub.add_parser("segment", help="segment images (files, folders or globs) and write labels + CSV")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (TIFF, PNG, NPY)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("ctxseg_output"),
        help="output folder (NAME_labels.tif and NAME_objects.csv per image)",
    )
    p.add_argument("--context-image", type=Path, help="an annotated reference image (in-context use)")
    p.add_argument("--context-labels", type=Path, help="its instance labels")
    p.add_argument("--context-region", type=Path, help="where its annotation is complete (non-zero)")
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
        "(default 0.25; 0 keeps every plane's labels apart)",
    )
    p.add_argument(
        "--normalize",
        choices=["plane", "stack"],
        default="plane",
        help="stacks and volumes: map each plane's own intensity percentiles to 0-1 (plane, the default; "
        "for time series) or the whole stack's (stack: z-stacks, whose out-of-focus planes then stay dim)",
    )
    p.add_argument(
        "--adapt",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="first fine-tune a copy of the model on the context for this many seconds (about 90 on 2 CPU "
        "cores), then segment every input with it (default: off)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="with a context: pick the diameter, flow threshold and min size that score best on the context "
        "itself, print that self-score (AP@0.5), and segment with them (default: off)",
    )
    p.add_argument("--workers", type=int, default=0, help="run on a local dask cluster with N workers")
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler")
    _add_sampler_args(p)
    register("segment")(_cmd_segment)

    p = sub.add_parser(
        "adapt", help="fine-tune a copy of a model on one annotated context image (for segment --checkpoint)"
    )
    p.add_argument("--context-image", type=Path, required=True, help="the annotated reference image")
    p.add_argument("--context-labels", type=Path, required=True, help="its instance labels")
    p.add_argument("--context-region", type=Path, help="where its annotation is complete (non-zero)")
    p.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=90.0,
        help="training time budget in seconds (default: %(default)s; setup comes on top)",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="adapted checkpoint to write (.safetensors)"
    )
    p.add_argument("--checkpoint", default="default", help="the model to adapt (default: the bundled model)")
    p.add_argument(
        "--diameter",
        type=parse_diameter,
        default="auto",
        help="the object diameter segmentation will use ('auto', the default: measured from the labels)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    register("adapt")(_cmd_adapt)

    p = sub.add_parser("convert", help="convert an original ctxseg (Flax) checkpoint to .safetensors")
    p.add_argument("source", type=Path, help="pickle (nnx State, Module, Optimizer/EMA) or flattened .npz")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--model", required=True, choices=["ctxseg-p", "seg-p", "seg-d", "ctxseg-d"])
    p.add_argument(
        "--trust",
        action="store_true",
        help="allow reading a pickle: unpickling runs code from the file, use only trusted files",
    )
    p.add_argument("--ctx-head-dim", type=int, default=0, help="context attention head width (default 128)")
    p.add_argument(
        "--sigma-data", type=float, default=1.0, help="EDM sigma_data (the original inference: 1.0)"
    )
    p.add_argument("--half", action="store_true", help="store float16 weights")
    register("convert")(_cmd_convert)

    p = sub.add_parser("eval", help="segment annotated images and print AP/F1 (pooled and per modality)")
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--labels", required=True, type=Path)
    p.add_argument("--split", type=Path, help="JSON split file; evaluates its --subset list")
    p.add_argument("--subset", default="val")
    p.add_argument("--baseline", action="store_true", help="also score an Otsu + watershed baseline")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    _add_sampler_args(p)
    register("eval")(_cmd_eval)
