"""The GPU check's report: the machine it ran on, and its results as a section for bench/RESULTS.md."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

SECTION = "## GPU check (bench/gpu_check/gpu_check.sh)"
PACKAGES = ("torch", "triton", "transformers", "torchao", "liger-kernel", "numpy")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """CPU, GPU, driver and the package versions that matter."""
    import torch
    from benchlib import cpu_model

    info = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "packages": {p: _version(p) for p in PACKAGES},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
        try:
            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
    return info


def machine_line(m: dict) -> str:
    gpu = (
        f"GPU {m['gpu_count']} x {m['gpu']} ({m['gpu_mem_gib']} GiB, {m['sms']} SMs, sm_{m['capability'].replace('.', '')}), "
        f"driver {m.get('driver', '?')}, CUDA {m['cuda']}; "
        if "gpu" in m
        else "no GPU (dry run on the CPU); "
    )
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return f"machine: {gpu}{m['cpu']}, {m['platform']}; python {m['python']}, {pkgs}"


def _num(v, fmt: str = ".3g") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _params(n) -> str:
    if not isinstance(n, (int, float)) or not n:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:,.0f}M" if n >= 1e6 else f"{n / 1e3:,.0f}K"


def _gib(b) -> str:
    return f"{b / 2**30:.1f}" if isinstance(b, (int, float)) else "n/a"


def markdown(report: dict) -> list[str]:
    """The results as a dated entry under SECTION (the ``###`` heading names the command)."""
    m, cases = report["machine"], report["cases"]
    lines = [
        SECTION,
        "",
        f"### {m['date'][:10]} — `{report['command']}`",
        "",
        machine_line(m),
        "",
        f"{len(cases)} cases in {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget"
        + (" (**dry run**: CPU, tiny shapes; the figures prove the plumbing, not speed)" if report["dry"] else "")
        + ".",
        "",
    ]
    correct = [c for c in cases if c["kind"] == "correctness"]
    if correct:
        lines += ["**Correctness**", "", "| case | status | check | measured | tolerance |", "|---|---|---|---:|---:|"]
        for c in correct:
            if not c.get("checks"):
                lines.append(f"| {c['name']} | {c['status']} | {c.get('reason', '')} | | |")
            for k in c.get("checks", []):
                lines.append(
                    f"| {c['name']} | {'pass' if k['pass'] else '**FAIL**'} | {k['what']} | "
                    f"{_num(k['value'])} | {_num(k['tol'])} |"
                )
        lines += [""] + [f"- {c['name']}: {c['what']}" + (f" ({c['note']})" if c.get("note") else "") for c in correct]
        lines.append("")
    speed = [c for c in cases if c["kind"] in ("speed", "peer")]
    if speed:
        lines += [
            "**Speed** (median step time of the timed steps after the warm-up steps, compile included there; "
            "MFU against the dense bf16 peak; peak memory = max allocated)",
            "",
            "| case | status | params (active) | micro batch | tokens/step | tokens/s | TFLOP/s | MFU | "
            "peak mem GiB | loss first → last |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in speed:
            f = c.get("figures", {})
            if c["status"] not in ("ok", "failed") or "tokens_per_s" not in f:
                lines.append(f"| {c['name']} | {c['status']} | {c.get('reason', '')} ||||||||")
                continue
            mfu = f"{100 * f['mfu']:.1f}%" if isinstance(f.get("mfu"), float) else "n/a"
            lines.append(
                f"| {c['name']} | {c['status']} | {_params(f.get('params'))} | {f.get('micro_batch', '')} | "
                f"{f.get('tokens_per_step', 0):,} | {f['tokens_per_s']:,.0f} | {_num(f.get('tflops', 'n/a'), '.0f')} "
                f"| {mfu} | {_gib(f.get('peak_mem_bytes'))} | {_num(f.get('loss_first'), '.2f')} → "
                f"{_num(f.get('loss_last'), '.2f')} |"
            )
        lines += [""] + [f"- {c['name']}: {c['what']}" + (f" ({c['note']})" if c.get("note") else "") for c in speed]
        lines.append("")
    for c in (c for c in cases if c["kind"] == "kernels" and c["status"] in ("ok", "failed")):
        f = c["figures"]
        lines += [
            f"**Kernels** ({c.get('note', '')}): forward + backward ms",
            "",
            "| case | kernel | implementation | ms |",
            "|---|---|---|---:|",
        ]
        lines += [
            f"| {c['name']} | {k.split('/')[0]} | {k.split('/')[1]} | {v:.3f} |"
            for k, v in f.items()
            if k.endswith("/fwd_bwd_ms")
        ]
        lines += [
            "",
            "fastest: " + ", ".join(f"{k.split('/')[0]} {v}" for k, v in f.items() if k.endswith("/fastest")),
            "",
        ]
    peer = next((c for c in cases if c["kind"] == "peer" and "ratio" in c.get("figures", {})), None)
    if peer:
        f = peer["figures"]
        lines += [
            f"**Peer**: meshforge {f['meshforge_tokens_per_s']:,.0f} tokens/s vs the transformers "
            f"LlamaForCausalLM bare loop {f['tokens_per_s']:,.0f} tokens/s at the same batch: "
            f"**{f['ratio']:.2f}x** (goal ≥ 1.2x).",
            "",
        ]
    plan = [c for c in cases if "mem_predicted_backward" in c.get("figures", {})]
    if plan:
        lines += [
            "**Planner memory prediction vs measured** (step 2; GiB; 'above rest' = peak above the memory at "
            "rest after step 1, i.e. activations + transients; error = predicted / measured - 1)",
            "",
            "| case | peak allocated: measured / predicted | up to the optimizer step above rest: measured / "
            "predicted (activations + buffers) | error | within 15% |",
            "|---|---:|---:|---:|---|",
        ]
        for c in plan:
            f = c["figures"]
            err = f.get("mem_backward_rel_err")
            lines.append(
                f"| {c['name']} | {_gib(f.get('mem_peak_bytes'))} / {_gib(f.get('mem_predicted_total'))} | "
                f"{_gib(f.get('mem_backward_peak_bytes'))} / {_gib(f.get('mem_predicted_backward'))} | "
                f"{_num(err, '+.1%') if isinstance(err, float) else 'n/a'} | "
                f"{'yes' if isinstance(err, float) and abs(err) <= 0.15 else 'no'} |"
            )
        lines.append("")
    other = [c for c in cases if c["status"] in ("skipped", "error", "timeout") and c["kind"] != "correctness"]
    if other:
        lines += ["**Not measured**", ""] + [f"- {c['name']} ({c['status']}): {c.get('reason', '')}" for c in other]
        lines.append("")
    return lines


def record_from(path: Path, results: Path | None = None) -> Path:
    """Append the entry of a gpu_check.json to RESULTS.md under SECTION (the section made if missing)."""
    from benchlib import RESULTS, insert_entry

    results = results or RESULTS
    lines = markdown(json.loads(Path(path).read_text()))
    insert_entry(SECTION, ["", *lines[2:]], results)  # the section heading is insert_entry's
    return results
