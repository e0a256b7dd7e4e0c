"""Errors of the data pipeline."""


class DataError(ValueError):
    """Data that cannot be used: missing or corrupt files, bad settings, mismatched tokenizer."""
