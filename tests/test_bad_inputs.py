"""The bad-input matrix of the ``ctxseg`` command line (issue 27): one row per hostile or careless input.

Each row gives the files to create, the arguments, the expected exit status, words the message must
contain, and the files that must come out byte for byte unchanged. Every error is one ``error:`` line,
never a traceback. The CLI runs in-process (:func:`napari_ctxseg.cli.main`); only Ctrl-C needs a process.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from napari_ctxseg.cli import main
from tests.conftest import blobs

IMG, LAB = blobs((64, 64), seed=0)
IMG2, LAB2 = blobs((64, 64), seed=1)


def _tiff_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, IMG)
    return buf.getvalue()


class _Evil:
    """Unpickling this would create a file named PWNED: a pickle must never be executed."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.target, "w"))


def _write(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir(exist_ok=True)
    elif callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif path.suffix == ".npy":
        np.save(path, content, allow_pickle=content.dtype == object)
    elif path.suffix == ".png":
        from skimage.io import imsave

        imsave(path, content, check_contrast=False)
    else:
        tifffile.imwrite(path, content)


SEG = ["--checkpoint", "{ckpt}", "--device", "cpu", "--diameter", "none"]
TRAIN = ["--steps", "1", "--batch-size", "1", "--crop-size", "64", "--device", "cpu", "--val-every", "0"]
PAIRS = {"i/a.tif": IMG, "l/a.tif": LAB.astype(np.uint16)}
OUT = "{d}/out"


@dataclass
class Case:
    """One row: files to create, argv (``{d}``: the scratch folder, ``{ckpt}``: the tiny checkpoint)."""

    id: str
    files: dict[str, Any]
    argv: list[str]
    code: int
    words: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    exists: tuple[str, ...] = ()  # files that must exist afterwards
    absent: tuple[str, ...] = ()  # files that must not exist afterwards
    before: list[list[str]] = field(default_factory=list)  # runs that must succeed first
    patch: dict[str, Any] = field(default_factory=dict)  # module attribute -> value


def seg(*inputs: str, extra: tuple[str, ...] = (), out: str = OUT) -> list[str]:
    return ["segment", *inputs, "-o", out, *SEG, *extra]


GOOD = {"good.tif": IMG}
CTX = {"ctx.tif": IMG2}
CASES = [
    # ---- 1: a user's files are never overwritten, label files are never inputs -------------------------
    Case(
        "o-is-input-folder-with-annotations",
        {"sd/nuclei.tif": IMG, "sd/nuclei_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/sd", out="{d}/sd"),
        2,
        ("did not write", "annotations", "nuclei_labels.tif"),
        unchanged=("sd/nuclei_labels.tif",),
        absent=("sd/nuclei_labels_labels.tif", "sd/nuclei_objects.csv"),
    ),
    Case(
        "o-is-input-folder-even-with-overwrite",
        {"sd/nuclei.tif": IMG, "sd/nuclei_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/sd", out="{d}/sd", extra=("--overwrite",)),
        2,
        ("annotations", "another output folder"),
        unchanged=("sd/nuclei_labels.tif",),
    ),
    Case(
        "o-is-input-folder-safe-layout",
        {"sd/nuclei.tif": IMG},
        seg("{d}/sd", out="{d}/sd"),
        0,
        exists=("sd/nuclei_labels.tif", "sd/nuclei_objects.csv"),
        unchanged=("sd/nuclei.tif",),
    ),
    Case(
        "label-files-in-a-folder-are-not-inputs",
        {"sd/nuclei.tif": IMG, "sd/nuclei_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/sd"),
        0,
        exists=("out/nuclei_labels.tif",),
        absent=("out/nuclei_labels_labels.tif",),
        unchanged=("sd/nuclei_labels.tif",),
    ),
    Case(
        "label-file-named-explicitly",
        {"sd/nuclei_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/sd/nuclei_labels.tif"),
        2,
        ("named like a labels file",),
    ),
    Case(
        "only-label-files",
        {"sd/a_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/sd"),
        2,
        ("no input images",),
    ),
    Case(
        "foreign-labels-file-in-output",
        {**GOOD, "out/good_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/good.tif"),
        2,
        ("did not write", "--overwrite"),
        unchanged=("out/good_labels.tif",),
    ),
    Case(
        "foreign-csv-in-output",
        {**GOOD, "out/good_objects.csv": "my,own,notes\n1,2,3\n"},
        seg("{d}/good.tif"),
        2,
        ("did not write", "good_objects.csv"),
        unchanged=("out/good_objects.csv",),
    ),
    Case(
        "foreign-file-replaced-with-overwrite",
        {**GOOD, "out/good_labels.tif": LAB.astype(np.uint16)},
        seg("{d}/good.tif", extra=("--overwrite",)),
        0,
        exists=("out/good_objects.csv",),
    ),
    Case("unsupported-suffix", {"notes.txt": "hello"}, seg("{d}/notes.txt"), 2, ("not an image file",)),
    Case("missing-glob", {}, seg("{d}/missing*.tif"), 2, ("no image found",)),
    # ---- 2: output names are unique within a batch -----------------------------------------------------
    Case(
        "dotted-names-do-not-collide",
        {"a/s.v1.tif": IMG, "a/s.v2.tif": IMG2},
        seg("{d}/a/s.v1.tif", "{d}/a/s.v2.tif"),
        0,
        exists=("out/s.v1_labels.tif", "out/s.v2_labels.tif"),
    ),
    Case(
        "same-name-in-two-folders",
        {"sub1/x.tif": IMG, "sub2/x.tif": IMG2},
        seg("{d}/sub1/x.tif", "{d}/sub2/x.tif"),
        2,
        ("would both write", "x_labels.tif"),
        absent=("out/x_labels.tif",),
    ),
    Case(
        "png-and-npy-of-one-name",
        {"img.png": IMG.astype(np.uint8), "img.npy": IMG},
        seg("{d}/img.png", "{d}/img.npy"),
        2,
        ("would both write",),
    ),
    Case(
        "names-differing-in-case",
        {"X.tif": IMG, "x.tif": IMG2},
        seg("{d}/X.tif", "{d}/x.tif"),
        2,
        ("would both write",),
    ),
    Case(
        "hidden-files-in-a-folder-are-skipped",
        {"h/x.tif": IMG, "h/.x.tif": b"macOS resource fork"},
        seg("{d}/h"),
        0,
        exists=("out/x_labels.tif",),
        absent=("out/.x_labels.tif",),
    ),
    Case(
        "ome-tiff-name",
        {"cells.ome.tif": IMG},
        seg("{d}/cells.ome.tif"),
        0,
        exists=("out/cells_labels.tif",),
    ),
    # ---- 3: finetune/train -o never replaces a file that is not a checkpoint ---------------------------
    Case(
        "finetune-o-is-a-training-image",
        PAIRS,
        [
            "finetune",
            "--images",
            "{d}/i",
            "--labels",
            "{d}/l",
            "-o",
            "{d}/i/a.tif",
            "--from",
            "{ckpt}",
            *TRAIN,
        ],
        2,
        ("not a napari-ctxseg checkpoint",),
        unchanged=("i/a.tif",),
    ),
    Case(
        "finetune-o-is-a-folder",
        {**PAIRS, "models": None},
        [
            "finetune",
            "--images",
            "{d}/i",
            "--labels",
            "{d}/l",
            "-o",
            "{d}/models",
            "--from",
            "{ckpt}",
            *TRAIN,
        ],
        2,
        ("is a folder",),
    ),
    Case(
        "train-o-is-a-label-file",
        PAIRS,
        ["train", "--images", "{d}/i", "--labels", "{d}/l", "-o", "{d}/l/a.tif", "--preset", "tiny", *TRAIN],
        2,
        ("not a napari-ctxseg checkpoint",),
        unchanged=("l/a.tif",),
    ),
    Case(
        "finetune-o-under-a-file",
        {**PAIRS, "afile": "x"},
        [
            "finetune",
            "--images",
            "{d}/i",
            "--labels",
            "{d}/l",
            "-o",
            "{d}/afile/m.safetensors",
            "--from",
            "{ckpt}",
        ]
        + TRAIN,
        2,
        ("existing file, not a folder",),
        unchanged=("afile",),
    ),
    Case(
        "finetune-crop-size-100000",
        PAIRS,
        ["finetune", "--images", "{d}/i", "--labels", "{d}/l", "-o", "{d}/m.safetensors", "--from", "{ckpt}"]
        + [*TRAIN, "--crop-size", "100000"],
        2,
        ("crop_size must be at most",),
        absent=("m.safetensors",),
    ),
    Case(
        "train-seed-2-70",
        PAIRS,
        [
            "train",
            "--images",
            "{d}/i",
            "--labels",
            "{d}/l",
            "-o",
            "{d}/m.safetensors",
            *TRAIN,
            "--seed",
            str(2**70),
        ],
        2,
        ("seed",),
    ),
    Case(
        "train-labels-folder-missing",
        {"i/a.tif": IMG},
        [
            "train",
            "--images",
            "{d}/i",
            "--labels",
            "{d}/nol",
            "-o",
            "{d}/m.safetensors",
            "--preset",
            "tiny",
            *TRAIN,
        ],
        2,
        ("not a folder",),
    ),
    Case(
        "train-names-an-image-without-labels",
        {**PAIRS, "i/b.tif": IMG2},
        [
            "train",
            "--images",
            "{d}/i",
            "--labels",
            "{d}/l",
            "-o",
            "{d}/m.safetensors",
            "--preset",
            "tiny",
            *TRAIN,
        ],
        0,
        ("warning", "no label file", "left out: b"),
        exists=("m.safetensors",),
    ),
    # ---- 4, 5: no hang; a batch goes on after a bad file -----------------------------------------------
    Case("workers-negative", GOOD, seg("{d}/good.tif", extra=("--workers", "-2")), 2, ("workers",)),
    Case(
        "batch-goes-on-after-a-bad-file",
        {"b/a.tif": IMG, "b/b.tif": np.full((64, 64), 5, np.uint8), "b/c.tif": IMG2},
        seg("{d}/b"),
        2,
        ("2 of 3 files done, 1 failed", "b.tif", "constant"),
        exists=("out/a_labels.tif", "out/c_labels.tif"),
        absent=("out/b_labels.tif",),
    ),
    Case(
        "batch-rerun-resumes-and-reports-the-same-failure",
        {"b/a.tif": IMG, "b/b.tif": np.full((64, 64), 5, np.uint8)},
        seg("{d}/b"),
        2,
        ("1 of 2 files done", "constant"),
        before=[["segment", "{d}/b/a.tif", "-o", OUT, *SEG]],
        unchanged=("out/a_labels.tif",),
    ),
    # ---- 6: one line instead of a traceback ------------------------------------------------------------
    Case(
        "non-image-named-tif", {"x.tif": b"hello, not a tiff"}, seg("{d}/x.tif"), 2, ("cannot read", "x.tif")
    ),
    Case(
        "truncated-tiff",
        {"x.tif": lambda p: p.write_bytes(_tiff_bytes()[:900])},
        seg("{d}/x.tif"),
        2,
        ("cannot read",),
    ),
    Case("1d-array", {"x.npy": np.arange(100.0)}, seg("{d}/x.npy"), 2, ("shape (100,)", "2 or more axes")),
    Case("0d-array", {"x.npy": np.array(3.0)}, seg("{d}/x.npy"), 2, ("2 or more axes",)),
    Case(
        "object-npy",
        {"x.npy": np.array([{"a": 1}, None], dtype=object)},
        seg("{d}/x.npy"),
        2,
        ("cannot read",),
    ),
    Case("seed-2-70", GOOD, seg("{d}/good.tif", extra=("--seed", str(2**70))), 2, ("seed must be from 0",)),
    Case("seed-negative", GOOD, seg("{d}/good.tif", extra=("--seed", "-1")), 2, ("seed must be from 0",)),
    Case(
        "scheduler-bad-address",
        GOOD,
        seg("{d}/good.tif", extra=("--scheduler", "tcp://127.0.0.1:9")),
        2,
        ("cannot reach the dask scheduler",),
        patch={"napari_ctxseg.services.batch.SCHEDULER_TIMEOUT_S": 1.0},
    ),
    Case(
        "eval-json-is-a-folder",
        {**PAIRS, "rep": None},
        ["eval", "--images", "{d}/i", "--labels", "{d}/l", "--json", "{d}/rep", *SEG],
        2,
        ("is a folder",),
    ),
    Case(
        "eval-json-is-an-image",
        PAIRS,
        ["eval", "--images", "{d}/i", "--labels", "{d}/l", "--json", "{d}/i/a.tif", *SEG],
        2,
        ("not a JSON report",),
        unchanged=("i/a.tif",),
    ),
    Case(
        "eval-limit-negative",
        PAIRS,
        ["eval", "--images", "{d}/i", "--labels", "{d}/l", "--limit", "-1", *SEG],
        2,
        ("limit",),
    ),
    Case(
        "eval-images-missing",
        {},
        ["eval", "--images", "{d}/none", "--labels", "{d}/none", *SEG],
        2,
        ("none",),
    ),
    # ---- 7: bounds on what drives size and time --------------------------------------------------------
    Case(
        "samples-ten-million",
        GOOD,
        seg("{d}/good.tif", extra=("--samples", str(10**7))),
        2,
        ("GiB of memory",),
    ),
    Case(
        "samples-zero", GOOD, seg("{d}/good.tif", extra=("--samples", "0")), 2, ("num_samples must be >= 1",)
    ),
    Case("steps-zero", GOOD, seg("{d}/good.tif", extra=("--steps", "0")), 2, ("steps must be >= 1",)),
    Case(
        "diameter-0.001",
        GOOD,
        [
            "segment",
            "{d}/good.tif",
            "-o",
            OUT,
            "--checkpoint",
            "{ckpt}",
            "--device",
            "cpu",
            "--diameter",
            "0.001",
        ],
        2,
        ("below 2 px",),
    ),
    Case("diameter-zero", GOOD, ["segment", "{d}/good.tif", "--diameter", "0"], 2, ("positive number",)),
    Case(
        "diameter-small-warns-slow",
        GOOD,
        [
            "segment",
            "{d}/good.tif",
            "-o",
            OUT,
            "--checkpoint",
            "{ckpt}",
            "--device",
            "cpu",
            "--diameter",
            "2.5",
        ],
        0,
        ("warning", "slow"),
        exists=("out/good_labels.tif",),
    ),
    Case(
        "tile-size-1",
        GOOD,
        seg("{d}/good.tif", extra=("--tile-size", "1")),
        2,
        ("tile size must be at least 64",),
    ),
    Case(
        "tile-size-0",
        GOOD,
        seg("{d}/good.tif", extra=("--tile-size", "0")),
        2,
        ("tile size must be at least 64",),
    ),
    Case("tile-size-negative", GOOD, seg("{d}/good.tif", extra=("--tile-size", "-100")), 2, ("tile size",)),
    # ---- 8: output problems are found before the work --------------------------------------------------
    Case(
        "o-is-an-existing-file",
        {**GOOD, "o.txt": "keep me"},
        seg("{d}/good.tif", out="{d}/o.txt"),
        2,
        ("existing file, not a folder",),
        unchanged=("o.txt",),
    ),
    Case(
        "o-under-a-file",
        {**GOOD, "afile": "keep me"},
        seg("{d}/good.tif", out="{d}/afile/out"),
        2,
        ("cannot write",),
        unchanged=("afile",),
    ),
    Case(
        "o-is-the-input-file",
        GOOD,
        seg("{d}/good.tif", out="{d}/good.tif"),
        2,
        ("one of the input files",),
        unchanged=("good.tif",),
    ),
    # ---- 9: silently wrong or misleading ---------------------------------------------------------------
    Case("complex-image", {"c.npy": IMG + 1j * IMG2}, seg("{d}/c.npy"), 2, ("complex",)),
    Case(
        "huge-finite-floats",
        {"h.npy": IMG.astype(np.float64) * 1e298},
        seg("{d}/h.npy"),
        0,
        exists=("out/h_labels.tif",),
    ),
    Case("nan-image", {"n.npy": np.where(LAB > 0, np.nan, IMG)}, seg("{d}/n.npy"), 2, ("NaN or infinite",)),
    Case(
        "two-channel-hw2",
        {"t.npy": np.stack([IMG, IMG2], -1)},
        seg("{d}/t.npy"),
        0,
        exists=("out/t_labels.tif",),
    ),
    Case(
        "context-labels-float",
        {**GOOD, **CTX, "cl.tif": LAB2.astype(np.float32) + 0.5},
        seg("{d}/good.tif", extra=("--context-image", "{d}/ctx.tif", "--context-labels", "{d}/cl.tif")),
        2,
        ("integer instance labels", "float32"),
    ),
    Case(
        "context-labels-nan",
        {**GOOD, **CTX, "cl.tif": np.where(LAB2 > 0, LAB2, np.nan).astype(np.float32)},
        seg("{d}/good.tif", extra=("--context-image", "{d}/ctx.tif", "--context-labels", "{d}/cl.tif")),
        2,
        ("NaN", "integer instance labels"),
    ),
    Case(
        "context-labels-without-image",
        {**GOOD, "cl.tif": LAB2.astype(np.uint16)},
        seg("{d}/good.tif", extra=("--context-labels", "{d}/cl.tif")),
        2,
        ("need --context-image",),
    ),
    Case(
        "context-image-without-labels",
        {**GOOD, **CTX},
        seg("{d}/good.tif", extra=("--context-image", "{d}/ctx.tif")),
        2,
        ("needs --context-labels",),
    ),
    Case(
        "context-labels-wrong-shape",
        {**GOOD, **CTX, "cl.tif": np.ones((10, 10), np.uint16)},
        seg("{d}/good.tif", extra=("--context-image", "{d}/ctx.tif", "--context-labels", "{d}/cl.tif")),
        2,
        ("must cover the context image",),
    ),
    Case(
        "context-labels-empty",
        {**GOOD, **CTX, "cl.tif": np.zeros((64, 64), np.uint16)},
        seg("{d}/good.tif", extra=("--context-image", "{d}/ctx.tif", "--context-labels", "{d}/cl.tif")),
        2,
        ("no annotated object",),
    ),
    Case(
        "flow-threshold-nan",
        GOOD,
        seg("{d}/good.tif", extra=("--flow-threshold", "nan")),
        2,
        ("flow_threshold",),
    ),
    Case(
        "flow-threshold-negative",
        GOOD,
        seg("{d}/good.tif", extra=("--flow-threshold", "-1")),
        2,
        ("flow_threshold",),
    ),
    Case("min-size-negative", GOOD, seg("{d}/good.tif", extra=("--min-size", "-10")), 2, ("min_size",)),
    Case(
        "min-contrast-nan", GOOD, seg("{d}/good.tif", extra=("--min-contrast", "nan")), 2, ("min_contrast",)
    ),
    Case(
        "resume-with-other-settings",
        GOOD,
        seg("{d}/good.tif", extra=("--samples", "2")),
        2,
        ("other settings", "num_samples 1 -> 2", "--overwrite"),
        before=[seg("{d}/good.tif")],
        unchanged=("out/good_labels.tif", "out/good_objects.csv"),
    ),
    Case(
        "resume-with-other-settings-and-overwrite",
        GOOD,
        seg("{d}/good.tif", extra=("--samples", "2", "--overwrite")),
        0,
        ("",),
        before=[seg("{d}/good.tif")],
    ),
    Case(
        "resume-from-another-input-of-the-same-name",
        {"sub1/x.tif": IMG, "sub2/x.tif": IMG2},
        seg("{d}/sub2/x.tif"),
        2,
        ("made from", "sub1"),
        before=[seg("{d}/sub1/x.tif")],
        unchanged=("out/x_labels.tif",),
    ),
    # ---- cases that already held: keep them ------------------------------------------------------------
    Case(
        "constant-image", {"flat.tif": np.full((32, 32), 5, np.uint8)}, seg("{d}/flat.tif"), 2, ("constant",)
    ),
    Case("too-small-image", {"s.tif": IMG[:4, :4]}, seg("{d}/s.tif"), 2, ("too small",)),
    Case(
        "checkpoint-random-bytes",
        {**GOOD, "bad.safetensors": np.random.default_rng(0).bytes(4096)},
        ["segment", "{d}/good.tif", "-o", OUT, "--checkpoint", "{d}/bad.safetensors"],
        2,
        ("safetensors",),
    ),
    Case(
        "checkpoint-pickle",
        {**GOOD, "p.safetensors": b"\x80\x04junk"},
        ["segment", "{d}/good.tif", "-o", OUT, "--checkpoint", "{d}/p.safetensors"],
        2,
        ("ctxseg convert",),
    ),
    Case(
        "checkpoint-missing",
        GOOD,
        ["segment", "{d}/good.tif", "-o", OUT, "--checkpoint", "{d}/none.safetensors"],
        2,
        ("checkpoint not found",),
    ),
    Case(
        "checkpoint-truncated",
        {
            **GOOD,
            "t.safetensors": lambda p: p.write_bytes(
                Path(os.environ["CTXSEG_TEST_CKPT"]).read_bytes()[:5000]
            ),
        },
        ["segment", "{d}/good.tif", "-o", OUT, "--checkpoint", "{d}/t.safetensors"],
        2,
        ("corrupt or truncated",),
    ),
    Case(
        "device-unknown", GOOD, ["segment", "{d}/good.tif", "-o", OUT, "--device", "quantum"], 2, ("quantum",)
    ),
    Case(
        "stitch-threshold-2",
        GOOD,
        ["segment", "{d}/good.tif", "--stitch-threshold", "2"],
        2,
        ("from 0 to 1",),
    ),
    Case(
        "convert-pickle-is-never-run",
        {"evil.pkl": lambda p: p.write_bytes(pickle.dumps(_Evil(str(p.parent / "PWNED"))))},
        ["convert", "{d}/evil.pkl", "-o", "{d}/c.safetensors", "--model", "ctxseg-p", "--trust"],
        2,
        (),
        absent=("PWNED", "c.safetensors"),
    ),
]


def test_the_matrix_has_more_than_40_distinct_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) > 40


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _fill(argv: list[str], d: Path, ckpt: Path) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{ckpt}", str(ckpt)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("CTXSEG_TEST_CKPT", str(tiny_checkpoint))
    for target, value in case.patch.items():
        monkeypatch.setattr(target, value)
    for name, content in case.files.items():
        _write(tmp_path / name, content)
    for argv in case.before:
        code, err = _run(_fill(argv, tmp_path, tiny_checkpoint), capsys)
        assert code == 0, err
    digests = {name: _digest(tmp_path / name) for name in case.unchanged}
    code, err = _run(_fill(case.argv, tmp_path, tiny_checkpoint), capsys)
    assert code == case.code, err
    assert "Traceback" not in err
    for word in case.words:
        assert word.lower() in err.lower(), err
    if code == 2:  # one error line, whatever progress came before it
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    for name, digest in digests.items():
        assert _digest(tmp_path / name) == digest, f"{name} was changed"
    for name in case.exists:
        assert (tmp_path / name).is_file(), f"{name} was not written"
    for name in case.absent:
        assert not (tmp_path / name).exists(), f"{name} was written"


