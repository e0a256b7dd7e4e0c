"""Checkpoint conversion between meshforge and other formats."""
