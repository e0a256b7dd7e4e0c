"""The planner against measurements on the CPU: activation memory and layout ranking.

1. Memory. For the small preset and llama-100m, under activation checkpointing none /
   selective / full, single process, tp2 and pp2 (1F1B), ``meshforge train`` runs 3 steps
   (ranks started as tests/harness/parallel_harness.py does, OMP_NUM_THREADS=1,
   MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed tensors to the OS at once). The trainer's
   memory probe (meshforge/pretrain/memory_probe.py) logs, on rank 0, the peak RSS above the RSS at the
   end of step 1 (parameters + optimizer state at rest) up to step 2's optimizer step (the
   backward peak) and over all of step 2, with the planner's predictions for that rank: the
   backward peak against activations + communication buffers (+ gradients when a backward ran
   before the peak: gradient accumulation, a pipeline's steady state) -- this checks the
   activation model --, the step peak against the larger of that and the optimizer step
   (gradients + its temporaries).
2. Ranking. The planner's predicted step time (device ``cpu`` of the table: one thread's
   measured matmul rate, gloo's measured alpha-beta, ``cores``, no overlap -- see
   bench/bench_plan_calibrate.py) for the CPU layouts of bench/bench_layouts.py against their
   measured step times (the newest table in RESULTS.md, or ``--measure N`` to time them N times
   again): Spearman rank correlation per repeat and on the medians, next to the same model with
   GPU-like overlap and no time-sharing.

Memory numbers do not depend on the machine's load; step times do.

Run: ``python bench/bench_plan_memory.py --record`` (ranking only: ``--skip-memory --measure 3``)
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
    "cp2": (2, ["--parallel.cp", "2"]),  # ring attention (parallel.cp_method's default)
    "cp2a2a": (2, ["--parallel.cp", "2", "--parallel.cp_method", "alltoall"]),
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),  # ZeRO-3: blocks resharded after forward, the root kept
}


def mem_record(out: Path) -> dict:
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "mem_step_peak_bytes" in rec:
            return rec
    raise RuntimeError("no memory record in metrics.jsonl")


def measure_memory(presets, acs, layouts, cache: str, timeout: float, device: str = "cpu") -> list[str]:
    common = [
        "train",
        "--train.steps",
        "3",
        "--train.eval_interval",
        "0",
        "--train.sample_prompt",
        "",
        "--checkpoint.interval",
        "0",
        "--train.progress",
        "false",
        "--logging.tensorboard",
        "false",
        "--train.device",
        device,
    ]
    lines = [
        "| preset | layout | AC | backward peak MiB measured / predicted | error | step peak MiB measured / "
        "predicted | error | predicted activations MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    errors = []
    with tempfile.TemporaryDirectory(prefix="mf-planmem-") as tmp:
        for preset in presets:
            for name in layouts:
                world, extra = LAYOUT_ARGS[name]
                for ac in acs:
                    out = Path(tmp) / f"{preset}-{name}-{ac}"
                    args = [
                        *common,
                        "--config",
                        preset,
                        *PRESET_ARGS[preset],
                        *extra,
                        "--parallel.activation_checkpointing",
                        ac,
                        "--train.output_dir",
                        str(out),
                    ]
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
                    row = (
                        f"| {preset} | {name} | {ac} | {bwd / 2**20:.1f} / {bwd_pred / 2**20:.1f} | {100 * err:+.1f}% | "
                        f"{step / 2**20:.1f} / {step_pred / 2**20:.1f} | {100 * (step_pred - step) / step:+.1f}% | "
                        f"{rec['mem_predicted_activations'] / 2**20:.1f} |"
                    )
                    print(row, flush=True)
                    lines.append(row)
    if errors:
        lines += ["", f"backward peak: largest |error| {100 * max(errors):.1f}% over {len(errors)} runs"]
    return lines


def recorded_layout_times() -> dict[str, float]:
    """Median ms/step per layout name from the newest 'Parallel layouts (CPU)' table of RESULTS.md."""
    text = RESULTS.read_text()
    section = text[text.index("## Parallel layouts (CPU)") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    entries = section.split("\n### ")
    out = {}
    for row in entries[-1].splitlines():
        m = re.match(r"\| (.+?) \| (\d+) \| ([\d.]+) \|", row)
        if m:
            out[m.group(1)] = float(m.group(3)) / 1e3
    return out


def measure_layouts(repeats: int, cache: str, timeout: float) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Median step time (s) per layout name, once per repeat (7 steps, median of the last 4), and the
    fastest of those steps over all repeats (the least disturbed by other processes)."""
    common = [
        "train",
        "--config",
        "small",
        "--train.steps",
        "7",
        "--train.eval_interval",
        "0",
        "--train.sample_prompt",
        "",
        "--checkpoint.interval",
        "0",
        "--train.progress",
        "false",
        "--logging.tensorboard",
        "false",
        "--train.device",
        "cpu",
    ]
    runs, fastest = [], {}
    with tempfile.TemporaryDirectory(prefix="mf-planrank-") as tmp:
        for r in range(repeats):
            measured = {}
            for i, (name, world, extra, _) in enumerate(LAYOUTS):
                out = Path(tmp) / f"r{r}l{i}"
                run_ranks(world, [*common, "--train.output_dir", str(out), *extra], timeout, {"MESHFORGE_CACHE": cache})
                st = sorted(step_times(out)[3:])
                measured[name] = st[len(st) // 2]
                fastest[name] = min(fastest.get(name, st[0]), st[0])
                print(
                    f"repeat {r + 1}: {name}: {measured[name] * 1e3:.1f} ms/step (fastest {st[0] * 1e3:.1f})",
                    flush=True,
                )
            runs.append(measured)
    return runs, fastest


def ranking(repeats: int, cache: str, timeout: float, device: str = "cpu") -> list[str]:
    """Spearman rank correlation of predicted and measured step times, per repeat and of the medians.

    Predicted twice: with the device entry (``cpu``: calibrated one-thread rate and gloo link, ranks
    time-sharing the cores, no overlap of data-parallel traffic) and with the same entry made
    GPU-like (``cores = 0``, ``comm_overlap = true``), to show what those two CPU facts change."""
    import dataclasses
    import statistics

    from scipy.stats import spearmanr

    from meshforge.config import load_config
    from meshforge.plan.devices import get_device
    from meshforge.plan.planner import layout_of_config
    from meshforge.plan.time_model import estimate_time

    cpu = get_device(device)
    gpu_like = dataclasses.replace(cpu, cores=0, comm_overlap=True)
    if repeats:
        runs, fastest = measure_layouts(repeats, cache, timeout)
        source = f"measured now, {repeats} repeat(s) of 7 steps (median of the last 4 each)"
    else:
        runs, fastest = [recorded_layout_times()], {}
        source = "RESULTS.md (newest 'Parallel layouts (CPU)' entry)"
    names = [n for n, *_ in LAYOUTS if all(n in r for r in runs)]
    jobs = [(n, w, load_config("small", [*x, "--train.device", "cpu"])) for n, w, x, _ in LAYOUTS if n in names]

    def predict(dev) -> list[float]:
        return [estimate_time(cfg, layout_of_config(cfg, w), dev, gpus_per_node=w).step_s for _, w, cfg in jobs]

    pred, plain = predict(cpu), predict(gpu_like)
    med = [statistics.median(r[n] for r in runs) for n in names]
    rows = [
        f"| layout | ranks | measured ms/step: median (min – max over repeats) | predicted ms/step ({device}) | "
        "predicted, GPU-like overlap and no time-sharing |",
        "|---|---:|---:|---:|---:|",
    ]
    for (name, world, _), t, t0 in zip(jobs, pred, plain):
        ms = [r[name] * 1e3 for r in runs]
        rows.append(
            f"| {name} | {world} | {statistics.median(ms):.1f} ({min(ms):.1f} – {max(ms):.1f}) | "
            f"{t * 1e3:.1f} | {t0 * 1e3:.1f} |"
        )

    def rho(a, b) -> str:
        return f"{spearmanr(a, b).statistic:+.2f}"

    per = ", ".join(rho([r[n] for n in names], pred) for r in runs)
    per_plain = ", ".join(rho([r[n] for n in names], plain) for r in runs)
    # the latency is the least certain input (bench_plan_calibrate.py measured 0-18 ms under load)
    sens = ", ".join(
        f"{lat * 1e3:g} ms: " + rho(med, predict(dataclasses.replace(cpu, nvlink_latency=lat, internode_latency=lat)))
        for lat in (1e-3, 2e-3, 1e-2)
    )
    rows += [
        "",
        f"step times: {source}; Spearman rank correlation, predicted vs measured over {len(names)} "
        f"layouts: {rho(med, pred)} on the medians, per repeat {per}; GPU-like model: {rho(med, plain)} "
        f"on the medians, per repeat {per_plain}",
        *(
            [
                f"fastest step of each layout over all repeats (least disturbed by the load): Spearman "
                f"{rho([fastest[n] for n in names], pred)} (GPU-like {rho([fastest[n] for n in names], plain)}); "
                "ms " + ", ".join(f"{n.split(' (')[0]} {fastest[n] * 1e3:.0f}" for n in names)
            ]
            if fastest
            else []
        ),
        f"with the {device} entry's latency ({cpu.nvlink_latency * 1e3:g} ms) replaced by {sens} "
        "(Spearman on the medians)",
    ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["small", "llama-100m"])
    ap.add_argument("--ac", nargs="*", default=["none", "selective", "full"])
    ap.add_argument("--layouts", nargs="*", default=["single", "tp2", "pp2"], choices=list(LAYOUT_ARGS))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the same runs on GPUs (peak allocated above rest)")
    ap.add_argument(
        "--measure",
        type=int,
        default=0,
        metavar="REPEATS",
        help="time the bench_layouts layouts again, this many times (0: the newest table in RESULTS.md)",
    )
    ap.add_argument("--rank-device", default="cpu", help="device entry the ranking prices with (cpu)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument(
        "--cache",
        default=os.environ.get("MESHFORGE_CACHE") or str(Path(tempfile.gettempdir()) / "meshforge-bench-cache"),
    )
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    from meshforge.data_pipeline.builtin import ensure_builtin

    ensure_builtin("shakespeare", args.cache, 2048, progress=False)
    start = loadavg()
    lines = []
    if not args.skip_memory:
        lines += [
            f"Memory ({args.device}): rank 0, peak {'RSS' if args.device == 'cpu' else 'allocated'} in step 2 above the value after step 1 (3 steps of `meshforge train`, fp32, "
            "OMP_NUM_THREADS=1, MALLOC_MMAP_THRESHOLD_=65536); small: global batch 16 x 128, untied; "
            "llama-100m: global batch 4 x 256, micro-batch 2; pp2: 1F1B, 2 microbatches",
            "",
            *measure_memory(args.presets, args.ac, args.layouts, args.cache, args.timeout, args.device),
            "",
        ]
    lines += [
        "Ranking (small preset, the layouts of bench/bench_layouts.py):",
        "",
        *ranking(args.measure, args.cache, args.timeout, args.rank_device),
    ]
    lines += [
        "",
        f"load average at start / end: {start} / {loadavg()} (the machine is shared by several engineers: "
        "step times are loaded, memory numbers are not affected)",
    ]
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
