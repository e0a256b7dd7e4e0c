"""The planner against measurements on the CPU: activation memory and layout ranking.

1. Memory. For the small preset and llama-100m, under activation checkpointing none /
   selective / full, single process, tp2 and pp2 (1F1B), ``meshforge train`` runs 3 steps
   (ranks started as tests/parallel_harness.py does, OMP_NUM_THREADS=1,
   MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed tensors to the OS at once). The trainer's
   memory probe (meshforge/plan/measure.py) logs, on rank 0, the peak RSS above the RSS at the
   end of step 1 (parameters + optimizer state at rest) up to step 2's optimizer step (the
   backward peak) and over all of step 2, with the planner's predictions for that rank: the
   backward peak against activations + communication buffers (+ gradients when a backward ran
   before the peak: gradient accumulation, a pipeline's steady state) -- this checks the
   activation model --, the step peak against the larger of that and the optimizer step
   (gradients + its temporaries).
2. Ranking. The planner's predicted step time (device ``cpu`` of the table) for the CPU layouts
   of bench/bench_layouts.py against their measured step times (the newest table in RESULTS.md,
   or ``--measure`` to time them again): Spearman rank correlation. On 2 cores, layouts of 4
   ranks oversubscribe the cores; the ``core-aware`` column prices compute on min(ranks, cores)
   cores (a property of this machine, not of the GPU model).

Memory numbers do not depend on the machine's load; step times do.

Run: ``python bench/bench_plan_memory.py --record``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layouts import LAYOUTS, run_ranks, step_times  # noqa: E402
from benchlib import RESULTS, loadavg, record  # noqa: E402

SECTION = "## Planner vs measurement (CPU)"
PRESET_ARGS = {
    "small": ["--model.tie_embeddings", "false"],  # pp2 needs untied; every layout alike
    "llama-100m": ["--train.global_batch_size", "4", "--train.micro_batch_size", "2"],
}
LAYOUT_ARGS = {
    "single": (1, []),
    "tp2": (2, ["--parallel.tp", "2"]),
    "pp2": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--parallel.pp_microbatches", "2"]),
}


def mem_record(out: Path) -> dict:
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "mem_step_peak_bytes" in rec:
            return rec
    raise RuntimeError("no memory record in metrics.jsonl")


def measure_memory(presets, acs, layouts, cache: str, timeout: float, device: str = "cpu") -> list[str]:
    common = ["train", "--train.steps", "3", "--train.eval_interval", "0", "--train.sample_prompt", "",
              "--checkpoint.interval", "0", "--train.progress", "false", "--logging.tensorboard", "false",
              "--train.device", device]
    lines = ["| preset | layout | AC | backward peak MiB measured / predicted | error | step peak MiB measured / "
             "predicted | error | predicted activations MiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    errors = []
    with tempfile.TemporaryDirectory(prefix="mf-planmem-") as tmp:
        for preset in presets:
            for name in layouts:
                world, extra = LAYOUT_ARGS[name]
                for ac in acs:
                    out = Path(tmp) / f"{preset}-{name}-{ac}"
                    args = [*common, "--config", preset, *PRESET_ARGS[preset], *extra,
                            "--parallel.activation_checkpointing", ac, "--train.output_dir", str(out)]
                    try:
                        run_ranks(world, args, timeout, {"MESHFORGE_CACHE": cache, "MALLOC_MMAP_THRESHOLD_": "65536"})
                        rec = mem_record(out)
                    except Exception as e:  # noqa: BLE001
                        print(f"{preset} {name} {ac}: FAILED {' '.join(str(e).split())[:160]}", flush=True)
                        lines.append(f"| {preset} | {name} | {ac} | failed | | | |")
                        continue
                    bwd, bwd_pred = rec["mem_backward_peak_bytes"], rec["mem_predicted_backward"]
                    step, step_pred = rec["mem_step_peak_bytes"], rec["mem_predicted_step"]
                    err = (bwd_pred - bwd) / bwd
                    errors.append(abs(err))
                    row = (f"| {preset} | {name} | {ac} | {bwd / 2**20:.1f} / {bwd_pred / 2**20:.1f} | {100 * err:+.1f}% | "
                           f"{step / 2**20:.1f} / {step_pred / 2**20:.1f} | {100 * (step_pred - step) / step:+.1f}% | "
                           f"{rec['mem_predicted_activations'] / 2**20:.1f} |")
                    print(row, flush=True)
                    lines.append(row)
    if errors:
        lines += ["", f"backward peak: largest |error| {100 * max(errors):.1f}% over {len(errors)} runs"]
    return lines


def recorded_layout_times() -> dict[str, float]:
    """Median ms/step per layout name from the newest 'Parallel layouts (CPU)' table of RESULTS.md."""
    text = RESULTS.read_text()
    section = text[text.index("## Parallel layouts (CPU)"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    entries = section.split("\n### ")
    out = {}
    for row in entries[-1].splitlines():
        m = re.match(r"\| (.+?) \| (\d+) \| ([\d.]+) \|", row)
        if m:
            out[m.group(1)] = float(m.group(3)) / 1e3
    return out


def ranking(measure: bool, cache: str, timeout: float) -> list[str]:
    from scipy.stats import spearmanr

    from meshforge.config import load_config
    from meshforge.plan.devices import get_device
    from meshforge.plan.planner import layout_of_config
    from meshforge.plan.time_model import estimate_time

    cpu = get_device("cpu")
    cores = os.cpu_count() or 1
    measured = recorded_layout_times()
    source = "RESULTS.md (newest 'Parallel layouts (CPU)' entry)"
    if measure:
        source = "measured now (7 steps, median of the last 4)"
        measured = {}
        common = ["train", "--config", "small", "--train.steps", "7", "--train.eval_interval", "0",
                  "--train.sample_prompt", "", "--checkpoint.interval", "0", "--train.progress", "false",
                  "--logging.tensorboard", "false", "--train.device", "cpu"]
        with tempfile.TemporaryDirectory(prefix="mf-planrank-") as tmp:
            for i, (name, world, extra, _) in enumerate(LAYOUTS):
                out = Path(tmp) / f"l{i}"
                run_ranks(world, [*common, "--train.output_dir", str(out), *extra], timeout, {"MESHFORGE_CACHE": cache})
                st = sorted(step_times(out)[3:])
                measured[name] = st[len(st) // 2]
    rows = ["| layout | ranks | measured ms/step | predicted ms/step | core-aware predicted ms/step |",
            "|---|---:|---:|---:|---:|"]
    meas, pred, aware = [], [], []
    for name, world, extra, _ in LAYOUTS:
        if name not in measured:
            continue
        cfg = load_config("small", [*extra, "--train.device", "cpu"])
        layout = layout_of_config(cfg, world)
        t = estimate_time(cfg, layout, cpu, gpus_per_node=world)
        adj = t.step_s + t.compute_s * (1 + t.bubble_fraction / (1 - t.bubble_fraction)) * (max(world / cores, 1) - 1)
        meas.append(measured[name])
        pred.append(t.step_s)
        aware.append(adj)
        rows.append(f"| {name} | {world} | {measured[name] * 1e3:.1f} | {t.step_s * 1e3:.1f} | {adj * 1e3:.1f} |")
    rho = spearmanr(meas, pred).statistic
    rho_aware = spearmanr(meas, aware).statistic
    rows += ["", f"step times: {source}; Spearman rank correlation, predicted vs measured: {rho:+.2f} "
                 f"(core-aware: {rho_aware:+.2f}) over {len(meas)} layouts"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["small", "llama-100m"])
    ap.add_argument("--ac", nargs="*", default=["none", "selective", "full"])
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUT_ARGS))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the same runs on GPUs (peak allocated above rest)")
    ap.add_argument("--measure", action="store_true", help="time the bench_layouts layouts again for the ranking")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--cache", default=os.environ.get("MESHFORGE_CACHE") or str(Path(tempfile.gettempdir()) / "meshforge-bench-cache"))
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    from meshforge.data_pipeline.builtin import ensure_builtin

    ensure_builtin("shakespeare", args.cache, 2048, progress=False)
    start = loadavg()
    lines = []
    if not args.skip_memory:
        lines += [f"Memory ({args.device}): rank 0, peak {'RSS' if args.device == 'cpu' else 'allocated'} in step 2 above the value after step 1 (3 steps of `meshforge train`, fp32, "
                  "OMP_NUM_THREADS=1, MALLOC_MMAP_THRESHOLD_=65536); small: global batch 16 x 128, untied; "
                  "llama-100m: global batch 4 x 256, micro-batch 2; pp2: 1F1B, 2 microbatches", "",
                  *measure_memory(args.presets, args.ac, args.layouts, args.cache, args.timeout, args.device), ""]
    lines += ["Ranking (small preset, the layouts of bench/bench_layouts.py):", "",
              *ranking(args.measure, args.cache, args.timeout)]
    lines += ["", f"load average at start / end: {start} / {loadavg()} (the machine is shared by several engineers: "
                  "step times are loaded, memory numbers are not affected)"]
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
