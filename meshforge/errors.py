"""The one base class of every error meshforge reports as a single line.

``meshforge`` (the CLI) catches :class:`MeshforgeError` and prints ``meshforge: error: <message>``
with no traceback; the message says what is wrong and what to do. Anything else that escapes
is a bug: it keeps its traceback, under a line naming the rank it happened on.

The subclasses live next to the code that raises them (``ConfigError`` in
:mod:`meshforge.config`, ``TokenizerError`` in :mod:`meshforge.tokenizers`, ...),
except the few raised or named by more than one room: ``CollectiveError`` (raised in ``pretrain``, told apart
by ``launch``), ``CheckpointError`` (raised by the checkpoint code of ``pretrain`` and by the DeepSpeed engine of
``parallel``), ``DataError`` (the input readers of
:mod:`meshforge.text_inputs`, shared by tokenizer training and the data pipeline) lives here.
This module imports nothing, so the CLI can name the base class without loading torch.
"""

from __future__ import annotations


class MeshforgeError(Exception):
    """An error of the input, the environment or the job, with a message that says what to do."""

    exit_status = 2
    """Exit status of ``meshforge`` when this error ends it (2: bad input; 1: the job failed)."""


class LaunchError(MeshforgeError, ValueError):
    """A launch request or launcher environment that cannot work (says what to change)."""


class UsageError(MeshforgeError, ValueError):
    """A command-line argument that cannot work."""


class OutputError(MeshforgeError):
    """The output directory cannot be written (read-only, no permission, disk full)."""


class CollectiveError(MeshforgeError, RuntimeError):
    """A collective failed or timed out; the message names the operation and the ranks involved (raised by
    :mod:`meshforge.pretrain.faults`; :mod:`meshforge.launch.setup` reports it without a grace period)."""

    exit_status = 1  # the job failed, not its input


class CheckpointError(MeshforgeError, ValueError):
    """A checkpoint that cannot be used, or an output dir that belongs to another run."""


class DataError(MeshforgeError, ValueError):
    """Data that cannot be used: missing or corrupt files, bad settings, mismatched tokenizer."""
