"""Framework overhead of meshforge's Trainer against a bare PyTorch loop, on CPU.

Both sides train the ``small`` preset (eval, checkpoints, sample and progress bar off):

* ``bare``: ``build_model`` under the same seed, AdamW with the same two param groups
  (decay on matrices, none on vectors) and hyperparameters (``foreach=True``), the same
  warmup+cosine ``LambdaLR``, ``clip_grad_norm_(foreach=True)``, ``lm_loss`` with the same
  z-loss coefficient, one ``.item()`` of the loss per step; batches from its own
  ``DistributedLoader`` over the *same* ``TokenDataset`` (same prefetch), so both sides
  read the same batches in the same way;
* ``Trainer.train_step()``: ``Trainer(cfg)``, ``_setup()``, then ``train_step()`` per step.

After a warmup, repetitions of ``--steps`` steps are interleaved A B B A ... (so drift and
order effects cancel); every step is timed on its own. Reported: median step time of each,
the overhead (median ratio and the per-repetition paired ratios, min/max), and the IQR;
the same for this process's CPU time per step (``time.process_time``), which a busy shared
machine disturbs far less than wall time.

``Trainer.run()`` (the whole loop: metrics record, metrics.jsonl, TensorBoard when on) is
timed per iteration from the interval between consecutive ``metrics.log`` calls, in fresh
trainers interleaved with bare repetitions. ``run()`` always writes a checkpoint after the
last step (``checkpoint.interval = 0`` only turns off the periodic ones); that happens after
the last interval and is not counted.

Run: ``python bench/bench_trainer_overhead.py --record``; ``--profile`` adds cProfile
listings of the trainer's and the bare step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SECTION = "## Trainer overhead"


from benchlib import loadavg, record  # noqa: E402  (bench/ is on sys.path when run as a script)


def overrides(output_dir: str, tensorboard: bool, steps: int) -> dict:
    return {
        "train.eval_interval": 0,
        "checkpoint.interval": 0,
        "checkpoint.resume": False,
        "train.sample_prompt": "",
        "train.progress": False,
        "train.device": "cpu",
        "logging.tensorboard": tensorboard,
        "logging.log_interval": 0,
        "train.output_dir": output_dir,
        "train.steps": steps,
    }


class BareLoop:
    """The same training work written as a plain PyTorch loop."""

    def __init__(self, cfg, dataset):
        from meshforge.data_pipeline import DistributedLoader
        from meshforge.models import build_model
        from meshforge.models.losses import lm_loss
        from meshforge.pretrain.optim import lr_factor

        self.lm_loss = lm_loss
        self.z_coef = cfg.train.z_loss_coef
        self.clip = cfg.optim.grad_clip
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, "cpu")
        self.model.train()
        params = list(self.model.parameters())  # tied weights appear once
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            foreach=True,
        )
        total = cfg.train.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, o))
        self.params = params
        self.loader = DistributedLoader(dataset, cfg.train.global_batch_size)  # same prefetch as the trainer's

    def step(self) -> float:
        batch = self.loader.next_batch()
        logits = self.model(batch[:, :-1])
        loss = self.lm_loss(logits, batch[:, 1:], self.z_coef)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.ce.item()


def timed(fn, n: int, out: list[float], losses: list[float] | None = None, cpu: list[float] | None = None) -> None:
    """Wall time of each call into ``out``; this process's CPU time of each call into ``cpu``."""
    for _ in range(n):
        c0 = time.process_time()
        t0 = time.perf_counter()
        r = fn()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
        if losses is not None:
            losses.append(r if isinstance(r, float) else r["loss"])


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(xs), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def profile_steps(label: str, fn, n: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats("meshforge", top)
    return f"----- cProfile: {label}, {n} steps -----\n{s.getvalue()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: immune to OpenMP spin-wait on a shared box)",
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=6, help="repetitions per side (interleaved A B B A ...)")
    ap.add_argument("--run-reps", type=int, default=2, help="fresh Trainer.run() per tensorboard setting (0: skip)")
    ap.add_argument(
        "--tensorboard",
        choices=("off", "on", "both"),
        default="both",
        help="logging.tensorboard for the run() measurement",
    )
    ap.add_argument(
        "--cache",
        default=os.environ.get("MESHFORGE_CACHE") or str(Path(tempfile.gettempdir()) / "meshforge-bench-cache"),
        help="MESHFORGE_CACHE for the builtin corpus (prepared on first use)",
    )
    ap.add_argument("--profile", action="store_true", help="print cProfile listings of both steps")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()

    os.environ["MESHFORGE_CACHE"] = args.cache
    torch.set_num_threads(args.threads)
    from meshforge.config import load_config
    from meshforge.pretrain.trainer import Trainer

    load_start = loadavg()
    print(
        f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
        f"MESHFORGE_CACHE={args.cache}; load average {load_start}",
        flush=True,
    )
    tb_settings = {"off": [False], "on": [True], "both": [False, True]}[args.tensorboard]

    with tempfile.TemporaryDirectory(prefix="mf-overhead-") as tmp:
        tmp = Path(tmp)
        total_steps = 600  # the preset's schedule length; both sides use it
        cfg = load_config("small", overrides(str(tmp / "step"), False, total_steps))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer._setup()
        print(f"Trainer(cfg) + _setup(): {time.perf_counter() - t0:.1f} s", flush=True)
        bare = BareLoop(cfg, trainer.data.train_loader.dataset)
        n_params = sum(p.numel() for p in bare.model.parameters())
        with torch.no_grad():
            same_init = all(
                torch.equal(a, b) for a, b in zip(bare.model.state_dict().values(), trainer.model.state_dict().values())
            )

        sides = {"bare": bare.step, "trainer": trainer.train_step}
        times = {k: [] for k in sides}
        cpu_times = {k: [] for k in sides}
        losses = {k: [] for k in sides}
        rep_medians = {k: [] for k in sides}
        for name, fn in sides.items():
            timed(fn, args.warmup, [], losses[name])
        for rep in range(args.reps):
            order = ("bare", "trainer") if rep % 2 == 0 else ("trainer", "bare")
            for name in order:
                chunk: list[float] = []
                timed(sides[name], args.steps, chunk, losses[name], cpu_times[name])
                times[name] += chunk
                rep_medians[name].append(statistics.median(chunk))
            print(
                f"rep {rep + 1}/{args.reps}: bare {rep_medians['bare'][-1] * 1e3:.1f} ms, "
                f"trainer {rep_medians['trainer'][-1] * 1e3:.1f} ms",
                flush=True,
            )

        profile_text = ""
        if args.profile:
            profile_text = profile_steps(
                "Trainer.train_step", trainer.train_step, args.profile_steps, 25
            ) + profile_steps("bare step", bare.step, args.profile_steps, 25)
        trainer.data.train_loader.close()

        # ---- whole run(): per-iteration time from consecutive metrics.log calls
        run_rows = []
        if args.run_reps:
            run_times = {tb: [] for tb in tb_settings}
            bare_run = []
            n_run = args.warmup + args.steps + 1
            for rep in range(args.run_reps):
                for tb in tb_settings:
                    chunk: list[float] = []
                    timed(bare.step, args.steps, chunk)
                    bare_run += chunk
                    rcfg = load_config("small", overrides(str(tmp / f"run-{rep}-{int(tb)}"), tb, n_run))
                    rt = Trainer(rcfg)
                    stamps: list[float] = []
                    orig_setup = rt._setup

                    def setup_and_hook(rt=rt, stamps=stamps, orig_setup=orig_setup):
                        orig_setup()
                        log = rt.metrics.log

                        def stamped(record, log=log):
                            log(record)
                            stamps.append(time.perf_counter())

                        rt.metrics.log = stamped

                    rt._setup = setup_and_hook
                    rt.run()
                    rt.data.train_loader.close()
                    run_times[tb] += list(np.diff(stamps)[args.warmup :])
            b_med = statistics.median(bare_run)
            for tb in tb_settings:
                med = statistics.median(run_times[tb])
                lo, _, hi = quartiles(run_times[tb])
                run_rows.append(
                    (
                        f"Trainer.run() loop, tensorboard {'on' if tb else 'off'}",
                        med,
                        lo,
                        hi,
                        min(run_times[tb]),
                        max(run_times[tb]),
                        len(run_times[tb]),
                        b_med,
                    )
                )
        bare.loader.close()

    load_end = loadavg()
    b, t = times["bare"], times["trainer"]
    b_med, t_med = statistics.median(b), statistics.median(t)
    overhead = (t_med / b_med - 1) * 100
    paired = [(tm / bm - 1) * 100 for tm, bm in zip(rep_medians["trainer"], rep_medians["bare"])]
    n_cmp = min(len(losses["bare"]), len(losses["trainer"]))
    max_dloss = max(abs(a - c) for a, c in zip(losses["bare"][:n_cmp], losses["trainer"][:n_cmp]))

    def row(name, vals):
        lo, med, hi = quartiles(vals)
        return f"| {name} | {len(vals)} | {med * 1e3:.1f} | {lo * 1e3:.1f} – {hi * 1e3:.1f} | {min(vals) * 1e3:.1f} – {max(vals) * 1e3:.1f} |"

    m = cfg.model
    lines = [
        f"model: small preset ({n_params / 1e6:.2f}M params, dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}); "
        f"batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, fp32, builtin:shakespeare; "
        f"torch threads {args.threads}; warmup {args.warmup}, {args.reps} interleaved reps x {args.steps} steps per side",
        f"load average at start / end: {load_start} / {load_end}; "
        f"same initial weights: {same_init}; max |loss diff| over {n_cmp} steps: {max_dloss:.2e}",
        "",
        "| loop | steps | median ms/step | IQR ms | min – max ms |",
        "|---|---:|---:|---:|---:|",
        row("bare PyTorch loop", b),
        row("Trainer.train_step()", t),
        row("bare PyTorch loop, process CPU time", cpu_times["bare"]),
        row("Trainer.train_step(), process CPU time", cpu_times["trainer"]),
    ]
    for name, med, lo, hi, mn, mx, n, _ in run_rows:
        lines.append(
            f"| {name} | {n} | {med * 1e3:.1f} | {lo * 1e3:.1f} – {hi * 1e3:.1f} | {mn * 1e3:.1f} – {mx * 1e3:.1f} |"
        )
    lines += [
        "",
        f"**train_step overhead: {overhead:+.1f}%** ({(t_med - b_med) * 1e3:+.1f} ms/step; median over steps); "
        f"per-rep paired: median {statistics.median(paired):+.1f}%, min {min(paired):+.1f}%, max {max(paired):+.1f}% "
        f"(target <= 3%)",
        f"process CPU time per step (less sensitive to other load on the machine): "
        f"{(statistics.median(cpu_times['trainer']) / statistics.median(cpu_times['bare']) - 1) * 100:+.1f}% "
        f"({(statistics.median(cpu_times['trainer']) - statistics.median(cpu_times['bare'])) * 1e3:+.1f} ms/step)",
    ]
    for name, med, *_rest, bm in run_rows:
        lines.append(
            f"{name}: {(med / bm - 1) * 100:+.1f}% vs bare steps interleaved with it (median {bm * 1e3:.1f} ms)"
        )
    print()
    print("\n".join(lines))
    if profile_text:
        print()
        print(profile_text)
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
