"""Where meshforge's step and a peer's (the bare Hugging Face loop, or litgpt) differ, op by op (torch
profiler, CPU), and where each side's host time outside torch's ops goes (cProfile).

For each shape of ``bench_peers.py``: the same model as both sides build there, a few warmup steps,
then ``--steps`` steps under the profiler; per op, calls and self CPU milliseconds per step on each
side, sorted by the absolute difference (meshforge minus the peer; > 0: meshforge spends more). The top
rows name what is left to remove; rows with calls on one side only are work the other side avoids.
Then (``--host``) the same steps under cProfile: per side, milliseconds per step in Python code by
where it lives (meshforge, torch's Python, the peer's) and in C calls (torch's ops and the rest),
and meshforge's functions with the most own time: the per-step work outside the ops.

The two sides live in one process and their steps alternate (one profiler per step).
``--peer litgpt`` takes litgpt from ``bench_peers.py``'s ``--litgpt-path`` directory (``.peers/litgpt``).
Run: ``python bench/profile_peers.py --shapes 2m 6m 28m [--peer litgpt] [--host]`` (a few minutes; one
torch thread).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import LITGPT_PATH, SHAPES, job_config  # noqa: E402
from peer_sides import litgpt_step  # noqa: E402


def meshforge_step(cfg):
    from meshforge.pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    trainer._setup()

    def step():
        trainer.train_step()
        trainer.step += 1

    return step


def hf_step(cfg, adamw: str = "foreach"):
    """The loop body of ``hf_peer.train_peer`` (fp32, AdamW ``adamw``, clip 1.0, one loss read)."""
    from hf_peer import llama_config
    from transformers import LlamaForCausalLM

    m, batch, seq = cfg.model, cfg.train.global_batch_size, cfg.data.seq_len + 1
    model = LlamaForCausalLM(llama_config(m)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **{adamw: True})

    def step():
        tokens = torch.randint(0, m.vocab_size, (batch, seq))
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def peer_step(peer: str, cfg, adamw: str):
    if peer == "hf":
        return hf_step(cfg, adamw)
    if str(LITGPT_PATH) not in sys.path:
        sys.path.append(str(LITGPT_PATH))
    return litgpt_step(cfg, adamw=adamw)[0]


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


def host_tables(steps_by_side: list, steps: int) -> list[dict[str, float]]:
    """Per side: ms per step of cProfile's own time by where it was spent (``python meshforge``, ``python
    torch``, ``python peer`` for the peers' code, ``C calls`` for builtins: torch's ops and the rest),
    plus ``fn <file:line name>`` for each Python function; steps alternate as in :func:`op_tables`."""
    profiles = [cProfile.Profile() for _ in steps_by_side]
    for _ in range(steps):
        for step, prof in zip(steps_by_side, profiles):
            prof.enable()
            step()
            prof.disable()
    out = []
    for prof in profiles:
        table: dict[str, float] = defaultdict(float)
        for (path, line, name), (_, _, own, _, _) in pstats.Stats(prof).stats.items():
            ms = own * 1e3 / steps
            if path == "~":
                where = "C calls"
            elif "/meshforge/" in path:
                where = "python meshforge"
                table[f"fn {path.split('/meshforge/')[-1]}:{line} {name}"] += ms
            elif "/torch/" in path:
                where = "python torch"
            else:
                where = "python peer/other"
            table[where] += ms
        out.append(table)
    return out


def compare(
    shape: str,
    warmup: int,
    steps: int,
    top: int,
    peer: str,
    adamw: str,
    host: bool,
    mode: str = "eager",
    scope: str = "blocks",
) -> list[str]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(shape, mode, tmp, 2 * (warmup + steps), scope=scope)
        sides = [meshforge_step(cfg), peer_step(peer, cfg, adamw)]
        mf, other = op_tables(sides, warmup, steps)
        hosts = host_tables(sides, steps) if host else None
    rows = defaultdict(lambda: [(0.0, 0.0), (0.0, 0.0)])
    for side, table in enumerate((mf, other)):
        for name, v in table.items():
            rows[name][side] = v
    total = [sum(t[1] for t in table.values()) for table in (mf, other)]
    calls = [sum(t[0] for t in table.values()) for table in (mf, other)]
    lines = [
        f"#### {shape}: self CPU ms per step, meshforge {total[0]:.1f} ({calls[0]:.0f} op calls), {peer} "
        f"{total[1]:.1f} ({calls[1]:.0f} op calls) (profiled: {steps} steps of each after {warmup}, alternating; "
        f"{peer} AdamW {adamw})",
        "",
        f"| op | meshforge calls | {peer} calls | meshforge ms | {peer} ms | difference ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ranked = sorted(rows.items(), key=lambda kv: -abs(kv[1][0][1] - kv[1][1][1]))
    for name, ((mc, mt), (hc, ht)) in ranked[:top]:
        lines.append(f"| `{name}` | {mc:g} | {hc:g} | {mt:.2f} | {ht:.2f} | {mt - ht:+.2f} |")
    if hosts:
        lines += ["", f"cProfile own time, ms per step (meshforge, {peer}):", ""]
        for where in ("python meshforge", "python torch", "python peer/other", "C calls"):
            lines.append(f"- {where}: {hosts[0].get(where, 0.0):.2f}, {hosts[1].get(where, 0.0):.2f}")
        fns = sorted(((k, v) for k, v in hosts[0].items() if k.startswith("fn ")), key=lambda kv: -kv[1])
        lines += ["", "meshforge functions by own time, ms per step:", ""]
        lines += [f"- `{k[3:]}`: {v:.3f}" for k, v in fns[:top]]
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="rows per shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer", choices=("hf", "litgpt"), default="hf")
    ap.add_argument("--peer-adamw", choices=("foreach", "fused"), default="foreach")
    ap.add_argument("--host", action="store_true", help="add each side's host time by where it goes (cProfile)")
    ap.add_argument("--mode", choices=("eager", "compiled"), default="eager", help="both sides eager, or both compiled")
    ap.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks", help="meshforge's, compiled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.shapes:
        print(
            "\n".join(
                compare(
                    shape,
                    args.warmup,
                    args.steps,
                    args.top,
                    args.peer,
                    args.peer_adamw,
                    args.host,
                    args.mode,
                    args.compile_scope,
                )
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
