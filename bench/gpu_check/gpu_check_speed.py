"""The GPU check's speed cases: tokens/s, MFU and peak memory through meshforge's own Trainer,
with the planner's memory prediction for the same job next to what the step measured.

Each case builds ``Trainer(load_config(preset, overrides))``, runs ``WARMUP`` steps (the
per-block compile happens in the first) and times ``STEPS`` more (each ``train_step()`` reads
its loss back, and the device is synchronized). The global batch is one micro batch (no
accumulation); on out-of-memory the micro batch halves. The Trainer's memory probe
(meshforge/pretrain/memory_probe.py) measures step 2 against the planner's prediction. --dry runs the
same code on the CPU with tiny models and no compile.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import QUIET_TRAIN
from gpu_check_lib import FLOAT8, FUSED_KERNELS, ONE_B, Skip, check

WARMUP, STEPS = 3, 8
DRY_WARMUP, DRY_STEPS = 2, 2
LLAMA_1B = ("--model.qk_norm", "false", "--parallel.compile", "on", "--parallel.activation_checkpointing", "none")
"""llama-1b as a plain Llama (the peer's architecture): no qk-norm; per-block compile, no activation checkpointing."""
ONE_B_MICRO = 4
DRY_DECODER = (
    "--model.vocab_size",
    "2048",
    "--model.dim",
    "64",
    "--model.n_layers",
    "2",
    "--model.n_heads",
    "4",
    "--model.n_kv_heads",
    "2",
    "--model.ffn_dim",
    "128",
    "--data.seq_len",
    "64",
    "--model.max_seq_len",
    "128",
    "--parallel.compile",
    "off",
    "--train.dtype",
    "fp32",
)
"""--dry: any decoder preset cut to a tiny size (the built-in tokenizer's 2048 tokens), eager, fp32."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_trainer(ctx, preset: str, overrides: list[str], micro: int) -> dict:
    """Build the job, run the warm-up and timed steps; the figures."""
    from meshforge.config import load_config
    from meshforge.pretrain.trainer import Trainer

    warmup, steps = (DRY_WARMUP, DRY_STEPS) if ctx.dry else (WARMUP, STEPS)
    with tempfile.TemporaryDirectory(dir=ctx.scratch) as tmp:
        cfg = load_config(
            preset,
            [
                *QUIET_TRAIN,
                *overrides,
                "--train.global_batch_size",
                str(micro),
                "--train.micro_batch_size",
                str(micro),
                "--train.steps",
                str(warmup + steps),
                "--train.output_dir",
                tmp,
                "--train.device",
                ctx.device.type,
            ],
        )
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer._setup()
        setup_s = time.perf_counter() - t0
        dev = trainer.device
        probe = getattr(trainer, "memory_probe", None)
        tokens = cfg.train.global_batch_size * trainer.data.objective.tokens_per_sample()
        times, losses, mem = [], [], {}
        for _ in range(warmup + steps):
            start = time.perf_counter()
            rec = trainer.train_step()
            _sync(dev)
            times.append(time.perf_counter() - start)
            losses.append(rec["loss"])
            if probe is not None:
                mem.update(probe.after_step())
        timed = times[warmup:]
        med = statistics.median(timed)
        f = {
            "params": trainer.n_params,
            "total_params": sum(p.numel() for p in trainer.model.parameters()),
            "micro_batch": micro,
            "tokens_per_step": tokens,
            "median_s": med,
            "min_s": min(timed),
            "tokens_per_s": tokens / med,
            "setup_s": setup_s,
            "first_step_s": times[0],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "fused_loss": bool(getattr(trainer, "fused_loss", False)),
            "warmup_steps": warmup,
            "timed_steps": steps,
        }
        if trainer.peak:
            f["mfu"] = trainer.flops_per_token * tokens / med / trainer.peak
            f["tflops"] = trainer.flops_per_token * tokens / med / 1e12
        if dev.type == "cuda":
            f["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
        f.update({k: v for k, v in mem.items() if isinstance(v, (int, float))})
        if mem.get("mem_predicted_backward") and "mem_backward_peak_bytes" in mem:
            f["mem_backward_rel_err"] = mem["mem_predicted_backward"] / max(mem["mem_backward_peak_bytes"], 1) - 1
        if probe is not None and getattr(probe, "predicted", None) is None:
            f["planner"] = getattr(probe, "error", "no prediction")
        del trainer
        return f


def speed(
    ctx,
    preset: str,
    overrides: list[str],
    dry_overrides: list[str],
    micro: int,
    dry_micro: int = 2,
    option: tuple[str, str] | None = None,
) -> dict:
    """One speed case: figures and a finite-loss check; out-of-memory halves the micro batch.

    ``option``: the build's optional config key this case turns on; under --dry an error (the
    option refusing the CPU, say) skips the case with its message instead of failing it."""
    overrides = [*overrides, *(dry_overrides if ctx.dry else ())]
    micro = dry_micro if ctx.dry else micro
    notes = []
    while True:
        try:
            f = time_trainer(ctx, preset, overrides, micro)
            break
        except torch.OutOfMemoryError:
            pass  # released below, once the exception (whose traceback holds the trainer) is gone
        except Exception as e:  # noqa: BLE001
            if option and ctx.dry:  # a GPU feature (float8 matmuls, Triton kernels) the CPU may refuse
                raise Skip(f"{option[0]} = {option[1]!r} does not run on the CPU: {type(e).__name__}: {e}") from None
            raise
        _release()
        if micro == 1:
            raise RuntimeError("out of memory at micro batch 1")
        notes.append(f"out of memory at micro batch {micro}")
        micro //= 2
    bad = sum(not math.isfinite(v) for v in (f["loss_first"], f["loss_last"]))
    return {"figures": f, "checks": [check("non-finite losses", bad, 0)], "note": "; ".join(notes)}


def _one_b_micro(ctx) -> int:
    prior = ctx.prior(ONE_B) or {}
    return prior.get("figures", {}).get("micro_batch", ONE_B_MICRO)


def one_b_case(ctx) -> dict:
    return speed(ctx, "llama-1b", list(LLAMA_1B), list(DRY_DECODER), ONE_B_MICRO)


def fused_loss_toggle_case(ctx) -> dict:
    prior = (ctx.prior(ONE_B) or {}).get("figures", {})
    setting = "off" if prior.get("fused_loss") else "on"
    out = speed(ctx, "llama-1b", [*LLAMA_1B, "--train.fused_loss", setting], list(DRY_DECODER), _one_b_micro(ctx))
    out["note"] = "; ".join(
        filter(
            None,
            [f"train.fused_loss = {setting} (1b ran it {'on' if prior.get('fused_loss') else 'off'})", out["note"]],
        )
    )
    _vs_one_b(ctx, out)
    return out


def _vs_one_b(ctx, out: dict) -> None:
    base = (ctx.prior(ONE_B) or {}).get("figures", {}).get("tokens_per_s")
    if base:
        out["figures"]["speedup_vs_1b"] = out["figures"]["tokens_per_s"] / base


def float8_case(ctx) -> dict:
    out = speed(
        ctx, "llama-1b", [*LLAMA_1B, f"--{FLOAT8[0]}", FLOAT8[1]], list(DRY_DECODER), _one_b_micro(ctx), option=FLOAT8
    )
    _vs_one_b(ctx, out)
    return out


def fused_kernels_case(ctx) -> dict:
    out = speed(
        ctx,
        "llama-1b",
        [*LLAMA_1B, f"--{FUSED_KERNELS[0]}", FUSED_KERNELS[1]],
        list(DRY_DECODER),
        _one_b_micro(ctx),
        option=FUSED_KERNELS,
    )
    _vs_one_b(ctx, out)
    return out


COMPILE_MODEL = ("--parallel.compile_scope", "model")
"""The whole forward and loss as one compiled graph instead of each block (issue 16)."""
FIRST_LOSS_TOL = 1e-2
"""compile_model's first-step loss vs 1b's: the same weights and batch, bf16 arithmetic in another order."""


def compile_model_case(ctx) -> dict:
    """As 1b with ``parallel.compile_scope = model``; --dry compiles too (TorchDynamo's eager backend)."""
    out = speed(
        ctx, "llama-1b", [*LLAMA_1B, *COMPILE_MODEL], [*DRY_DECODER, "--parallel.compile", "on"], _one_b_micro(ctx)
    )
    _vs_one_b(ctx, out)
    base = (ctx.prior(ONE_B) or {}).get("figures", {})
    if base.get("micro_batch") == out["figures"]["micro_batch"]:
        err = abs(out["figures"]["loss_first"] - base["loss_first"]) / abs(base["loss_first"])
        out["checks"].append(check("first-step loss vs 1b's (same weights and batch)", err, FIRST_LOSS_TOL))
    return out


MOE = (
    "--model.n_layers",
    "2",
    "--parallel.ep",
    "1",
    "--parallel.compile",
    "on",
    "--parallel.activation_checkpointing",
    "none",
)
"""mixtral-8x's layer shape on one GPU: 2 layers (~3.1B parameters, ~0.9B active), no expert parallel."""
T5 = ("--parallel.compile", "on")
DRY_T5 = (
    "--model.vocab_size",
    "2048",
    "--model.dim",
    "64",
    "--model.n_layers",
    "2",
    "--model.n_decoder_layers",
    "2",
    "--model.n_heads",
    "4",
    "--model.ffn_dim",
    "128",
    "--data.seq_len",
    "64",
    "--parallel.compile",
    "off",
    "--train.dtype",
    "fp32",
)
CP2 = (
    *LLAMA_1B,
    "--data.seq_len",
    "8192",
    "--model.max_seq_len",
    "8192",
    "--parallel.cp",
    "2",
    "--parallel.cp_method",
    "ring",
)
GPU_JOBS = {
    ONE_B: ("llama-1b", LLAMA_1B, ONE_B_MICRO),
    "compile_model": ("llama-1b", (*LLAMA_1B, *COMPILE_MODEL), ONE_B_MICRO),
    "moe": ("mixtral-8x", MOE, 2),
    "t5-base": ("t5-base", T5, 64),
    "cp2": ("llama-1b", CP2, 1),
}
"""Preset, overrides and micro batch of each GPU job (tests/project/test_gpu_check.py validates them on the CPU)."""


def moe_case(ctx) -> dict:
    return speed(ctx, "mixtral-8x", list(MOE), [*DRY_DECODER, "--model.moe_ffn_dim", "64"], 2)


def t5_case(ctx) -> dict:
    return speed(ctx, "t5-base", list(T5), list(DRY_T5), 64)


def cp2_case(ctx) -> dict:
    """Two ranks, context parallel (ring): `meshforge train` under the test harness's launcher."""
    if not ctx.dry and torch.cuda.device_count() < 2:
        raise Skip(
            f"context parallel needs 2 ranks, one GPU each (NCCL will not put two ranks on one device); "
            f"this machine has {torch.cuda.device_count()} GPU"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "harness"))
    import parallel_harness

    steps, warm = (3, 1) if ctx.dry else (WARMUP + STEPS, WARMUP)
    shape = [*CP2, *DRY_DECODER] if ctx.dry else list(CP2)
    out = ctx.scratch / "cp2"
    args = [
        "train",
        "--config",
        "llama-1b",
        *QUIET_TRAIN,
        *shape,
        "--train.global_batch_size",
        "1",
        "--train.micro_batch_size",
        "1",
        "--train.steps",
        str(steps),
        "--train.output_dir",
        str(out),
        "--train.device",
        ctx.device.type,
    ]
    try:
        parallel_harness.run_ranks(
            2,
            args,
            timeout=ctx.extra.get("cp2_timeout", 600),
            extra_env={"OMP_NUM_THREADS": "1"} if ctx.dry else {"OMP_NUM_THREADS": "4"},
        )
    except parallel_harness.RanksFailed as e:
        raise RuntimeError(e.last_line()) from None
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in recs if "step_time_s" in r]
    timed = steps_[warm:]
    med = statistics.median(r["step_time_s"] for r in timed)
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    f = {
        "tokens_per_s": tps,
        "median_s": med,
        "tokens_per_step": round(tps * med),
        "micro_batch": 1,
        "loss_first": steps_[0]["loss"],
        "loss_last": steps_[-1]["loss"],
        "ranks": 2,
    }
    if "mfu" in timed[0]:
        f["mfu"] = statistics.median(r["mfu"] for r in timed)
    mem = next((r for r in recs if "mem_step_peak_bytes" in r), {})
    f.update({k: v for k, v in mem.items() if k.startswith("mem_")})
    if "mem_peak_bytes" in mem:
        f["peak_mem_bytes"] = mem["mem_peak_bytes"]
    bad = sum(not math.isfinite(r["loss"]) for r in steps_)
    return {
        "figures": f,
        "checks": [check("non-finite losses", bad, 0)],
        "note": "rank 0's metrics; tokens/s of the whole job",
    }
