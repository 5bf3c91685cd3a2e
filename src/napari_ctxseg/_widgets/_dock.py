"""Open napari's built-in features table (napari >= 0.6) next to our widgets; we write no table of our own."""

from __future__ import annotations

from typing import Any

__all__ = ["FEATURES_TABLE", "hide_row_numbers", "show_features_table", "tidy"]

#: The dock widget name napari gives the builtin table ("<widget> (<plugin>)").
FEATURES_TABLE = "Features table widget (napari)"


def show_features_table(viewer: Any) -> None:
    """Open the features table of the selected layer; the first time, dock it below the canvas.

    The table has many columns, so the wide bottom area reads better than the narrow right one; a table
    the user already moved stays where it is.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QMainWindow

    new = FEATURES_TABLE not in viewer.window.dock_widgets
    dock, table = viewer.window.add_plugin_dock_widget("napari", "Features table widget")
    view = getattr(table, "table", None)
    if new and view is not None:
        # napari shows the row number as "Index"; our layers carry the label as "index": show one of them
        view.model().layoutChanged.connect(lambda *_: hide_row_numbers(view))
    if view is not None:
        hide_row_numbers(view)
    main = dock.parentWidget()
    if new and isinstance(main, QMainWindow):
        main.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)
        main.resizeDocks([dock], [260], Qt.Orientation.Vertical)
        dock.show()


def hide_row_numbers(view: Any) -> None:
    """Hide the table's row-number column ("Index") when the features have their own ``index`` (the label)."""
    from qtpy.QtCore import Qt

    try:
        model = view.model()
        names = [
            str(model.headerData(c, Qt.Orientation.Horizontal, Qt.ItemDataRole.DisplayRole))
            for c in range(model.columnCount())
        ]
        for c, name in enumerate(names):
            view.setColumnHidden(c, name == "Index" and "index" in names)
    except RuntimeError:  # the table was closed
        pass


def tidy(*containers: Any, chars: int = 14) -> None:
    """Let drop-downs shrink, and give the row labels of ``containers`` one width.

    Drop-downs may shrink below their longest choice (long layer names would widen the dock and squeeze
    the row labels); the widths are set once napari's style applies.
    """
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QComboBox

    for c in containers:
        for combo in c.native.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(chars)
    QTimer.singleShot(0, lambda: _align_labels(containers))


def _align_labels(containers: tuple[Any, ...]) -> None:
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QLabel

    labels = []
    try:
        for c in containers:
            for w in c:
                row = w.native.parentWidget()  # magicgui puts a labelled widget in a row with its label
                if row is not None and row is not c.native:
                    found = row.findChildren(QLabel, options=Qt.FindChildOption.FindDirectChildrenOnly)
                    labels += [label for label in found if label is not w.native]
        for label in labels:
            label.ensurePolished()  # measure with the font of napari's stylesheet
        width = max((label.sizeHint().width() for label in labels), default=0)
        for label in labels:
            label.setMinimumWidth(width)
    except RuntimeError:  # closed before the timer fired
        pass
