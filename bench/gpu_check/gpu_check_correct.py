"""The GPU check's correctness cases: the fast paths a GPU takes against their plain counterparts.

Each compares on the device (CUDA; the CPU under --dry, where torch allows) and states its
tolerance: 20 training steps compiled vs eager and bf16 vs fp32, FlexAttention's document
mask vs the dense mask, torch._grouped_mm experts vs the per-expert loop, the fused linear +
cross-entropy vs the plain loss. Tolerances are relative: max |a - b| / max |b|.
"""

from __future__ import annotations

import tempfile
import time

import torch
from benchlib import QUIET_TRAIN  # bench/ is on sys.path (gpu_check.py, the tests)
from gpu_check_lib import Skip, check, grads_rel_err, rel_err

SMALL_DRY = (
    "--model.dim",
    "64",
    "--model.n_layers",
    "2",
    "--model.n_heads",
    "4",
    "--data.seq_len",
    "32",
    "--train.global_batch_size",
    "4",
)
"""--dry: the small preset cut to a size a loaded 2-core CPU runs 20 steps of in a second."""
STEPS = 20
COMPILE_TOL = 2e-3
"""Per-step loss, compiled vs eager, both fp32: the same arithmetic in another order (fused kernels)."""
BF16_TOL = 2e-2
"""Per-step loss, bf16 autocast vs fp32: bf16 keeps 8 bits of mantissa (rel. 4e-3 per rounding)."""


def small_losses(ctx, *overrides: str, steps: int = STEPS, preset: str = "small") -> tuple[list[float], float]:
    """Per-step losses of ``steps`` Trainer steps of the small preset; the seconds they took."""
    from meshforge.config import load_config
    from meshforge.pretrain.trainer import Trainer

    with tempfile.TemporaryDirectory(dir=ctx.scratch) as tmp:
        cfg = load_config(
            preset,
            [
                *QUIET_TRAIN,
                "--train.steps",
                str(steps),
                "--train.output_dir",
                tmp,
                "--train.device",
                ctx.device.type,
                *(SMALL_DRY if ctx.dry else ()),
                *overrides,
            ],
        )
        trainer = Trainer(cfg)
        trainer._setup()
        t0 = time.perf_counter()
        losses = [trainer.train_step()["loss"] for _ in range(steps)]
        return losses, time.perf_counter() - t0


def compile_case(ctx) -> dict:
    import torch._dynamo.utils as dynamo_utils

    eager, t_eager = small_losses(ctx, "--train.dtype", "fp32", "--parallel.compile", "off")
    dynamo_utils.counters.clear()
    compiled, t_compiled = small_losses(ctx, "--train.dtype", "fp32", "--parallel.compile", "on")
    graphs = dynamo_utils.counters["stats"]["unique_graphs"] or dynamo_utils.counters["frames"]["ok"]
    return {
        "figures": {
            "max_rel_err": rel_err(compiled, eager),
            "loss_first": eager[0],
            "loss_last_eager": eager[-1],
            "loss_last_compiled": compiled[-1],
            "dynamo_graphs": graphs,
            "eager_s": t_eager,
            "compiled_s_with_compile": t_compiled,
        },
        "checks": [
            check(f"{STEPS} per-step losses, compiled vs eager (fp32)", rel_err(compiled, eager), COMPILE_TOL),
            check("graphs compiled by TorchDynamo (the blocks did not run eagerly)", graphs, 1, at_least=True),
        ],
        "note": "--dry compiles with the TorchDynamo eager backend" if ctx.dry else "Inductor",
    }


def bf16_case(ctx) -> dict:
    fp32, _ = small_losses(ctx, "--train.dtype", "fp32", "--parallel.compile", "off")
    bf16, _ = small_losses(ctx, "--train.dtype", "bf16", "--parallel.compile", "off")
    return {
        "figures": {
            "max_rel_err": rel_err(bf16, fp32),
            "loss_first": fp32[0],
            "loss_last_fp32": fp32[-1],
            "loss_last_bf16": bf16[-1],
        },
        "checks": [check(f"{STEPS} per-step losses, bf16 autocast vs fp32", rel_err(bf16, fp32), BF16_TOL)],
    }


FLOAT8_STEPS = 50
FLOAT8_TOL = 3e-2
"""Per-step loss over 50 steps, float8 vs bf16 (both bf16 autocast around the matmuls): float8
keeps 3 (e4m3) bits of mantissa per scaled tensor, its error is noise on the gradient."""