def test_the_outputs_of_an_hw2_image_are_one_plane(tmp_path: Path, tiny_checkpoint: Path) -> None:
    np.save(tmp_path / "t.npy", np.stack([IMG, IMG2], -1))
    argv = seg(str(tmp_path / "t.npy"), out=str(tmp_path / "o"))
    assert main(_fill(argv, tmp_path, tiny_checkpoint)) == 0
    assert tifffile.imread(tmp_path / "o" / "t_labels.tif").shape == (64, 64)


def test_workers_1_names_the_file_that_failed(tmp_path: Path, tiny_checkpoint: Path, capsys: Any) -> None:
    pytest.importorskip("distributed")
    tifffile.imwrite(tmp_path / "a.tif", IMG)
    tifffile.imwrite(tmp_path / "flat.tif", np.full((64, 64), 5, np.uint8))
    argv = seg(str(tmp_path / "a.tif"), str(tmp_path / "flat.tif"), out=str(tmp_path / "o"))
    code, err = _run(_fill([*argv, "--workers", "1"], tmp_path, tiny_checkpoint), capsys)
    assert code == 2 and "flat.tif" in err and "constant" in err and "1 of 2 files done" in err, err
    assert (tmp_path / "o" / "a_labels.tif").is_file()


def test_ctrl_c_during_a_batch_prints_one_line_and_keeps_whole_outputs(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    # enough work that the batch is still running when the signal arrives, even if this process polls
    # late on a busy machine: the tiny model does over 150 images of 64 x 64 a second once warm (a whole
    # batch of 160 was once done before the signal came), and about 20 of these a second
    for i in range(64):
        tifffile.imwrite(tmp_path / f"im{i:02d}.tif", blobs((512, 512), n=40, seed=i)[0])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = tmp_path / "o"
    argv = [
        sys.executable,
        "-m",
        "napari_ctxseg.cli",
        "segment",
        str(tmp_path),
        "-o",
        str(out),
        *_fill(SEG, tmp_path, tiny_checkpoint),
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*_objects.csv")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "interrupted" in err, err[-3000:]
    for labels in out.glob("*_labels.tif"):
        assert tifffile.imread(labels).shape == (512, 512)
    assert not list(out.glob(".*.tmp"))
    # the re-run resumes: what was written counts as done
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "skipped" in done.stdout, done.stderr
