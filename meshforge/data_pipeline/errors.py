"""Errors of the data pipeline."""

from meshforge.errors import MeshforgeError



class DataError(MeshforgeError, ValueError):
    """Data that cannot be used: missing or corrupt files, bad settings, mismatched tokenizer."""
