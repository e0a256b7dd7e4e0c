"""What the benchmark scripts share: the machine line and appending a dated entry to RESULTS.md."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"

# train overrides that switch off what a timed run should not do: evaluation, samples, TensorBoard, the progress
# line, periodic checkpoints
QUIET_TRAIN = (
    "--train.eval_interval",
    "0",
    "--train.sample_prompt",
    "",
    "--logging.tensorboard",
    "false",
    "--train.progress",
    "false",
    "--checkpoint.interval",
    "0",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    """The 1/5/15-minute load averages, to show how quiet the machine was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_line() -> str:
    """CPU, GPU (when present) and the versions that matter, on one line."""
    gpu = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (
            f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
            f"CUDA {torch.version.cuda}"
        )
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}{gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    )


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def record(section: str, lines: list[str], results: Path = RESULTS) -> None:
    """Append a dated entry (command, machine, ``lines``) under ``section`` of ``results``, atomically."""
    entry = ["", f"### {time.strftime('%Y-%m-%d')} — `{command_line()}`", "", machine_line(), "", *lines, ""]
    insert_entry(section, entry, results)


def insert_entry(section: str, entry: list[str], results: Path = RESULTS) -> None:
    """Put the lines ``entry`` at the end of ``section`` of ``results`` (made if missing), atomically."""
    text = (
        results.read_text()
        if results.exists()
        else "# Benchmark results\n\nNumbers recorded by the scripts in `bench/`.\n"
    )
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    start = text.index(section)
    nxt = text.find("\n## ", start + 1)
    end = len(text) if nxt == -1 else nxt + 1
    text = text[:end].rstrip("\n") + "\n" + "\n".join(entry) + "\n" + text[end:]
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, results)
