"""Fixtures for the dock widget tests: a tiny checkpoint, a viewer with an image, the Segment widget.

napari's pytest plugin (``make_napari_viewer``) is registered by napari's ``pytest11`` entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # before any Qt binding

HERE = Path(__file__).resolve().parent

#: Unavoidable third-party warnings, ignored for the widget tests only (pytest turns warnings into errors).
WARNING_FILTERS = (
    # napari 0.9 with PyQt5, when the first viewer is created
    "ignore:System theme detection requires a Qt6 backend:UserWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            for f in WARNING_FILTERS:
                item.add_marker(pytest.mark.filterwarnings(f))


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine a run is ~10x faster than with the default pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CtxSegP checkpoint (fast; finds arbitrary objects)."""
    from napari_ctxseg.core.io.checkpoint import save_checkpoint
    from napari_ctxseg.core.nn.models import build_model
    from napari_ctxseg.services.models import PRESETS

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model(PRESETS["tiny"]).eval(), sigma_data=1.0)
    return path


def nuclei_crop(size: int = 128) -> np.ndarray:
    """A ``size`` x ``size`` crop of the bundled DSB 2018 nuclei sample (uint8)."""
    from napari_ctxseg._sample_data import read_sample

    return np.ascontiguousarray(read_sample("nuclei")[:size, :size])


@pytest.fixture(autouse=True)
def _no_leftover_workers() -> Iterator[None]:
    """Every test leaves no worker thread running (they would outlive the viewer)."""
    yield
    from superqt.utils._qthreading import WorkerBase

    WorkerBase.await_workers(msecs=30_000)


@pytest.fixture(autouse=True)
def _clean_recent() -> Iterator[None]:
    from napari_ctxseg.services.recent import clear_recent_checkpoints

    yield
    clear_recent_checkpoints()


@pytest.fixture
def segment_widget(make_napari_viewer: Callable[..., Any], tiny_checkpoint: Path) -> Callable[..., Any]:
    """Factory: ``(viewer, widget, image_layer)`` with the Segment widget opened through the manifest."""

    def make(data: np.ndarray | None = None, *, show: bool = False, **layer_kwargs: Any) -> tuple[Any, ...]:
        viewer = make_napari_viewer(show=show)
        layer = viewer.add_image(nuclei_crop() if data is None else data, name="cells", **layer_kwargs)
        _, widget = viewer.window.add_plugin_dock_widget("napari-ctxseg", "Segment")
        widget.browse.value = tiny_checkpoint
        widget.image.value = layer
        # with this random checkpoint, 3 Euler steps give ~100 arbitrary objects on a 128 x 128 crop
        widget.steps.value, widget.solver.value = 3, "euler"
        return viewer, widget, layer

    return make


def run_and_wait(qtbot: Any, widget: Any, timeout: int = 60_000) -> None:
    """Click Run and wait until the worker is done."""
    widget.run_button.native.click()
    assert widget._worker is not None or widget.error.value, "Run started nothing"
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)