def float8_loss_case(ctx) -> dict:
    """llama-100m, seq 256, batch 8, eager: 50 steps with train.float8 against bf16 alone."""
    from gpu_check_lib import FLOAT8

    shape = (
        "--data.seq_len",
        "256",
        "--train.global_batch_size",
        "8",
        "--train.micro_batch_size",
        "8",
        "--parallel.compile",
        "off",
        "--train.dtype",
        "bf16",
    )
    try:  # first: under --dry the CPU refuses it at once
        f8, _ = small_losses(ctx, *shape, f"--{FLOAT8[0]}", FLOAT8[1], steps=FLOAT8_STEPS, preset="llama-100m")
    except Exception as e:  # noqa: BLE001
        if ctx.dry:
            raise Skip(f"{FLOAT8[0]} = {FLOAT8[1]!r} does not run on the CPU: {type(e).__name__}: {e}") from None
        raise
    bf16, _ = small_losses(ctx, *shape, steps=FLOAT8_STEPS, preset="llama-100m")
    tail = sum(f8[-10:]) / 10 / (sum(bf16[-10:]) / 10) - 1
    return {
        "figures": {
            "max_rel_err": rel_err(f8, bf16),
            "last10_mean_rel_diff": tail,
            "loss_first": bf16[0],
            "loss_last_bf16": bf16[-1],
            "loss_last_float8": f8[-1],
        },
        "checks": [
            check(f"{FLOAT8_STEPS} per-step losses, {FLOAT8[0]} = {FLOAT8[1]} vs bf16", rel_err(f8, bf16), FLOAT8_TOL)
        ],
        "note": "llama-100m, seq 256, batch 8, eager",
    }


def _segments(batch: int, seqlen: int, docs: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seqlen] document ids: ``docs`` documents of random lengths per row."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=gen)[: docs - 1] + 1
        flags = torch.zeros(seqlen, dtype=torch.long)
        flags[cuts] = 1
        rows.append(flags.cumsum(0))
    return torch.stack(rows)


def flex_case(ctx) -> dict:
    from meshforge.config import load_config
    from meshforge.models import build_model, layers
    from meshforge.models.losses import lm_loss

    dev = ctx.device
    cfg = load_config("small", list(SMALL_DRY) if ctx.dry else []).model
    torch.manual_seed(0)
    model = build_model(cfg, dev)
    gen = torch.Generator().manual_seed(0)
    batch, seqlen = (2, 64) if ctx.dry else (4, 512)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seqlen), generator=gen).to(dev)
    targets = torch.randint(0, cfg.vocab_size, (batch, seqlen), generator=gen).to(dev)
    segments = _segments(batch, seqlen, 5, gen).to(dev)
    backward = dev.type == "cuda"  # FlexAttention has no backward on the CPU
    flex = layers.flex_attention

    def run(use_flex: bool):
        model.attention_mask = lambda seg, **_: layers.document_mask(seg, use_flex)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            loss = lm_loss(model(tokens, segments), targets).total
        if backward:
            loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    dense_loss, dense_grads = run(False)
    if dev.type == "cuda":  # FlexAttention's own kernel (what a compiled block runs), not its eager reference
        layers.flex_attention = torch.compile(flex, fullgraph=True)
    try:
        flex_loss, flex_grads = run(True)
    finally:
        layers.flex_attention = flex
    checks = [check("loss, FlexAttention vs dense mask", rel_err(flex_loss, dense_loss), 1e-4)]
    figures = {
        "loss_rel_err": rel_err(flex_loss, dense_loss),
        "loss": float(dense_loss),
        "batch": batch,
        "seq_len": seqlen,
        "documents_per_row": 5,
    }
    if backward:
        err, worst = grads_rel_err(flex_grads, dense_grads)
        checks.append(check(f"every gradient, FlexAttention vs dense mask (worst: {worst})", err, 2e-3))
        figures["grad_rel_err"] = err
    return {
        "figures": figures,
        "checks": checks,
        "note": "fp32" + ("" if backward else "; forward only: FlexAttention has no backward on the CPU"),
    }


