"""One rank of the float8 layout check (run by tests/parallel/test_float8.py as 2 processes; no float8 matmul).

Parallelizes the tiny-test decoder with ``train.float8 = tensorwise`` under FSDP2 (dp_shard 2)
and under TP2, and reports on rank 0 (JSON): which weights FSDP2 all-gathers in float8 (their
local shards are torchao's float8-cast weight tensors), the scales ``precompute_float8_scales``
computed against ``finfo(e4m3).max / amax`` of the unsharded weights (one process), and the TP
placements, module types and input hooks (which TP style) of the converted projections.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/harness/float8_layout_check.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshforge.config import load_config
from meshforge.models import build_model
from meshforge.parallel import build_mesh, parallelize
from meshforge.parallel.float8 import precompute_float8_scales
from meshforge.parallel.mesh import resolve_degrees


def build(overrides: dict):
    cfg = load_config(
        "tiny-test", {"model.vocab_size": 96, "model.n_layers": 2, "train.float8": "tensorwise", **overrides}
    )
    d = resolve_degrees(cfg.parallel, dist.get_world_size())
    torch.manual_seed(0)
    reference = {k: v.detach().clone() for k, v in build_model(cfg.model).named_parameters(remove_duplicate=False)}
    torch.manual_seed(0)
    return parallelize(build_model(cfg.model), build_mesh(d, torch.device("cpu")), d, cfg), reference


def _describe(obj) -> str:
    """A hook closure's cell: the class of a style object, the function of a partial."""
    func = getattr(obj, "func", None)
    return getattr(func, "__qualname__", "") if func is not None else type(obj).__name__


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    report = {}

    model, reference = build({"parallel.dp_shard": 2})
    precompute_float8_scales(model)
    fsdp = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, DTensor):
            continue
        local = weight._local_tensor
        scale = getattr(local, "_precomputed_scale", None)
        expect = torch.finfo(torch.float8_e4m3fn).max / reference[f"{name}.weight"].abs().max().double()
        fsdp[name] = {
            "type": type(module).__name__,
            "local": type(local).__name__,
            "scale_err": None if scale is None else abs(scale.item() / expect.item() - 1),
        }
    report["fsdp2"] = fsdp

    model, _ = build({"parallel.tp": 2})
    tp = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, DTensor) and "norm" not in name:
            tp[name] = {
                "type": type(module).__name__,
                "placements": [str(p) for p in weight.placements],
                "local_rows": weight.to_local().shape[0],
                "rows": weight.shape[0],
            }
        if name.endswith(("attention", "feed_forward", ".wq", ".w2")):  # which TP style prepares their inputs
            tp.setdefault(name, {})["input_hooks"] = " ".join(
                f"{h!r} {[_describe(c.cell_contents) for c in getattr(h, '__closure__', None) or ()]}"
                for h in module._forward_pre_hooks.values()
            )  # a lambda around the style: the style's class
    report["tp2"] = tp
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
