"""Standalone repro (plain torch, gloo, CPU, 4 processes): zero-bubble's split backward x FSDP2 loses weight gradients.

    python bench/repro_zero_bubble_fsdp.py

A 4-stage model (each stage: two residual ``Linear`` blocks and a per-channel ``scale``) runs on a
(pp=2, dp=2) mesh, two stages per pipeline rank (loop placement), with ``fully_shard`` on each block and
on each stage (the stage's root holds ``scale``). One training step of
``ScheduleInterleavedZeroBubble`` / ``ScheduleInterleaved1F1B`` is compared, parameter by parameter
(gradients gathered to full tensors), with the same model run in one process on the whole batch.

What it shows (torch 2.13): with ``reshard_after_forward=True`` zero-bubble gives some parameters no
gradient, or only part of it, while interleaved 1F1B is exact, and zero-bubble with
``reshard_after_forward=False`` is exact. Cause: ``_PipelineStageBase.backward_maybe_with_nosync``
("input") calls ``_backward.stage_backward_input(..., self.submod.parameters())``, which reads the
parameters *before* running autograd and keeps, per weight, the autograd nodes linking it to the
graph; ``stage_backward_weight`` (the W pass) then computes gradients only for those. An FSDP2
unit that resharded after forward lists its sharded DTensor parameters there, not the unsharded
parameters the forward used, so ``get_param_groups`` finds no path from them (its own check,
``assert union_params == set(params)``, is commented out) and they get no weight gradient in that
microbatch. The unit is unsharded again by FSDP's pre-backward hook *during* that autograd call, so
the next I pass of the same stage (if no forward reshards it in between) finds it gathered: hence the
partial gradients. Stage 0 is exempt (its W pass is a full backward).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

D, STAGES, BATCH, MICROBATCHES = 16, 4, 8, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x * self.scale


def build() -> list[Stage]:
    torch.manual_seed(0)
    return [Stage() for _ in range(STAGES)]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, D, generator=g), torch.randn(BATCH, D, generator=g)


def mse(out, target):
    return (out - target).square().mean()


def reference_grads() -> dict[str, torch.Tensor]:
    stages = build()
    x, t = data()
    for s in stages:
        x = s(x)
    mse(x, t).backward()
    return {f"stage{i}.{n}": p.grad for i, s in enumerate(stages) for n, p in s.named_parameters()}


def pipeline_grads(schedule_name: str, reshard: bool) -> dict[str, torch.Tensor] | None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    ids = [pp_rank, pp_rank + 2]  # loop placement: rank r holds stages r and r + pp
    full = build()
    mods = []
    for i in ids:
        m = full[i]
        for b in m.blocks:
            fully_shard(b, mesh=mesh["dp"], reshard_after_forward=reshard)
        fully_shard(m, mesh=mesh["dp"], reshard_after_forward=reshard)
        mods.append(m)
    stages = [PipelineStage(m, i, STAGES, torch.device("cpu"), group=mesh["pp"].get_group()) for m, i in zip(mods, ids)]
    cls = {"zero_bubble": ScheduleInterleavedZeroBubble, "interleaved_1f1b": ScheduleInterleaved1F1B}[schedule_name]
    schedule = cls(stages, MICROBATCHES, loss_fn=mse)  # scale_grads: the mean over microbatches
    x, t = data()
    local = slice(dp_rank * BATCH // 2, (dp_rank + 1) * BATCH // 2)  # FSDP averages over dp
    args = (x[local],) if 0 in ids else ()
    schedule.step(*args, target=t[local] if STAGES - 1 in ids else None)
    grads = {}
    for m, i in zip(mods, ids):
        for n, p in m.named_parameters():
            g = p.grad
            grads[f"stage{i}.{n}"] = None if g is None else (g.full_tensor() if isinstance(g, DTensor) else g).clone()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, grads)
    out = {}
    for part in gathered:
        out.update(part)
    return out


def report(name: str, got: dict, ref: dict) -> None:
    bad = []
    for k, want in ref.items():
        have = got.get(k)
        if have is None:
            bad.append(f"    {k:26s} no gradient")
            continue
        rel = ((have - want).norm() / want.norm()).item()
        if rel > 1e-5:
            ratio = ((have * want).sum() / want.square().sum()).item()
            bad.append(f"    {k:26s} rel. error {rel:.2e}, projection on the reference {ratio:.3f}")
    print(f"{name}: {len(ref) - len(bad)}/{len(ref)} gradients match one process (rel. 1e-5)")
    print("\n".join(bad) if bad else "    all match")


def worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ref = reference_grads()
    for schedule, reshard in (("zero_bubble", True), ("zero_bubble", False), ("interleaved_1f1b", True)):
        got = pipeline_grads(schedule, reshard)
        if rank == 0:
            report(f"{schedule}, reshard_after_forward={reshard}", got, ref)
        dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"torch {torch.__version__}; pp=2 x dp=2 (gloo, CPU), {STAGES} stages, {MICROBATCHES} microbatches")
    mp.spawn(worker, args=(4, port), nprocs=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
