"""Access to the shared parity fixtures (``../shared/parity``), skipping cleanly where absent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def parity_path(*parts: str) -> Path:
    """Path inside the parity folder; skips the calling test if the folder is absent."""
    if not PARITY.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY}")
    return PARITY.joinpath(*parts)


def load_npz(*parts: str) -> dict[str, np.ndarray]:
    with np.load(parity_path(*parts)) as f:
        return {k: f[k] for k in f.files}


def load_json(*parts: str) -> dict:
    return json.loads(parity_path(*parts).read_text())


def nhwc_to_nchw(a: np.ndarray) -> np.ndarray:
    """Fixtures are channels-last; the port is NCHW."""
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))
