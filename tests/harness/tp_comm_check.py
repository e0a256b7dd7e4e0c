"""One rank of the TP communication check (run by tests/parallel/test_parallel_tp.py as 2 processes).

For each variant of the decoder TP plan it parallelizes the tiny-test decoder over a 1-D
``tp`` mesh, runs one forward + backward under ``CommDebugMode`` and writes, on rank 0, a
JSON report: collective counts (global and per module, forward and backward), local
weight shapes and placements, the local logits shape, and the largest relative difference
of loss and gradients from the same model run in one process. The test asserts on it.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/harness/tp_comm_check.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from meshforge.config import load_config
from meshforge.models import build_model
from meshforge.models.losses import lm_loss
from meshforge.parallel.loss_parallel import vocab_parallel_lm_loss
from meshforge.parallel.tensor_parallel import apply_tp

VARIANTS = {
    # name: (loss_parallel, sequence_parallel, overrides)
    "sp_lp": (True, True, {}),
    "sp_nolp": (False, True, {}),
    "nosp_lp": (True, False, {}),
    "sp_lp_untied": (True, True, {"model.tie_embeddings": False, "model.qk_norm": False}),
}
N_LAYERS = 2
Z_COEF = 1e-3

OP_NAMES = {
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_reduce": "all_reduce",
    "allreduce_": "all_reduce",
    "all_to_all_single": "all_to_all",
    "broadcast_": "broadcast",
    "allgather_": "all_gather",
    "reduce_scatter_": "reduce_scatter",
}


def _names(counts) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for op, n in counts.items():
        short = str(op).split("'")[1] if "'" in str(op) else str(op)
        short = short.split(".")[-1]
        out[OP_NAMES.get(short, short)] += n
    return dict(out)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_variant(name: str, mesh) -> dict:
    loss_parallel, sequence_parallel, over = VARIANTS[name]
    cfg = load_config("tiny-test", {"model.n_layers": N_LAYERS, "parallel.loss_parallel": loss_parallel, **over})
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_tp(model, mesh, cfg.parallel, sequence_parallel=sequence_parallel)

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :3] = -100  # ignored positions take part too

    with CommDebugMode() as comm:
        logits = model(inputs)
        parts = vocab_parallel_lm_loss(logits, targets, Z_COEF) if loss_parallel else lm_loss(logits, targets, Z_COEF)
        parts.total.backward()
    ref_parts = lm_loss(ref(inputs), targets, Z_COEF)
    ref_parts.total.backward()

    ref_params = dict(ref.named_parameters())
    grad_err = {}
    for pname, p in model.named_parameters():
        g, rg = _full(p.grad), ref_params[pname].grad
        grad_err[pname] = ((g - rg).abs().max() / rg.abs().max()).item()
    loss_err = {
        k: abs(getattr(parts, k).item() - getattr(ref_parts, k).item()) / abs(getattr(ref_parts, k).item())
        for k in ("total", "ce", "z_loss")
    }

    per_module = {}
    for fqn, passes in comm.comm_module_counts.items():
        per_module[fqn] = {"forward": _names(passes["forward"]), "backward": _names(passes["backward"])}

    params = {}
    for pname, p in model.named_parameters():
        params[pname] = {
            "global": list(p.shape),
            "local": list(_local(p).shape),
            "placements": [str(pl) for pl in p.placements] if isinstance(p, DTensor) else None,
        }
    return {
        "logits_is_dtensor": isinstance(logits, DTensor),
        "logits_local_shape": list(_local(logits).shape),
        "logits_global_shape": list(logits.shape),
        "total": _names(comm.get_comm_counts()),
        "modules": per_module,
        "params": params,
        "tied": model.output.weight is model.tok_embeddings.weight,
        "grad_err": grad_err,
        "loss_err": loss_err,
        "vocab": cfg.model.vocab_size,
        "n_layers": N_LAYERS,
    }


def main(out_path: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))["tp"]
        report = {name: run_variant(name, mesh) for name in VARIANTS}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
