"""The peer: what a user would pick instead of meshforge for one GPU -- a bare training loop
around Hugging Face transformers' ``LlamaForCausalLM``.

The model is meshforge's decoder architecture as a ``LlamaConfig`` (same widths, heads, GQA,
SwiGLU, RoPE theta, untied output; qk-norm off, as Llama has none), randomly initialised from
the config (nothing is downloaded). The loop: fp32 master weights, bf16 autocast, SDPA
attention (causal, no mask tensor), the model's own shifted cross-entropy (``labels=``), fused
AdamW, gradient clipping at 1.0, ``torch.compile`` of each decoder layer (the granularity
meshforge compiles at; compiling the whole model takes minutes longer to build). Random token
batches of the same shape as meshforge's are made on the device (no loader cost: the peer is
favoured there).

As a GPU-check case (``peer_case``) it takes the micro batch of the ``1b`` case and reports
meshforge / peer tokens/s. Alone: ``python bench/hf_peer.py --config llama-1b --micro-batch 4``.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "gpu_check")]

from gpu_check_lib import ONE_B, check  # noqa: E402


def llama_config(m):
    """meshforge ModelConfig -> transformers LlamaConfig of the same architecture."""
    from transformers import LlamaConfig

    if m.family != "decoder" or m.moe_experts or m.qk_norm or m.ffn_activation != "silu" or m.mup_base_dim:
        raise ValueError("the peer covers the plain Llama architecture: a dense decoder, SwiGLU, no qk-norm, no muP")
    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.hidden_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_seq_len,
        head_dim=m.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=m.init_std,
        attn_implementation="sdpa",
        use_cache=False,
    )


def train_peer(
    m,
    seq_len: int,
    micro: int,
    warmup: int,
    steps: int,
    device: torch.device,
    bf16: bool,
    compile_layers: bool,
    adamw: str = "fused",
) -> dict:
    """Build the peer of ``m`` on ``device`` and time ``steps`` steps after ``warmup``; ``adamw``:
    ``fused`` or ``foreach`` (meshforge's choice on CPU, for ``bench_peers.py``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(m))
    model.train()
    if compile_layers:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=3e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        **({"fused": True} if adamw == "fused" else {"foreach": True}),
    )
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu, losses = [], [], []
    for _ in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens = torch.randint(0, m.vocab_size, (micro, seq_len), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    timed = times[warmup:]
    med = statistics.median(timed)
    out = {
        "total_params": sum(p.numel() for p in model.parameters()),
        "micro_batch": micro,
        "tokens_per_step": micro * seq_len,
        "median_s": med,
        "min_s": min(timed),
        "tokens_per_s": micro * seq_len / med,
        "setup_s": setup_s,
        "first_step_s": times[0],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "warmup_steps": warmup,
        "timed_steps": steps,
        "cpu_median_s": statistics.median(cpu[warmup:]),
        "cpu_min_s": min(cpu[warmup:]),
    }
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def meshforge_total_params(m) -> int:
    from meshforge.models import MODEL_SPECS

    with torch.device("meta"):
        return sum(p.numel() for p in MODEL_SPECS[m.family].build(m).parameters())


def peer_case(ctx) -> dict:
    from gpu_check_speed import DRY_DECODER, DRY_STEPS, DRY_WARMUP, LLAMA_1B, ONE_B_MICRO, STEPS, WARMUP

    from meshforge.config import load_config
    from meshforge.models import flops_per_token
    from meshforge.pretrain.metrics import peak_flops

    one_b = (ctx.prior(ONE_B) or {}).get("figures", {})
    cfg = load_config("llama-1b", [*LLAMA_1B, *(DRY_DECODER if ctx.dry else ())])
    micro = one_b.get("micro_batch", 2 if ctx.dry else ONE_B_MICRO)
    warmup, steps = (DRY_WARMUP, DRY_STEPS) if ctx.dry else (WARMUP, STEPS)
    m, seq = cfg.model, cfg.data.seq_len
    notes = ["--dry: fp32, no compile" if ctx.dry else "bf16 autocast, per-layer compile"]
    while True:
        try:
            f = train_peer(m, seq, micro, warmup, steps, ctx.device, bf16=not ctx.dry, compile_layers=not ctx.dry)
            break
        except torch.OutOfMemoryError:
            pass  # released below, once the exception (whose traceback holds the model) is gone
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        if micro == 1:
            raise RuntimeError("out of memory at micro batch 1")
        notes.append(f"out of memory at micro batch {micro}")
        micro //= 2
    mf_total = meshforge_total_params(m)
    active = f["total_params"] - m.vocab_size * m.dim  # as meshforge counts: no input embedding (untied)
    peak = peak_flops(ctx.device)
    if peak:
        fpt = flops_per_token(m, active, seq)
        f["mfu"] = fpt * f["tokens_per_s"] / peak
        f["tflops"] = fpt * f["tokens_per_s"] / 1e12
    f["params"] = active
    checks = [
        check("parameter count, peer minus meshforge (the same architecture)", abs(f["total_params"] - mf_total), 0),
        check("non-finite losses", sum(not math.isfinite(v) for v in (f["loss_first"], f["loss_last"])), 0),
    ]
    if one_b.get("tokens_per_s"):
        f["meshforge_tokens_per_s"] = one_b["tokens_per_s"]
        f["ratio"] = one_b["tokens_per_s"] / f["tokens_per_s"]
        f["ratio_goal"] = 1.2
        if one_b.get("micro_batch") != micro:
            notes.append(f"meshforge ran micro batch {one_b.get('micro_batch')}, the peer {micro}")
    else:
        notes.append("no meshforge 1b figure in this run: no ratio")
    return {"figures": f, "checks": checks, "note": "; ".join(notes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-1b")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides, after --")
    a = ap.parse_args()
    from meshforge.config import load_config

    cfg = load_config(a.config, ["--model.qk_norm", "false", *a.overrides])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        train_peer(
            cfg.model,
            cfg.data.seq_len,
            a.micro_batch,
            a.warmup,
            a.steps,
            dev,
            dev.type == "cuda",
            not a.no_compile and dev.type == "cuda",
        )
    )


if __name__ == "__main__":
    main()
