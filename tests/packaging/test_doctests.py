"""The docstring examples of the package run as doctests in the plain test command (``python -m pytest``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "napari_ctxseg"
# Every example runs: one that needs a file it cannot make is a plain code block (``::``), not a skip
SKIPPED_FOR_NOW: set[str] = set()


def _modules_with_examples() -> set[str]:
    return {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if re.search(r"^\s*>>> ", p.read_text(), re.M)
    }


def test_pytest_config_collects_the_package_doctests(pytestconfig: pytest.Config) -> None:
    assert "src/napari_ctxseg" in pytestconfig.getini("testpaths")
    assert "--doctest-modules" in pytestconfig.getini("addopts")


@pytest.mark.slow
def test_every_module_with_an_example_has_its_doctests_collected() -> None:
    # the plain command with the tests folder left out: what it collects from the package's testpath
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--ignore=tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    collected = {
        line.split("::")[0].removeprefix("src/napari_ctxseg/")
        for line in r.stdout.splitlines()
        if line.startswith("src/napari_ctxseg/") and "::" in line
    }
    with_examples = _modules_with_examples()
    assert len(with_examples) > 10
    assert with_examples <= collected, sorted(with_examples - collected)


def test_examples_run_rather_than_skip() -> None:
    skipping = {m for m in _modules_with_examples() if "doctest: +SKIP" in (PACKAGE / m).read_text()}
    assert skipping <= SKIPPED_FOR_NOW, sorted(skipping - SKIPPED_FOR_NOW)
