"""Fine-tune dock widget: train on the viewer's (image, labels[, region]) layers, with a live loss curve.

Thin: it reads layers into :class:`~napari_ctxseg.services.finetune_data.TrainingPair` values
(:mod:`._finetune_form`), checks them at once (bad input runs nothing), and runs
:func:`~napari_ctxseg.services.finetune.run_finetune` on a napari generator worker (:class:`~._run.RunDock`).
Cancel asks the service to stop between steps; the service writes the best weights so far. A written
checkpoint is registered with :mod:`napari_ctxseg.services.recent`, where the Segment widget finds it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import CtxSegError, InputError
from ..services.devices import resolve_device
from ..services.finetune import (
    FinetuneResult,
    check_base,
    check_pairs,
    default_output_path,
    finetune_request_from_arrays,
    run_finetune,
)
from ..services.recent import add_recent_checkpoint
from ._finetune_form import FinetuneForm
from ._loss_curve import LossCurve
from ._run import wrap_qt

if TYPE_CHECKING:
    import napari

    from ..core.train.trainer import TrainProgress

__all__ = ["FinetuneWidget"]


def _fmt_time(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class FinetuneWidget(FinetuneForm):
    """Dock widget: fine-tune a ctxseg model on annotations in the viewer.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(napari_viewer)
        self.viewer = napari_viewer
        self.result: FinetuneResult | None = None
        self._stop = threading.Event()
        self._output_path, self._t_start, self._budget_s = Path(), 0.0, 0.0
        self.curve = LossCurve()
        self.append(wrap_qt(self.curve))
        self._events = (self.viewer.layers.events.inserted, self.viewer.layers.events.removed)
        for event in self._events:
            event.connect(self._refresh_layers)

    @property
    def worker(self) -> Any:
        """The running napari worker, or ``None``."""
        return self._worker

    def request_stop(self) -> None:
        """Stop after the current step: the service saves the best weights so far."""
        self._stop.set()

    def _on_destroyed(self, *_: Any) -> None:
        super()._on_destroyed()  # a running fine-tune stops at its next step and saves the best weights
        for event in self._events:
            event.disconnect(self._refresh_layers)

    # ---- running -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the inputs (showing any error, running nothing) and start training on a worker."""
        self.clear_error()
        if self._output_auto:
            self.output.value = str(default_output_path())
        try:
            settings = self.settings()
            pairs = self.pairs()
            check_pairs(pairs)
            base = self.base_checkpoint()
            check_base(base, settings.crop_size)
            resolve_device(settings.device)
            output = Path(self.output.value).expanduser()
            if output.suffix != ".safetensors":
                raise InputError(f"the output must be a .safetensors file, got {output.name!r}")
        except CtxSegError as exc:
            self.show_error(exc)
            return

        def work() -> Generator[TrainProgress, None, FinetuneResult]:
            req = finetune_request_from_arrays(
                pairs,
                base=base,
                output=output,
                settings=settings,
                provenance={"source": "napari fine-tune widget"},
            )
            return (
                yield from run_finetune(
                    req,
                    time_budget_s=settings.time_budget_min * 60 or None,
                    should_stop=self._stop.is_set,
                    threads=settings.threads,
                )
            )

        self._stop.clear()
        self._output_path, self._t_start = output, time.time()
        self._budget_s = settings.time_budget_min * 60
        self.result = None
        self.curve.clear()
        self.status.value = "preparing data and model..."
        self.run_worker(work, (), self._on_done)

    def on_progress(self, p: TrainProgress) -> None:
        """Show a training step: the bar, the step's numbers and the loss curve."""
        frac = p.step / p.total
        if self._budget_s:
            frac = max(frac, min(1.0, p.elapsed_s / self._budget_s))
        self.progress.value = int(1000 * frac)
        val = f" | val {p.val_loss:.4f}" if p.val_loss is not None else ""
        self.status.value = (
            f"step {p.step}/{p.total} | loss {p.loss:.4f}{val} | {p.samples_per_s:.1f} "
            f"samples/s | ETA {_fmt_time(p.eta_s)}"
        )
        self.curve.add(p.step, p.loss, p.val_loss)

    def _on_done(self, result: FinetuneResult) -> None:
        from napari.utils.notifications import show_info

        self.result = result
        if result.path is None:
            self.status.value = "cancelled before the first step finished: nothing was written"
            return
        add_recent_checkpoint(result.path)
        if self.base.native.findText(str(result.path)) < 0:
            self.base.set_choice(str(result.path), str(result.path))
        how = {"done": "finished", "time budget": "time budget reached", "cancelled": "cancelled"}
        msg = (
            f"{how[result.stopped]} after {result.steps_done} steps; saved {result.path} (now offered in "
            f"the Segment widget)"
        )
        self.status.value = msg
        self.progress.value = 1000
        show_info(f"ctxseg fine-tune {msg}")

    def on_error(self, exc: BaseException) -> None:
        """Show an error of the run, and whether the best weights so far were saved."""
        out = self._output_path
        saved = out.is_file() and out.stat().st_mtime >= self._t_start - 1
        self.show_error(exc, note=f" (the best weights so far were saved to {out})" if saved else "")

    def show_error(self, exc: BaseException | str, note: str = "") -> str:
        """Show the error in the dock and as a notification; the status says whether anything trained."""
        text = super().show_error(exc, note)
        self.status.value = "error (nothing was trained)" if not self.curve.train else "stopped by an error"
        return text
