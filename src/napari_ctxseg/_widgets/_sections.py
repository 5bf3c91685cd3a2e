"""A collapsible section of a dock: a header button that shows or hides a magicgui container of controls.

Settings that most runs leave alone fold away, so a dock stays narrow and short; the controls stay
attributes of their dock (folding only hides them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from magicgui.widgets import Container, PushButton, Widget

__all__ = ["Section"]

_OPEN, _CLOSED = "\u25be", "\u25b8"  # small down / right triangles


class Section(Container):
    """A header button and a body of controls, folded (hidden) until the header is clicked.

    Parameters
    ----------
    title
        The header's text.
    widgets
        The controls of the body (a labelled container).
    expanded
        Whether the body shows at first.
    tooltip
        The header's tooltip.
    """

    def __init__(
        self, title: str, widgets: Sequence[Widget], *, expanded: bool = False, tooltip: str = ""
    ) -> None:
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self._title = title
        self.header = PushButton(text=title, tooltip=tooltip)
        self.header.native.setFlat(True)
        self.header.native.setStyleSheet("text-align: left; font-weight: bold; padding: 2px 4px")
        self.body: Container[Widget] = Container(widgets=list(widgets))
        self.body.margins = (8, 0, 0, 4)
        self.extend([self.header, self.body])
        self.header.changed.connect(self._toggle)
        self.expanded = expanded

    @property
    def expanded(self) -> bool:
        """Whether the body shows."""
        return not self.body.native.isHidden()

    @expanded.setter
    def expanded(self, value: bool) -> None:
        self.body.visible = bool(value)
        self.header.text = f"{_OPEN if value else _CLOSED} {self._title}"

    def _toggle(self, *_: Any) -> None:
        self.expanded = not self.expanded
