"""One rank of the encoder-decoder TP check (run by tests/parallel/test_encoder_decoder_parallel.py as 2 processes).

Parallelizes a tiny T5 (relative position bias, padded encoder inputs, ignored targets) over
a 1-D ``tp`` mesh with :func:`meshforge.parallel.tensor_parallel.apply_tp`, runs one forward
+ backward under ``CommDebugMode`` and writes, on rank 0, a JSON report: collective counts
(global and per module, forward and backward), local weight shapes and placements, the local
logits shape, and the largest relative difference of loss and gradients from the same model
run in one process. The test asserts on it.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/harness/encoder_decoder_tp_check.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode, _comm_mode

from meshforge.config import load_config
from meshforge.models import build_model
from meshforge.models.losses import lm_loss
from meshforge.parallel.loss_parallel import vocab_parallel_lm_loss
from meshforge.parallel.tensor_parallel import apply_tp
from tp_comm_check import _full, _local, _names

N_ENC, N_DEC = 2, 2
SRC_LEN, TGT_LEN = 12, 7  # the decoder length does not divide by tp: uneven sequence shards
Z_COEF = 1e-3
MODEL = {
    "model.vocab_size": 128,
    "model.dim": 32,
    "model.n_layers": N_ENC,
    "model.n_decoder_layers": N_DEC,
    "model.n_heads": 4,
    "model.ffn_dim": 64,
    "model.max_seq_len": 64,
    "model.rel_pos_buckets": 8,
    "model.rel_pos_max_distance": 16,
    "data.seq_len": 32,
}


def _track_reused_modules() -> None:
    """CommDebugMode's module tracker adds a forward hook each time a module starts its forward and
    pops its parent list once per hook, so a module called twice in one forward (the shared embedding:
    source and decoder inputs) pops twice and fails. Keep only the newest hook per module."""
    tracker = _comm_mode._CommModeModuleTracker
    original = tracker._fw_pre_hook

    def pre_hook(self, mod, inputs):
        before = dict(self.register_forward_hook_handles)
        original(self, mod, inputs)
        old = before.get(self.name)
        if old is not None and old is not self.register_forward_hook_handles.get(self.name):
            old.remove()

    tracker._fw_pre_hook = pre_hook


def run(mesh) -> dict:
    cfg = load_config("t5-small", {**MODEL, "parallel.loss_parallel": True})
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_tp(model, mesh, cfg.parallel)

    gen = torch.Generator().manual_seed(1)
    src = torch.randint(2, cfg.model.vocab_size, (2, SRC_LEN), generator=gen)
    tgt_in = torch.randint(2, cfg.model.vocab_size, (2, TGT_LEN), generator=gen)
    targets = torch.randint(2, cfg.model.vocab_size, (2, TGT_LEN), generator=gen)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[0, -3:] = False  # padded encoder positions: masked in encoder self- and decoder cross-attention
    targets[1, -2:] = -100

    with CommDebugMode() as comm:
        logits = model(src, tgt_in, src_mask)
        parts = vocab_parallel_lm_loss(logits, targets, Z_COEF)
        parts.total.backward()
    ref_parts = lm_loss(ref(src, tgt_in, src_mask), targets, Z_COEF)
    ref_parts.total.backward()

    ref_params = dict(ref.named_parameters())
    grad_err = {}
    for name, p in model.named_parameters():
        g, rg = _full(p.grad), ref_params[name].grad
        grad_err[name] = ((g - rg).abs().max() / rg.abs().max()).item()
    loss_err = {
        k: abs(getattr(parts, k).item() - getattr(ref_parts, k).item()) / abs(getattr(ref_parts, k).item())
        for k in ("total", "ce", "z_loss")
    }
    per_module = {
        fqn: {"forward": _names(passes["forward"]), "backward": _names(passes["backward"])}
        for fqn, passes in comm.comm_module_counts.items()
    }
    params = {
        name: {
            "global": list(p.shape),
            "local": list(_local(p).shape),
            "placements": [str(pl) for pl in p.placements] if isinstance(p, DTensor) else None,
        }
        for name, p in model.named_parameters()
    }
    return {
        "logits_is_dtensor": isinstance(logits, DTensor),
        "logits_local_shape": list(_local(logits).shape),
        "logits_global_shape": list(logits.shape),
        "total": _names(comm.get_comm_counts()),
        "modules": per_module,
        "params": params,
        "grad_err": grad_err,
        "loss_err": loss_err,
        "vocab": cfg.model.vocab_size,
        "n_enc": N_ENC,
        "n_dec": N_DEC,
    }


def main(out_path: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _track_reused_modules()
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))["tp"]
        report = run(mesh)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
