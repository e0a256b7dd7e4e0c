"""SLURM: who am I in an ``srun`` step, and the compact syntax SLURM writes node lists in.

Inside ``srun`` every task has SLURM_PROCID (global rank), SLURM_LOCALID (rank on its node)
and the step's task count and node list. The batch script itself carries SLURM_PROCID=0 and
SLURM_NTASKS too, but no SLURM_STEP_ID: only a process that srun started is a rank, so a
``python -m meshforge train`` run straight from the batch script is a single process.

The rendezvous host is the first node of the step; the port is derived from the job and
step ids, so every task computes the same one without talking to the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import LaunchError

PORT_BASE = 20000
"""Rendezvous ports are PORT_BASE + 0..9999: below Linux's ephemeral range (32768+)."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Zero padding is kept (``[08-10]`` -> 08 09 10), several bracket groups in one name
    multiply out (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2), and commas inside brackets do
    not split hosts. The same as ``scontrol show hostnames``, without needing scontrol.
    """
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise LaunchError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur).strip())
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end() :]
    out = []
    for value in _expand_range_list(m.group(1), item):
        out.extend(prefix + value + rest for rest in _expand_one(suffix))
    return out


def _expand_range_list(body: str, item: str) -> list[str]:
    values = []
    for part in body.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            values.append(part)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", part)
        if m is None:
            raise LaunchError(f"bad range {part!r} in node list entry {item!r}")
        lo, hi, stride = m.group(1), m.group(2), int(m.group(3) or 1)
        if int(hi) < int(lo) or stride < 1:
            raise LaunchError(f"bad range {part!r} in node list entry {item!r}")
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1, stride))
    return values


def expand_tasks_per_node(spec: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1] (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"bad tasks-per-node spec {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def rendezvous_port(job_id: int, step_id: int = 0) -> int:
    """The same port on every task of a step: 20000 + 10 * (job % 1000) + step % 10."""
    return PORT_BASE + 10 * (job_id % 1000) + step_id % 10


def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs this node gave the job: SLURM_GPUS_ON_NODE, else the length of CUDA_VISIBLE_DEVICES."""
    value = env.get("SLURM_GPUS_ON_NODE", "")
    if value.strip().isdigit():
        return int(value)
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return len([d for d in visible.split(",") if d.strip()])
    return 0


def in_srun_step(env: Mapping[str, str]) -> bool:
    """True in a task that ``srun`` started (not in the batch script, not on a login node)."""
    has_step = bool(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")).strip())
    return has_step and bool(env.get("SLURM_PROCID", "").strip()) and bool(env.get("SLURM_JOB_ID", "").strip())


@dataclass(frozen=True)
class SlurmTask:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    hosts: tuple[str, ...]
    master_addr: str
    master_port: int
    gpus_on_node: int


def read_slurm(env: Mapping[str, str]) -> SlurmTask:
    """This srun task's place in the step, from the environment srun gives it."""

    def num(*names: str, default: int | None = None) -> int:
        for name in names:
            value = env.get(name, "").strip()
            if value:
                try:
                    return int(value)
                except ValueError:
                    raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None
        if default is None:
            raise LaunchError(f"SLURM step without {' or '.join(names)} in its environment")
        return default

    rank = num("SLURM_PROCID")
    world = num("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local = num("SLURM_LOCALID", default=0)
    node = num("SLURM_NODEID", default=0)
    job = num("SLURM_JOB_ID", "SLURM_JOBID")
    step = num("SLURM_STEP_ID", "SLURM_STEPID", default=0)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = tuple(expand_nodelist(nodelist)) if nodelist else ()
    if not hosts:
        raise LaunchError("SLURM step without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST in its environment")
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else []
    local_world = per_node[node] if node < len(per_node) else max(local + 1, 1)
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside the step's {world} tasks")
    return SlurmTask(
        rank=rank,
        world_size=world,
        local_rank=local,
        local_world_size=local_world,
        node_rank=node,
        hosts=hosts,
        master_addr=hosts[0],
        master_port=rendezvous_port(job, step),
        gpus_on_node=gpus_on_node(env),
    )
