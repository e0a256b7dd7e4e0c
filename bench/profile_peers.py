"""Where meshforge's step and the bare Hugging Face loop's differ, op by op (torch profiler, CPU).

For each shape of ``bench_peers.py``: the same model as both sides build there, a few warmup steps,
then ``--steps`` steps under the profiler; per op, calls and self CPU milliseconds per step on each
side, sorted by the absolute difference (meshforge minus HF; > 0: meshforge spends more). The top
rows name what is left to remove; rows with calls on one side only are work the other side avoids.

The two sides live in one process and their steps alternate (one profiler per step).
Run: ``python bench/profile_peers.py --shapes 2m 6m 28m`` (a few minutes; one torch thread).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import SHAPES, job_config  # noqa: E402


def meshforge_step(cfg):
    from meshforge.pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    trainer._setup()

    def step():
        trainer.train_step()
        trainer.step += 1

    return step


def hf_step(cfg):
    """The loop body of ``hf_peer.train_peer`` (fp32, AdamW foreach, clip 1.0, one loss read)."""
    from hf_peer import llama_config
    from transformers import LlamaForCausalLM

    m, batch, seq = cfg.model, cfg.train.global_batch_size, cfg.data.seq_len + 1
    model = LlamaForCausalLM(llama_config(m)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step():
        tokens = torch.randint(0, m.vocab_size, (batch, seq))
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def op_tables(steps_by_side: list, warmup: int, steps: int) -> list[dict[str, tuple[float, float]]]:
    """Per side: op name -> (calls per step, self CPU ms per step). The sides' steps alternate, one
    profiler per step, so that a loaded machine's drift hits both alike."""
    for _ in range(warmup):
        for step in steps_by_side:
            step()
    totals = [defaultdict(lambda: [0, 0.0]) for _ in steps_by_side]
    for _ in range(steps):
        for step, total in zip(steps_by_side, totals):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                total[e.key][0] += e.count
                total[e.key][1] += e.self_cpu_time_total / 1e3
    return [{k: (c / steps, ms / steps) for k, (c, ms) in total.items()} for total in totals]


def compare(shape: str, warmup: int, steps: int, top: int) -> list[str]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(shape, "eager", tmp, warmup + steps)
        mf, hf = op_tables([meshforge_step(cfg), hf_step(cfg)], warmup, steps)
    rows = defaultdict(lambda: [(0.0, 0.0), (0.0, 0.0)])
    for side, table in enumerate((mf, hf)):
        for name, v in table.items():
            rows[name][side] = v
    total = [sum(t[1] for t in table.values()) for table in (mf, hf)]
    lines = [
        f"#### {shape}: self CPU ms per step, meshforge {total[0]:.1f}, HF {total[1]:.1f} "
        f"(profiled: {steps} steps of each after {warmup}, alternating)",
        "",
        "| op | meshforge calls | HF calls | meshforge ms | HF ms | difference ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ranked = sorted(rows.items(), key=lambda kv: -abs(kv[1][0][1] - kv[1][1][1]))
    for name, ((mc, mt), (hc, ht)) in ranked[:top]:
        lines.append(f"| `{name}` | {mc:g} | {hc:g} | {mt:.2f} | {ht:.2f} | {mt - ht:+.2f} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="rows per shape")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.shapes:
        print("\n".join(compare(shape, args.warmup, args.steps, args.top)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
