"""Use cases shared by the widgets, the CLI and the tests (no Qt)."""
