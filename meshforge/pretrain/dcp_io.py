"""DCP save / load that say what they mean in one process and stay quiet about it.

``torch.distributed.checkpoint`` coordinates ranks through the default process group. In
one process (``meshforge train`` on one device, ``generate``, ``convert``) there is none, and
the intended call is ``no_dist=True``: no collectives, this process writes or reads every
entry. torch 2.13 still warns "torch.distributed is disabled, unavailable or uninitialized,
assuming the intent is to save in a single process" on that path, even when ``no_dist=True``
is passed explicitly (``state_dict_saver.save`` / ``state_dict_loader.load`` warn whenever
``no_dist`` ends up true), so :func:`single_process` ignores exactly that message, and only in a
process that has no process group -- a multi-rank job never takes this path.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

# torch's notice on the no-process-group path (save and load, with and without "disabled, ")
_SINGLE_PROCESS_NOTICE = (
    r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
    r"assuming the intent is to (save|load) in a single process"
)


def single_process(alone: bool = False) -> bool:
    """True without a process group (or when the caller reads or writes ``alone`` by design, as
    ``convert`` does); then torch's notice for that case is ignored from here on.

    The filter is process-wide (not a ``catch_warnings`` block) because an asynchronous save
    warns from its writer thread, after the call that started it has returned.
    """
    if not alone and dist.is_available() and dist.is_initialized():
        return False
    warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_NOTICE, category=UserWarning)
    return True


def save(state: dict[str, Any], path: str | Path, alone: bool = False) -> None:
    """``dcp.save`` of ``state`` into ``path``: collectively over the default group, or by this process alone."""
    if single_process(alone):
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    else:
        dcp.save(state, checkpoint_id=str(path))


def async_save(state: dict[str, Any], path: str | Path, process_group, async_stager) -> Future | AsyncSaveResponse:
    """``dcp.async_save`` over ``process_group`` (a job's writer group), or by this process alone; what it
    returns (an ``AsyncSaveResponse`` where the stager stages on a thread of its own)."""
    if single_process():
        return dcp.async_save(state, checkpoint_id=str(path), no_dist=True, async_stager=async_stager)
    return dcp.async_save(state, checkpoint_id=str(path), process_group=process_group, async_stager=async_stager)


def load(state: dict[str, Any], path: str | Path, alone: bool = False) -> None:
    """``dcp.load`` into ``state`` (in place): collectively over the default group, or by this process alone."""
    if single_process(alone):
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    else:
        dcp.load(state, checkpoint_id=str(path))
