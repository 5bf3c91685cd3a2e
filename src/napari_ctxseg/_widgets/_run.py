"""The machinery every ctxseg dock shares: an error line, and Run/Cancel around a napari generator worker.

:class:`Dock` is a magicgui container with the viewer, a red error line and :meth:`Dock.show_error` (the
dock and a napari notification say the same). :class:`RunDock` adds a Run button that becomes Cancel, a
progress bar and a status line, and runs a generator function on a napari worker
(:func:`napari.qt.threading.create_worker`): what it yields moves the bar, what it returns reaches the
subclass's callback on the GUI thread, an error lands in the error line. Cancel asks the worker to stop at
its next yield (or, for work that must finish cleanly, sets a flag the work polls); nothing is added to
the viewer unless a run returns. A dock whose Qt widget is gone (the viewer closed) ignores late signals
and stops its worker.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

from magicgui.widgets import Container, Label, ProgressBar, PushButton, Widget
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt

from ..core.errors import CtxSegError

__all__ = ["Dock", "RunDock", "error_message", "wrap_qt"]

#: The colour of the error line of every dock.
ERROR_COLOR = "#e04040"


def error_message(exc: BaseException | str) -> str:
    """One line for the user: our own errors and plain strings as they are, anything else with its type.

    Parameters
    ----------
    exc
        An exception raised by the inputs or the run, or a message.

    Returns
    -------
    str
        ``str(exc)`` for a :class:`~napari_ctxseg.core.errors.CtxSegError` or a string, else
        ``"TypeName: message"``.
    """
    return str(exc) if isinstance(exc, CtxSegError | str) else f"{type(exc).__name__}: {exc}"


def wrap_qt(qwidget: Any) -> Container:
    """A magicgui container holding one Qt widget (for a custom-drawn widget such as the loss curve).

    Parameters
    ----------
    qwidget
        A ``QWidget``.

    Returns
    -------
    Container
        A label-less container whose native layout holds ``qwidget``.
    """
    box: Container[Widget] = Container(labels=False)
    box.margins = (0, 0, 0, 0)
    box.native.layout().addWidget(qwidget)
    return box


class Dock(Container):
    """A magicgui dock with the viewer, a red error line and an error display shared by every ctxseg dock.

    Parameters
    ----------
    viewer
        The napari viewer.
    notify
        Prefix of the napari notification of an error (``"<notify>: <message>"``).
    labels
        Whether the container shows its widgets' labels.
    """

    def __init__(self, viewer: Any, *, notify: str = "ctxseg", labels: bool = True) -> None:
        super().__init__(labels=labels)
        self._viewer = viewer
        self._notify = notify
        self._closed = False
        self.error = Label(value="")
        self.error.native.setStyleSheet(f"color: {ERROR_COLOR}")
        self.error.native.setWordWrap(True)
        self.error.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.native.destroyed.connect(self._on_destroyed)

    def show_error(self, exc: BaseException | str, note: str = "") -> str:
        """Show ``exc`` (plus ``note``) in the error line and as a napari notification; return the text."""
        text = error_message(exc) + note
        self.error.value = text
        show_error(f"{self._notify}: {text}")
        return text

    def clear_error(self) -> None:
        """Empty the error line (a new attempt starts)."""
        self.error.value = ""

    def _alive(self) -> bool:
        """Whether the dock can still be updated (its Qt widget exists)."""
        if self._closed:
            return False
        try:
            self.native.objectName()
        except RuntimeError:  # the Qt widget is gone (viewer closed)
            return False
        return True

    def _on_destroyed(self, *_: Any) -> None:
        self._closed = True


class RunDock(Dock):
    """A :class:`Dock` with Run/Cancel, a progress bar (0-1000) and a status line, running work on a worker.

    Subclasses implement :meth:`start` (check the inputs, then :meth:`run_worker`), list their input
    controls in :meth:`inputs` (disabled while running: a run uses a snapshot of them) and may override
    :meth:`request_stop` (the default quits the worker at its next yield) and :meth:`on_progress`.

    Parameters
    ----------
    viewer
        The napari viewer.
    run_text
        Text of the Run button when idle.
    cancel_text
        Text of the button while a run is being cancelled (``None``: unchanged).
    notify, labels
        As for :class:`Dock`.
    """

    def __init__(
        self,
        viewer: Any,
        *,
        run_text: str = "Run",
        cancel_text: str | None = None,
        notify: str = "ctxseg",
        labels: bool = True,
    ) -> None:
        super().__init__(viewer, notify=notify, labels=labels)
        self._worker: Any = None
        self._run_text, self._cancel_text = run_text, cancel_text
        self.run_button = PushButton(text=run_text)
        self.progress = ProgressBar(value=0, min=0, max=1000)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # a long status must not widen the dock
        self.run_button.changed.connect(self._on_run_clicked)

    # ---- for subclasses ----------------------------------------------------------------------------------

    def inputs(self) -> Iterable[Widget]:
        """The controls disabled while a run goes on."""
        return ()

    def start(self) -> None:
        """Check the inputs (showing any error in the dock, running nothing) and start a run."""
        raise NotImplementedError

    def request_stop(self) -> None:
        """Ask the running work to stop: by default the worker quits at its next yield (nothing returns)."""
        self._worker.quit()

    def on_progress(self, value: Any) -> None:
        """Show what the work yielded; by default a fraction in ``[0, 1]`` moves the bar."""
        self.progress.value = int(1000 * float(value))

    def on_error(self, exc: BaseException) -> None:
        """Show an error raised by the work (the status says the run failed)."""
        self.status.value = "failed"
        self.show_error(exc)

    def on_aborted(self) -> None:
        """The worker quit before returning (Cancel)."""
        self.status.value = "cancelled; no layer was added"
        self.progress.value = 0

    # ---- run / cancel ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a run is going on."""
        return self._worker is not None

    def cancel(self, status: str = "cancelling at the next step...") -> None:
        """Stop the run at its next step; the button stays disabled until the worker is done."""
        if not self.busy:
            return
        self.request_stop()
        self.run_button.enabled = False
        if self._cancel_text is not None:
            self.run_button.text = self._cancel_text
        else:
            self.status.value = status

    def run_worker(
        self,
        func: Callable[..., Generator[Any, None, Any]],
        args: tuple[Any, ...],
        on_done: Callable[[Any], None],
    ) -> None:
        """Run the generator function ``func(*args)`` on a napari worker; ``on_done`` gets its return value.

        The inputs are disabled and Run becomes Cancel until the worker finishes (returned, failed or
        cancelled). Callbacks reach a closed dock not at all.
        """
        from napari.qt.threading import create_worker

        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._if_alive(self.on_progress))
        worker.returned.connect(self._if_alive(on_done))
        worker.errored.connect(self._if_alive(self.on_error))
        worker.aborted.connect(self._if_alive(self.on_aborted))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.progress.value = 0
        self._set_busy(True)
        worker.start()

    def _if_alive(self, func: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any) -> None:
            if self._alive():
                func(*args)

        return call

    def _on_run_clicked(self, *_: Any) -> None:
        if self.busy:
            self.cancel()
        else:
            self.start()

    def _set_busy(self, busy: bool) -> None:
        for w in self.inputs():
            w.enabled = not busy
        self.run_button.text = "Cancel" if busy else self._run_text
        self.run_button.enabled = True

    def _on_finished(self) -> None:
        self._worker = None
        if self._alive():
            self._set_busy(False)

    def _on_destroyed(self, *_: Any) -> None:
        super()._on_destroyed()
        if self._worker is not None:
            self.request_stop()
