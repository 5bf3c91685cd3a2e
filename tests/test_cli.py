"""The ``ctxseg`` command line, run in-process through :func:`napari_ctxseg.cli.main`."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from napari_ctxseg.cli import main
from tests.conftest import blobs


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        img, lab = blobs((64, 72), seed=i)
        tifffile.imwrite(d / f"im{i}.tif", img)
        tifffile.imwrite(d / f"lab{i}.tif", lab.astype(np.uint16))
    return d


def test_help_and_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "segment" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "napari-ctxseg" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["segment", "eval"])
def test_solver_choices_are_the_services_solvers(command, capsys) -> None:
    from napari_ctxseg.services.segment import SOLVERS

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "{" + ",".join(SOLVERS) + "}" in capsys.readouterr().out
    # the core's internal one-step solver is not a user choice
    with pytest.raises(SystemExit) as exc:
        main([command, "x.tif", "--solver", "one_step"])
    assert exc.value.code == 2
    assert "invalid choice: 'one_step'" in capsys.readouterr().err


def test_segment_writes_labels_and_csv_then_resumes(tmp_path, image_dir, tiny_checkpoint, capsys) -> None:
    out = tmp_path / "out"
    args = [
        str(image_dir / "im*.tif"),
        "-o",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--samples",
        "2",
    ]
    assert main(["segment", *args]) == 0
    for i in range(2):
        labels = tifffile.imread(out / f"im{i}_labels.tif")
        assert labels.shape == (64, 72) and labels.dtype == np.uint32
        with open(out / f"im{i}_objects.csv") as f:
            header = next(csv.reader(f))
        assert {"label", "area", "agreement", "flow_error"} <= set(header)
    assert main(["segment", *args]) == 0
    assert capsys.readouterr().out.count("skipped") == 2


def test_segment_tta_flag_reaches_the_request(tmp_path, image_dir, tiny_checkpoint, monkeypatch) -> None:
    from napari_ctxseg.services import segment

    seen = []
    real = segment.segment_steps

    def spy(req, **kw):
        seen.append(req.tta)
        return real(req, **kw)

    monkeypatch.setattr(segment, "segment_steps", spy)  # batch imports it when it runs
    base = [str(image_dir / "im0.tif"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    base += ["--diameter", "none"]  # no measuring pass, so one request per run
    assert main(["segment", *base, "-o", str(tmp_path / "a"), "--tta"]) == 0
    assert main(["segment", *base, "-o", str(tmp_path / "b")]) == 0
    assert seen == [True, False]
    assert (tmp_path / "a" / "im0_labels.tif").is_file()


def test_segment_stack_normalize_flag_and_a_blank_plane(tmp_path, tiny_checkpoint, monkeypatch) -> None:
    from napari_ctxseg.core.preprocess.normalize import intensity_limits
    from napari_ctxseg.services import stack

    rng = np.random.default_rng(0)
    volume = (rng.random((3, 40, 40)) * 1000).astype(np.uint16)
    volume[1] = 0  # a blank plane does not stop the stack
    tifffile.imwrite(tmp_path / "vol.tif", volume, photometric="minisblack")
    seen = []
    real = stack.segment_steps

    def spy(req, **kw):
        seen.append(req.intensity_limits)
        return real(req, **kw)

    monkeypatch.setattr(stack, "segment_steps", spy)
    base = [str(tmp_path / "vol.tif"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    base += ["--diameter", "none"]
    assert main(["segment", *base, "-o", str(tmp_path / "a"), "--normalize", "stack"]) == 0
    assert seen == [intensity_limits(volume)] * 3
    seen.clear()
    assert main(["segment", *base, "-o", str(tmp_path / "b")]) == 0  # default: per plane
    assert seen[0] is None and seen[1] == (0.0, 1.0) and seen[2] is None  # the blank one mapped to 0
    assert tifffile.imread(tmp_path / "b" / "vol_labels.tif").shape == (3, 40, 40)


@pytest.mark.parametrize(
    ("mode", "flags"),
    [("stack", []), ("unstitched", ["--stitch-threshold", "0"]), ("3d", ["--3d"])],
)
def test_segment_measures_the_objects_of_stacks_and_volumes(tmp_path, mode, flags) -> None:
    img, _ = blobs((64, 64), n=4, seed=5)
    volume = np.stack([img] * 5 + [np.roll(img, 20, axis=1)] * 5).astype(np.float32)
    tifffile.imwrite(tmp_path / "vol.tif", volume, photometric="minisblack")
    args = [str(tmp_path / "vol.tif"), "-o", str(tmp_path / "out"), "--device", "cpu"]
    assert main(["segment", *args, *flags]) == 0  # the bundled model
    labels = tifffile.imread(tmp_path / "out" / "vol_labels.tif")
    with open(tmp_path / "out" / "vol_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert labels.shape == (10, 64, 64) and len(rows) == len(np.unique(labels)) - 1 > 0  # a row per object
    assert sum(int(r["area"]) for r in rows) == int((labels > 0).sum())
    assert {"intensity_mean", "centroid-1"} <= set(rows[0])
    assert ("n_planes" in rows[0]) == (mode != "3d") and ("centroid-2" in rows[0]) == (mode == "3d")
    if mode == "unstitched":
        assert {int(r["n_planes"]) for r in rows} == {1}
    elif mode == "stack":  # a disc through (at least) 5 identical planes is one object
        assert max(int(r["n_planes"]) for r in rows) >= 5


def test_segment_refuses_a_stitch_threshold_outside_0_1(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["segment", "x.tif", "--stitch-threshold", "2"])
    assert "from 0 to 1" in capsys.readouterr().err


def test_segment_warns_when_sampler_settings_exceed_the_checkpoints_declaration(
    tmp_path, image_dir, tiny_checkpoint, capsys
) -> None:
    import shutil

    from napari_ctxseg.core.io.checkpoint import set_sampling

    declared = shutil.copy(tiny_checkpoint, tmp_path / "declared.safetensors")
    set_sampling(declared, {"solvers": ["edf"], "max_steps": 2, "evidence": "test"})
    base = [str(image_dir / "im0.tif"), "--checkpoint", str(declared), "--device", "cpu", "--overwrite"]
    assert main(["segment", *base, "-o", str(tmp_path / "a"), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: declared.safetensors is validated for 1-2 sampler steps with edf; 3 steps" in err
    assert (tmp_path / "a" / "im0_labels.tif").is_file()  # a warning, not a refusal
    assert main(["segment", *base, "-o", str(tmp_path / "b"), "--steps", "2"]) == 0
    assert "warning" not in capsys.readouterr().err
    # a checkpoint that declares nothing gets no warning
    plain = ["segment", str(image_dir / "im0.tif"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*plain, "-o", str(tmp_path / "c"), "--steps", "3", "--solver", "heun"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_segment_with_context_files(tmp_path, image_dir, tiny_checkpoint) -> None:
    out = tmp_path / "ctx"
    assert (
        main(
            [
                "segment",
                str(image_dir / "im0.tif"),
                "-o",
                str(out),
                "--checkpoint",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--context-image",
                str(image_dir / "im1.tif"),
                "--context-labels",
                str(image_dir / "lab1.tif"),
            ]
        )
        == 0
    )
    assert (out / "im0_labels.tif").is_file()


def test_bad_inputs_print_one_line_and_exit_2(tmp_path, image_dir, tiny_checkpoint, capsys) -> None:
    tifffile.imwrite(tmp_path / "flat.tif", np.full((32, 32), 5, np.uint8))
    code = main(
        [
            "segment",
            str(tmp_path / "flat.tif"),
            "-o",
            str(tmp_path / "o"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "constant" in err[-1] and "Traceback" not in "".join(err)
    assert main(["segment", str(tmp_path / "missing*.tif"), "--device", "cpu"]) == 2
    assert "no image found" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04junk")
    assert (
        main(
            [
                "segment",
                str(image_dir / "im0.tif"),
                "-o",
                str(tmp_path / "o2"),
                "--checkpoint",
                str(tmp_path / "bad.safetensors"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "ctxseg convert" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "badlab.tif", np.zeros((10, 10), np.uint16))
    assert (
        main(
            [
                "segment",
                str(image_dir / "im0.tif"),
                "-o",
                str(tmp_path / "o3"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--context-image",
                str(image_dir / "im1.tif"),
                "--context-labels",
                str(tmp_path / "badlab.tif"),
            ]
        )
        == 2
    )
    assert "must cover the context image" in capsys.readouterr().err
    assert main(["segment", str(image_dir / "im0.tif"), "--device", "quantum"]) == 2


def test_convert_npz_fixture(tmp_path, capsys) -> None:
    from tests.parity import parity_path

    src = parity_path("models", "ctxsegp.params.npz")
    out = tmp_path / "conv.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--model", "ctxseg-p", "--ctx-head-dim", "8"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["convert", str(src), "-o", str(out), "--model", "seg-d"]) == 2


def test_train_and_eval_smoke(tmp_path, image_dir, tiny_checkpoint, capsys) -> None:
    imgs, labs = tmp_path / "i", tmp_path / "l"
    imgs.mkdir(), labs.mkdir()
    for i in range(2):
        (imgs / f"x{i}.tif").write_bytes((image_dir / f"im{i}.tif").read_bytes())
        (labs / f"x{i}.tif").write_bytes((image_dir / f"lab{i}.tif").read_bytes())
    out = tmp_path / "trained.safetensors"
    assert (
        main(
            [
                "train",
                "--images",
                str(imgs),
                "--labels",
                str(labs),
                "-o",
                str(out),
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--crop-size",
                "64",
                "--device",
                "cpu",
                "--loader-workers",
                "2",
                "--time-budget-min",
                "10",
                "--p-other-reference",
                "0.5",
                "--precision",
                "bf16",
                "--blur-prob",
                "0.5",
                "--p-no-context",
                "0.8",
                "--scale-range",
                "0.4",
                "1.5",
            ]
        )
        == 0
    )
    assert out.is_file()
    from napari_ctxseg.core.io.checkpoint import read_info

    train_config = read_info(out).provenance["train_config"]
    assert train_config["precision"] == "bf16" and train_config["augment"]["blur_prob"] == 0.5
    assert train_config["p_no_context"] == 0.8
    assert train_config["augment"]["scale_range"] == [0.4, 1.5]
    assert (
        main(
            [
                "eval",
                "--images",
                str(imgs),
                "--labels",
                str(labs),
                "--checkpoint",
                str(out),
                "--device",
                "cpu",
                "--baseline",
            ]
        )
        == 0
    )
    report = capsys.readouterr().out
    assert "baseline" in report and "AP@0.5" in report


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--blur-prob", "2", "blur_prob"),
        ("--p-no-context", "-0.1", "p_no_context"),
        ("--p-sigma-max", "1.5", "p_sigma_max"),
    ],
)
def test_train_settings_are_checked_before_images_are_read(tmp_path, capsys, flag, value, message) -> None:
    # the folders do not exist: a bad setting must be reported first, not after loading a data set
    missing = tmp_path / "missing"
    argv = [
        "train",
        "--images",
        str(missing),
        "--labels",
        str(missing),
        "-o",
        str(tmp_path / "m.safetensors"),
    ]
    assert main([*argv, flag, value, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctxseg train: error:") and message in err[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_diameter_option_takes_auto_none_or_pixels(capsys) -> None:
    from napari_ctxseg.cli import build_parser

    parser = build_parser()
    base = ["segment", "x.tif"]
    assert parser.parse_args(base).diameter == "auto"  # the default measures the objects first
    assert parser.parse_args([*base, "--diameter", "none"]).diameter is None
    assert parser.parse_args([*base, "--diameter", "AUTO"]).diameter == "auto"
    assert parser.parse_args([*base, "--diameter", "12.5"]).diameter == 12.5
    for bad in ("big", "-3", "0"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*base, "--diameter", bad])
        assert exc.value.code == 2
        assert "diameter" in capsys.readouterr().err


def test_min_contrast_option_reaches_the_flow_settings() -> None:
    from napari_ctxseg.cli import build_parser
    from napari_ctxseg.cli_segment import _segment_options

    parser = build_parser()
    assert _segment_options(parser.parse_args(["segment", "x.tif"]))["flow"].min_contrast == 0.0
    args = parser.parse_args(["segment", "x.tif", "--min-contrast", "3"])
    assert _segment_options(args)["flow"].min_contrast == 3.0


def _subparsers():
    import argparse

    from napari_ctxseg.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["segment", "adapt", "train", "finetune", "convert", "eval"])
def test_every_option_has_a_help_line_and_shows_its_default(command, capsys) -> None:
    parser = _subparsers()[command]
    for action in parser._actions:
        assert action.help, f"ctxseg {command} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    optional = [a for a in parser._actions if a.option_strings and not a.required and a.dest != "help"]
    formatter = parser._get_formatter()
    for action in optional:
        assert "%(default)" in (formatter._get_help_string(action) or ""), (command, action.option_strings)
    for flag in ("--steps", "--seed", "--quiet" if command != "convert" else "--half"):
        if any(flag in a.option_strings for a in optional):
            action = next(a for a in optional if flag in a.option_strings)
            assert f"(default: {action.default})" in text, (command, flag)


def test_finetune_defaults_end_in_a_predictable_time(capsys) -> None:
    from napari_ctxseg.cli import FINETUNE_BUDGET_MIN

    args = _subparsers()["finetune"].parse_args(["--images", "i", "--labels", "l", "-o", "m.safetensors"])
    assert args.time_budget_min == FINETUNE_BUDGET_MIN > 0 and args.lr == 3e-4
    assert args.steps * args.batch_size <= 8000  # a 2-core CPU trains ~4 steps of 4 crops a second at best
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"trains for {FINETUNE_BUDGET_MIN:g} minutes" in text


def test_segment_shows_a_progress_bar_unless_quiet(tmp_path, image_dir, tiny_checkpoint, capsys) -> None:
    args = [str(image_dir / "im*.tif"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    assert main(["segment", *args, "-o", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "2/2" in captured.err and "image/s" in captured.err  # tqdm's bar
    assert captured.out.count("objects, done") == 2
    assert main(["segment", *args, "-o", str(tmp_path / "b"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("objects, done") == 2


def test_segment_a_chosen_channel_of_channel_first_images(tmp_path, tiny_checkpoint, capsys) -> None:
    img, _ = blobs((64, 72))
    noise = (np.random.default_rng(0).random(img.shape) * 255).astype(img.dtype)
    tifffile.imwrite(tmp_path / "grey.tif", img)
    tifffile.imwrite(tmp_path / "two.tif", np.stack([noise, img]))  # (C, H, W): cells in channel 1
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--diameter", "none", "-q"]
    assert main(["segment", str(tmp_path / "grey.tif"), "-o", str(tmp_path / "g"), *common]) == 0
    two = ["segment", str(tmp_path / "two.tif"), "-o", str(tmp_path / "c"), *common]
    assert main([*two, "--channel", "1", "--channel-axis", "0"]) == 0
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "c" / "two_labels.tif"),
        tifffile.imread(tmp_path / "g" / "grey_labels.tif"),
    )
    capsys.readouterr()
    assert main([*two, "--channel", "2", "--channel-axis", "0", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "channel 2 does not exist" in err[0] and "2 channels" in err[0]
    assert main([*two, "--nuclear-channel", "0"]) == 2
    assert "--nuclear-channel needs --channel" in capsys.readouterr().err


def test_segment_and_adapt_take_a_context_pack(tmp_path, image_dir, tiny_checkpoint, capsys) -> None:
    from napari_ctxseg.services.context_pack import save_context_pack

    img, lab = tifffile.imread(image_dir / "im1.tif"), tifffile.imread(image_dir / "lab1.tif")
    pack = save_context_pack(tmp_path / "ctx.npz", img, lab)
    common = [str(image_dir / "im0.tif"), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-q"]
    assert main(["segment", *common, "-o", str(tmp_path / "p"), "--context", str(pack)]) == 0
    files = ["--context-image", str(image_dir / "im1.tif"), "--context-labels", str(image_dir / "lab1.tif")]
    assert main(["segment", *common, "-o", str(tmp_path / "f"), *files]) == 0
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "p" / "im0_labels.tif"), tifffile.imread(tmp_path / "f" / "im0_labels.tif")
    )
    capsys.readouterr()
    assert main(["segment", *common, "-o", str(tmp_path / "x"), "--context", str(pack), *files]) == 2
    assert "not both" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"junk")
    assert main(["segment", *common, "-o", str(tmp_path / "y"), "--context", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable context pack" in err[0]
    out = tmp_path / "adapted.safetensors"
    argv = ["adapt", "--context", str(pack), "--seconds", "2", "-o", str(out)]
    assert main([*argv, "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "wrote" in captured.out and "adapt tiny.safetensors" in captured.err  # the bar