def grouped_mm_case(ctx) -> dict:
    from meshforge.models.moe import swiglu_grouped, swiglu_loop

    if not hasattr(torch, "_grouped_mm"):
        raise Skip(f"torch {torch.__version__} has no torch._grouped_mm")
    dev = ctx.device
    experts, dim, hidden, tokens = (8, 32, 64, 96) if ctx.dry else (8, 1024, 2816, 8192)
    gen = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(experts), tokens, replacement=True, generator=gen).bincount(minlength=experts)
    counts[1], counts[0] = 0, counts[0] + counts[1]  # an expert that gets no token
    x = torch.randn(tokens, dim, generator=gen)
    ws = [
        torch.randn(experts, hidden, dim, generator=gen) / dim**0.5,
        torch.randn(experts, dim, hidden, generator=gen) / hidden**0.5,
        torch.randn(experts, hidden, dim, generator=gen) / dim**0.5,
    ]
    grad_out = torch.randn(tokens, dim, generator=gen)

    def run(fn, dtype):
        leaves = [t.to(dev, dtype).clone().requires_grad_() for t in (x, *ws)]
        out = fn(leaves[0], *leaves[1:], counts.to(dev))
        (out.float() * grad_out.to(dev)).sum().backward()
        return out.detach().float(), {n: t.grad.float() for n, t in zip(("x", "w1", "w2", "w3"), leaves)}

    ref_out, ref_grads = run(swiglu_loop, torch.float32)
    loop_out, loop_grads = run(swiglu_loop, torch.bfloat16)
    try:
        out, grads = run(swiglu_grouped, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        if dev.type == "cuda":
            raise
        raise Skip(f"torch._grouped_mm does not run on the CPU in torch {torch.__version__}: {str(e)[:120]}") from None
    g_err, g_worst = grads_rel_err(grads, ref_grads)
    return {
        "figures": {
            "out_rel_err": rel_err(out, ref_out),
            "grad_rel_err": g_err,
            "bf16_loop_out_rel_err": rel_err(loop_out, ref_out),
            "bf16_loop_grad_rel_err": grads_rel_err(loop_grads, ref_grads)[0],
            "experts": experts,
            "tokens": tokens,
            "dim": dim,
            "hidden": hidden,
        },
        "checks": [
            check("output, grouped_mm bf16 vs loop fp32", rel_err(out, ref_out), 3e-2),
            check(f"gradients, grouped_mm bf16 vs loop fp32 (worst: {g_worst})", g_err, 3e-2),
        ],
        "note": "one expert gets no token; the bf16 loop's own error is in the figures for scale",
    }


def fused_loss_case(ctx) -> dict:
    from meshforge.kernels.fused_loss import fused_linear_lm_loss
    from meshforge.models.losses import IGNORE_INDEX, lm_loss

    dev = ctx.device
    n, dim, vocab = (256, 64, 2048) if ctx.dry else (8192, 2048, 32768)
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, dim, generator=gen)
    w0 = torch.randn(vocab, dim, generator=gen) / dim**0.5
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[::17] = IGNORE_INDEX
    z_coef = 1e-4

    def run(fn):
        h, w = h0.to(dev, copy=True).requires_grad_(), w0.to(dev, copy=True).requires_grad_()  # fresh grads per run
        parts = fn(h, w, y.to(dev))
        parts.total.backward()
        return [float(t.detach()) for t in (parts.total, parts.ce, parts.z_loss)], {"h": h.grad, "w": w.grad}

    plain_vals, plain_grads = run(lambda h, w, t: lm_loss(h @ w.t(), t, z_coef))
    checks, figures = [], {"tokens": n, "dim": dim, "vocab": vocab, "loss": plain_vals[0]}
    for label, chunk in (("default chunk", None), ("chunk 1000 (uneven)", 1000)):
        vals, grads = run(lambda h, w, t: fused_linear_lm_loss(h, w, t, z_coef, chunk_size=chunk))
        g_err, worst = grads_rel_err(grads, plain_grads)
        checks += [
            check(f"total, ce, z-loss, fused ({label}) vs plain", rel_err(vals, plain_vals), 1e-5),
            check(f"gradients of h and W, fused ({label}) vs plain (worst: {worst})", g_err, 1e-4),
        ]
        figures[f"value_rel_err_{'default' if chunk is None else chunk}"] = rel_err(vals, plain_vals)
        figures[f"grad_rel_err_{'default' if chunk is None else chunk}"] = g_err

    def bf16(fn):  # under bf16 autocast, as train.dtype = bf16: both paths' matmuls in bf16, the softmax in fp32
        def under(h, w, t):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return fn(h, w, t)

        return under

    plain16_vals, plain16_grads = run(bf16(lambda h, w, t: lm_loss(h @ w.t(), t, z_coef)))
    vals, grads = run(bf16(lambda h, w, t: fused_linear_lm_loss(h, w, t, z_coef)))
    g_err, worst = grads_rel_err(grads, plain16_grads)
    checks += [
        check("total, ce, z-loss, fused vs plain, both under bf16 autocast", rel_err(vals, plain16_vals), 1e-4),
        # a few bf16 ulps (2^-8 = 3.9e-3 of a value): the plain dW is one bf16 product, the fused one an
        # fp32 sum of bf16 products (4.8e-3 measured in the --dry size)
        check(f"gradients of h and W, fused vs plain under bf16 autocast (worst: {worst})", g_err, 2e-2),
    ]
    figures.update(
        value_rel_err_bf16=rel_err(vals, plain16_vals),
        grad_rel_err_bf16=g_err,
        plain_bf16_vs_fp32=rel_err(plain16_vals, plain_vals),
    )
    return {
        "figures": figures,
        "checks": checks,
        "note": "fp32, then both under bf16 autocast; z-loss 1e-4, every 17th target ignored",
    }
