"""The sides of ``bench_peers.py``: the shapes, meshforge's job config, and each side's timed step.

- ``meshforge``: ``Trainer(cfg)._setup()`` then ``Trainer.train_step()`` (its loader included);
- ``hf``: ``hf_peer.py``'s bare loop around transformers' ``LlamaForCausalLM``;
- ``litgpt``: ``litgpt.model.GPT`` with litgpt's ``chunked_cross_entropy``, as ``litgpt pretrain`` calls it.

``bench_peers.py`` says how they are compared; ``profile_peers.py`` profiles the same steps.
"""

from __future__ import annotations

import statistics
import time

import torch
from benchlib import QUIET_TRAIN

# name -> (overrides of the small preset, batch); parameter counts are printed by the run
SHAPES: dict[str, tuple[tuple[str, ...], int]] = {
    "2m": ((), 16),
    "6m": (("--model.dim", "320", "--model.n_layers", "5", "--model.n_heads", "5"), 8),
    "28m": (("--model.dim", "512", "--model.n_layers", "8", "--model.n_heads", "8"), 4),
}
_OFF = (*QUIET_TRAIN, "--train.device", "cpu", "--train.z_loss_coef", "0", "--optim.grad_clip", "1.0")


def job_config(
    shape: str,
    mode: str,
    out: str,
    steps: int,
    dry: bool = False,
    scope: str = "model",
    device: str = "cpu",
    batch: int = 0,
):
    from meshforge.config import load_config

    overrides, default_batch = SHAPES[shape]
    batch = batch or default_batch
    if dry:  # the GPU check's --dry: tiny, a few steps
        overrides, batch = ("--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4"), 2
    return load_config(
        "small",
        [
            *overrides,
            *_OFF,
            "--train.device",
            device,
            "--train.global_batch_size",
            str(batch),
            "--parallel.compile",
            "on" if mode == "compiled" else "off",
            "--parallel.compile_scope",
            scope if mode == "compiled" else "blocks",
            "--train.steps",
            str(steps + 10),
            "--train.output_dir",
            out,
        ],
    )


def _timed(step, warmup: int, steps: int, device: torch.device = torch.device("cpu")) -> dict:
    """Seconds per step: on a CPU this process's CPU time (what a loaded machine disturbs least; wall
    time as ``wall_median_s``), on a GPU wall time with the device synchronized after each step."""
    wall, cpu = [], []
    for _ in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    per_step = wall if device.type == "cuda" else cpu
    return {
        "median_s": statistics.median(per_step[warmup:]),
        "min_s": min(per_step[warmup:]),
        "wall_median_s": statistics.median(wall[warmup:]),
        "first_s": wall[0],
    }


def run_meshforge(cfg, warmup: int, steps: int, device: torch.device = torch.device("cpu")) -> dict:
    from meshforge.pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    trainer._setup()

    losses = []

    def step():
        losses.append(trainer.train_step()["loss"])
        trainer.step += 1

    out = _timed(step, warmup, steps, device)
    out["params"] = sum(p.numel() for p in trainer.model.parameters())
    out["losses"] = losses
    return out


def run_hf(cfg, warmup: int, steps: int, device: torch.device, bf16: bool = False, adamw: str = "foreach") -> dict:
    from hf_peer import train_peer

    m = cfg.model
    f = train_peer(
        m,
        cfg.data.seq_len + 1,
        cfg.train.global_batch_size,
        warmup,
        steps,
        device,
        bf16,
        cfg.parallel.compile == "on",
        adamw=adamw,
    )
    out = {"median_s": f["median_s"], "min_s": f["min_s"], "first_s": f["first_step_s"], "params": f["total_params"]}
    if "cpu_median_s" in f and device.type == "cpu":  # CPU time per step, as the other sides report it
        out.update(median_s=f["cpu_median_s"], min_s=f["cpu_min_s"], wall_median_s=f["median_s"])
    return out


def litgpt_model(m, seq_len: int):
    from litgpt.config import Config
    from litgpt.model import GPT

    c = Config(
        name="meshforge-shape",
        block_size=seq_len,
        vocab_size=m.vocab_size,
        padded_vocab_size=m.vocab_size,
        n_layer=m.n_layers,
        n_head=m.n_heads,
        n_embd=m.dim,
        n_query_groups=m.kv_heads,
        head_size=m.head_dim,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=m.norm_eps,
        mlp_class_name="LLaMAMLP",
        intermediate_size=m.hidden_dim,
        rope_base=int(m.rope_theta),
    )
    model = GPT(c)
    if m.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


def litgpt_step(cfg, device: torch.device = torch.device("cpu"), bf16: bool = False, adamw: str = "foreach"):
    """litgpt's training step on ``cfg``'s shape -> (step, parameter count)."""
    from litgpt.utils import chunked_cross_entropy

    m, seq, batch = cfg.model, cfg.data.seq_len, cfg.train.global_batch_size
    torch.manual_seed(0)
    with torch.device(device):
        model = litgpt_model(m, seq)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **{adamw: True})
    forward = torch.compile(model) if cfg.parallel.compile == "on" else model

    def step():
        tokens = torch.randint(0, m.vocab_size, (batch, seq + 1), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(tokens[:, :-1])
        loss = chunked_cross_entropy(logits, tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step, sum(p.numel() for p in model.parameters())


def run_litgpt(
    cfg, warmup: int, steps: int, device: torch.device = torch.device("cpu"), bf16: bool = False, adamw: str = "foreach"
) -> dict:
    step, params = litgpt_step(cfg, device, bf16, adamw)
    out = _timed(step, warmup, steps, device)
    out["params"] = params
    return out
