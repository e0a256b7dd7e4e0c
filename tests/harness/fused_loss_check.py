"""One rank of the fused-loss layout check (run by tests/kernels/test_fused_loss_parallel.py as 2 processes).

For each layout (FSDP2 over 2 ranks, TP2 with loss parallel, PP2) it builds the tiny-test
decoder twice (same seed), parallelizes both with :func:`meshforge.parallel.parallelize`, runs
one forward + backward with the plain loss on one and with ``fused_output_loss`` on the other
(pipeline: one schedule step each), and compares the global loss and every full gradient with
each other and with the same model in one process (plain loss, whole batch). It also records
the largest logits-shaped tensor autograd saved during each forward. Then the kernel's vocab-parallel
path under bf16 autocast against one process (``vp_bf16``). Rank 0 writes a JSON report.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/harness/fused_loss_check.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshforge.config import load_config
from meshforge.kernels.fused_loss import fused_linear_lm_loss
from meshforge.models import build_model
from meshforge.models.losses import IGNORE_INDEX, lm_loss
from meshforge.parallel import build_mesh, parallelize
from meshforge.parallel.job_checks import check_job
from meshforge.parallel.loss_parallel import fused_output_loss, lm_loss_fn, pipeline_loss_fn
from meshforge.parallel.mesh import resolve_degrees
from meshforge.parallel.pipeline import build_runner

LAYOUTS = {"fsdp2": {"parallel.dp_shard": 2}, "tp2": {"parallel.tp": 2}, "pp2": {"parallel.pp": 2}}
BATCH, SEQ, VOCAB, COEF = 4, 16, 1024, 1e-2


def config(overrides: dict):
    return load_config(
        "tiny-test",
        {
            "model.vocab_size": VOCAB,
            "model.n_layers": 2,
            "data.seq_len": SEQ,
            "train.global_batch_size": BATCH,
            "train.micro_batch_size": 1,
            "train.z_loss_coef": COEF,
            **overrides,
        },
    )


def batch_and_targets():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    targets = batch[:, 1:].clone()
    targets[:, ::5] = IGNORE_INDEX  # the same count in every sample: per-rank means average to the global one
    return batch, targets


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def largest_saved(fn):
    """(fn(), numel of the largest tensor autograd saved in it whose last dim is the vocab or half of it)."""
    sizes = [0]

    def pack(t):
        if t.ndim >= 2 and t.shape[-1] in (VOCAB, VOCAB // 2):  # logits (or a tp rank's slice of them)
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, max(sizes)


def run_layout(name: str, fused: bool, batch, targets):
    """(global loss, {param name: full grad}, largest saved numel) of one step in layout ``name``."""
    cfg = config(LAYOUTS[name])
    d = resolve_degrees(cfg.parallel, dist.get_world_size())
    plan = check_job(cfg, d, "cpu")
    mesh = build_mesh(d, torch.device("cpu"))
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), mesh, d, cfg, plan)
    if d.pp > 1:
        loss_fn, stage_kwargs = pipeline_loss_fn(model, cfg, d.tp, fused)
        runner = build_runner(
            model,
            mesh,
            torch.device("cpu"),
            loss_fn,
            COEF,
            model_inputs=lambda b: ((b[:, :-1],), targets),
            stage_kwargs=stage_kwargs,
        )
        losses, saved = largest_saved(lambda: runner.train_step(batch))
        loss = losses[0] + losses[1]
    else:
        rows = slice(None)
        if d.dp > 1:  # this rank's half of the batch
            n = BATCH // d.dp
            rows = slice(mesh["dp_shard"].get_local_rank() * n, (mesh["dp_shard"].get_local_rank() + 1) * n)
        x, y = batch[rows, :-1], targets[rows]
        if fused:
            parts, saved = largest_saved(lambda: fused_output_loss(model, model(x, return_hidden=True), y, COEF))
        else:
            parts, saved = largest_saved(lambda: lm_loss_fn(cfg, d.tp)(model(x), y, COEF))
        parts.total.backward()
        loss = parts.total.detach().clone()
        if d.dp > 1:
            dist.all_reduce(loss)
            loss /= d.dp
    grads = {k: full(p.grad) for k, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, saved


def vocab_parallel_bf16() -> dict:
    """The kernel's vocab-parallel path under bf16 autocast (each rank a vocab slice of W, every token)
    against the plain loss in one process on the whole W, under the same autocast and in fp32: relative
    gaps of the loss, the full dh (summed over ranks) and the full dW (gathered)."""
    g = torch.Generator().manual_seed(1)
    dim, rank, world = 32, dist.get_rank(), dist.get_world_size()
    hidden = torch.randn(BATCH * SEQ, dim, generator=g)
    weight = torch.randn(VOCAB, dim, generator=g) * (2 / dim**0.5)  # logits of a few units
    targets = batch_and_targets()[1].flatten()
    rows = VOCAB // world

    def run(w, autocast, **group):  # with group: the fused kernel; without: the plain linear + lm_loss
        h, w = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fused_linear_lm_loss(h, w, targets, COEF, chunk_size=24, **group) if group else h @ w.t()
        out = out if group else lm_loss(out, targets, COEF)
        out.total.backward()
        return out.total.detach(), h.grad, w.grad

    loss, gh, gw = run(weight[rank * rows : (rank + 1) * rows], True, group=dist.group.WORLD, vocab_start=rank * rows)
    dist.all_reduce(gh)  # the partial sums of the vocab slices
    slices = [torch.empty_like(gw) for _ in range(world)]
    dist.all_gather(slices, gw)
    got = (loss, gh, torch.cat(slices))
    report = {}
    for name, ref in (("bf16", run(weight, True)), ("fp32", run(weight, False))):
        for key, a, b in zip(("loss", "gh", "gw"), got, ref):
            report[f"{key}_vs_{name}"] = ((a - b).norm() / b.norm()).item()
    return report


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    batch, targets = batch_and_targets()
    cfg = config({})
    torch.manual_seed(0)
    ref_model = build_model(cfg.model)
    ref = lm_loss(ref_model(batch[:, :-1]), targets, COEF)
    ref.total.backward()
    ref_grads = {k: p.grad for k, p in ref_model.named_parameters()}
    report = {"tokens": BATCH * SEQ, "vocab": VOCAB}
    for name in LAYOUTS:
        plain_loss, plain_grads, plain_saved = run_layout(name, False, batch, targets)
        fused_loss, fused_grads, fused_saved = run_layout(name, True, batch, targets)
        names = sorted(fused_grads)
        report[name] = {
            "rank": dist.get_rank(),
            "n_grads": len(names),
            "grad_names_equal": names == sorted(plain_grads),
            "loss_vs_ref": abs(fused_loss - ref.total.item()),
            "loss_vs_plain": abs(fused_loss - plain_loss),
            "plain_loss_vs_ref": abs(plain_loss - ref.total.item()),
            "grad_vs_ref": max((fused_grads[k] - ref_grads[k]).abs().max().item() for k in names),
            "grad_vs_plain": max((fused_grads[k] - plain_grads[k]).abs().max().item() for k in names),
            "grad_scale": max(ref_grads[k].abs().max().item() for k in names),
            "fused_saved": fused_saved,
            "plain_saved": plain_saved,
        }
    report["vp_bf16"] = vocab_parallel_bf16()
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(reports, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
