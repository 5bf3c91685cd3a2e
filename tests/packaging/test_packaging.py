"""Packaging: the manifest and data ship in the wheel, the plugin is discovered, layering holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def test_import_is_light_and_lazy_api_resolves() -> None:
    code = (
        "import sys, napari_ctxseg as n; "
        "heavy=[m for m in ('torch','qtpy','napari','PyQt5') if m in sys.modules];"
        "print(heavy); assert not heavy, heavy; assert callable(n.segment) and 'torch' in sys.modules"
    )
    r = _run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stdout + r.stderr


def test_manifest_is_valid_and_found_by_the_editable_install() -> None:
    from importlib import resources

    path = resources.files("napari_ctxseg") / "napari.yaml"
    assert path.is_file() and "napari-ctxseg.segment_widget" in path.read_text()
    r = _run(sys.executable, "-m", "npe2", "validate", "napari-ctxseg")
    assert r.returncode == 0 and "valid" in r.stdout, r.stdout + r.stderr


def _console_script(name: str, package: str) -> str:
    """Path of a test tool's console script beside this interpreter (skip the test without it)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"{package} not installed")
    return str(path)


def test_layering_contracts_hold() -> None:
    r = _run(_console_script("lint-imports", "import-linter"), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("check", [("check",), ("format", "--check")], ids=["lint", "format"])
def test_code_is_ruff_clean(check: tuple[str, ...]) -> None:
    paths = ("src", "tests", "benchmarks", "experiments", "scripts")
    r = _run(_console_script("ruff", "ruff"), *check, *paths, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_package_type_checks() -> None:
    # the files and settings are [tool.mypy] in pyproject.toml
    r = _run(_console_script("mypy", "mypy"), "--no-error-summary", cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [c.strip() for c in re.findall(r"```bash\n(.+?)\n\s*```", readme, flags=re.S)]
    test_cmd = next(c for c in commands if "pytest" in c and "&&" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci.splitlines()


@pytest.mark.slow
def test_wheel_contains_manifest_model_and_samples_and_npe2_lists_it(tmp_path) -> None:
    r = _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel = next(tmp_path.glob("napari_ctxseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "napari_ctxseg/napari.yaml",
        "napari_ctxseg/sample_data/nuclei.tif",
        "napari_ctxseg/models/default.safetensors",
    ):
        assert needed in names, f"{needed} missing from {wheel.name}"
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "Classifier: Framework :: napari" in meta
    assert "napari-ctxseg = napari_ctxseg:napari.yaml" in entry
    # the wheel alone, in a folder put first on the path of this interpreter (the system Python or a venv,
    # whichever runs the tests): its napari, npe2 and torch serve, the source tree does not
    target = tmp_path / "site"
    r = _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel))
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = _run(sys.executable, "-m", "npe2", "list", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "napari-ctxseg" in r.stdout, r.stdout + r.stderr
    r = _run(
        sys.executable,
        "-c",
        "import napari_ctxseg, pathlib; print(pathlib.Path(napari_ctxseg.__file__).parent)",
        cwd=tmp_path,
        env=env,
    )
    assert str(target) in r.stdout, r.stdout + r.stderr  # the wheel, not the source tree, was imported


def test_own_deprecations_are_errors_and_third_party_ones_are_not() -> None:
    # pyproject's filterwarnings: a deprecation attributed to our code fails the test ...
    with pytest.raises(DeprecationWarning):
        warnings.warn("ours", DeprecationWarning, stacklevel=1)
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("ours", DeprecationWarning, "x.py", 1, module="napari_ctxseg.core.x")
    # ... one that a dependency raises inside itself is reported, not raised
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("theirs", DeprecationWarning, "x.py", 1, module="somelib.x")
    assert [str(w.message) for w in caught] == ["theirs"]
    # every other kind of warning stays an error, wherever it comes from
    with pytest.raises(UserWarning):
        warnings.warn_explicit("theirs", UserWarning, "x.py", 1, module="tifffile.tifffile")
