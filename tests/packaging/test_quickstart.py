"""The README's two Quick-start commands, verbatim, in a fresh venv made from a clean copy of the repository.

This is what a new user runs: whatever pip gives today (the newest pytest, npe2, pydantic, napari), in a
virtual environment that sees nothing of the interpreter running these tests. The second command runs the
whole test suite again inside that venv; there this test skips itself (``CTXSEG_QUICKSTART_INNER``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INNER = "CTXSEG_QUICKSTART_INNER"


def readme_commands() -> list[str]:
    """The Quick-start commands of the README (the ```bash blocks of that section), in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.+?)\n\s*```", section, flags=re.S)]


def clean_copy(dest: Path) -> Path:
    """Copy the files git tracks, and untracked ones it does not ignore (no build outputs, no venvs)."""
    r = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, r.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_readme_has_two_quick_start_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert "ctxseg segment" in commands[0] and "pytest" in commands[1]


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(INNER)), reason="inside the quick-start check already")
@pytest.mark.skipif(sys.platform != "linux", reason="the Quick start is written for Debian/Ubuntu")
def test_readme_quick_start_commands_pass_in_a_fresh_venv(tmp_path: Path) -> None:
    repo = clean_copy(tmp_path / "repo")
    shared = ROOT.parent / "shared"
    if shared.is_dir():  # the team's data beside the clone, as CI has it (tests skip without it)
        (tmp_path / "shared").symlink_to(shared, target_is_directory=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # no system site packages: only what the commands install
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(env_dir),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        **{INNER: "1"},
    )
    logs, outs = [], []
    for i, command in enumerate(readme_commands(), 1):
        r = subprocess.run(
            ["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=2400
        )
        logs.append(r.stdout[-4000:] + r.stderr[-4000:])
        outs.append(r.stdout)
        failures = r.stdout.split("= FAILURES =")[-1][:6000] if "= FAILURES =" in r.stdout else ""
        assert r.returncode == 0, f"Quick-start command {i} failed:\n{command}\n{failures}\n{logs[-1]}"
    labels = repo / "out" / "nuclei_labels.tif"
    assert labels.is_file() and (repo / "out" / "nuclei_objects.csv").is_file()
    # the inner test run ended with pytest's summary line and no failure
    summary = outs[1].strip().splitlines()[-1]  # pytest's last line (pip's warnings go to stderr)
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    r = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        env=env,
    )
    versions = {
        line.split("==")[0].lower(): line.split("==")[-1] for line in r.stdout.splitlines() if "==" in line
    }
    print({k: versions.get(k) for k in ("pytest", "npe2", "pydantic", "napari", "torch")}, summary)
