"""A small, dependency-free loss-curve plot (QPainter polylines): training loss and validation loss.

napari does not depend on matplotlib, so the fine-tune dock draws its own curve: the raw training loss
(faint), its running mean (solid) and the validation loss (dots joined by a line), on a log scale when every
value is positive.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LossCurve"]

_TRAIN = QColor(90, 160, 255)
_VAL = QColor(255, 150, 60)


class LossCurve(QWidget):
    """Plot of ``(step, loss)`` points; call :meth:`add` after every step and :meth:`clear` between runs.

    Parameters
    ----------
    smoothing
        Weight of the previous value in the running mean of the training loss (0: none).
    parent
        Qt parent.
    """

    def __init__(self, smoothing: float = 0.9, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.smoothing = float(smoothing)
        self.train: list[tuple[int, float]] = []
        self.smooth: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Training loss (blue: running mean, faint: per step) and validation loss (orange)")

    def sizeHint(self) -> QSize:
        return QSize(300, 150)

    def clear(self) -> None:
        """Forget every point."""
        self.train.clear()
        self.smooth.clear()
        self.val.clear()
        self.update()

    def add(self, step: int, loss: float, val_loss: float | None = None) -> None:
        """Append a training loss (and a validation loss, if computed at this step).

        Non-finite values are skipped.
        """
        if math.isfinite(loss):
            prev = self.smooth[-1][1] if self.smooth else loss
            self.train.append((step, loss))
            self.smooth.append((step, self.smoothing * prev + (1 - self.smoothing) * loss))
        if val_loss is not None and math.isfinite(val_loss):
            self.val.append((step, val_loss))
        self.update()  # Qt coalesces repaints: cheap to call after every step

    # ---- drawing ------------------------------------------------------------------------------------
    def _scales(self, plot: QRectF) -> tuple:
        values = [v for _, v in self.train + self.val]
        steps = [s for s, _ in self.train + self.val]
        log = min(values) > 0
        f = math.log10 if log else float
        lo, hi = f(min(values)), f(max(values))
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)

        def to_xy(step: int, value: float) -> QPointF:
            x = plot.left() + (step - s0) / (s1 - s0) * plot.width()
            y = plot.bottom() - (f(value) - lo) / (hi - lo) * plot.height()
            return QPointF(x, y)

        return to_xy, log, (s0, s1), (min(values), max(values))

    def _polyline(
        self, painter: QPainter, points: list[tuple[int, float]], to_xy, color: QColor, width: float
    ) -> None:
        stride = max(1, len(points) // max(1, 2 * self.width()))  # at most ~2 points per pixel
        pts = points[::stride] + (points[-1:] if stride > 1 else [])
        poly = QPolygonF([to_xy(s, v) for s, v in pts])
        painter.setPen(QPen(color, width))
        painter.drawPolyline(poly)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        fg = self.palette().windowText().color()
        rect = QRectF(self.rect()).adjusted(4, 4, -4, -4)
        plot = rect.adjusted(44, 14, -4, -16)
        painter.setPen(QPen(fg, 1))
        painter.drawRect(plot)
        if not self.train and not self.val:
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "loss curve (appears while training)")
            painter.end()
            return
        to_xy, log, (s0, s1), (vmin, vmax) = self._scales(plot)
        if len(self.train) > 1:
            faint = QColor(_TRAIN)
            faint.setAlpha(70)
            self._polyline(painter, self.train, to_xy, faint, 1.0)
            self._polyline(painter, self.smooth, to_xy, _TRAIN, 2.0)
        if self.val:
            if len(self.val) > 1:
                self._polyline(painter, self.val, to_xy, _VAL, 1.5)
            painter.setBrush(_VAL)
            for s, v in self.val[-200:]:
                painter.drawEllipse(to_xy(s, v), 2.5, 2.5)
        painter.setPen(QPen(fg, 1))
        left = QRectF(rect.left(), plot.top() - 7, 42, 14)
        painter.drawText(left, Qt.AlignmentFlag.AlignRight, f"{vmax:.3g}")
        painter.drawText(left.translated(0, plot.height()), Qt.AlignmentFlag.AlignRight, f"{vmin:.3g}")
        below = QRectF(plot.left(), plot.bottom() + 1, plot.width(), 14)
        painter.drawText(below, Qt.AlignmentFlag.AlignLeft, f"step {s0}")
        painter.drawText(below, Qt.AlignmentFlag.AlignRight, f"{s1}")
        top = QRectF(plot.left() + 4, rect.top() - 2, plot.width() - 8, 14)
        last = f"train {self.smooth[-1][1]:.4g}" if self.smooth else ""
        if self.val:
            last += f"   val {self.val[-1][1]:.4g} (best {min(v for _, v in self.val):.4g})"
        painter.drawText(top, Qt.AlignmentFlag.AlignLeft, last + ("   log scale" if log else ""))
        painter.end()
