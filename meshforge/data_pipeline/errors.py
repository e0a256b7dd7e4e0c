"""Errors of the data pipeline (``DataError`` is defined in :mod:`meshforge.errors`, since the
input readers of :mod:`meshforge.text_inputs` raise it too)."""

from meshforge.errors import DataError

__all__ = ["DataError"]
