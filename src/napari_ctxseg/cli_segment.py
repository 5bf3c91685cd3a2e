"""The inference-side ``ctxseg`` subcommands: ``segment``, ``adapt``, ``convert`` and ``eval``.

:mod:`napari_ctxseg.cli` registers them; their options are declared in :mod:`napari_ctxseg.cli_args`
(``parse_diameter`` is importable from here too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .cli_args import add_inference_parsers, parse_diameter

__all__ = ["COMMANDS", "add_segment_parsers", "parse_diameter"]


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


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
    from .services.batch import read_context

    ctx = read_context(
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
    from .services.batch import segment_files
    from .services.batch_io import collect_inputs

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

        from .services.batch_io import atomic_write

        text = json.dumps(report, indent=1)
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))
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


#: the subcommands this module runs, by name
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "segment": _cmd_segment,
    "adapt": _cmd_adapt,
    "convert": _cmd_convert,
    "eval": _cmd_eval,
}


def add_segment_parsers(sub: argparse._SubParsersAction, register: Callable) -> None:
    """Add the inference-side subcommands to the ``ctxseg`` parser; ``register`` their functions."""
    add_inference_parsers(sub)
    for name, run in COMMANDS.items():
        register(name)(run)
