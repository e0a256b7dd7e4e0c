"""bench/gpu_check/gpu_check.sh: the --dry run exercises every case on the CPU; time caps, crashes, options
this build lacks and the report are handled as the GPU run will need them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "bench" / "gpu_check"), str(REPO / "bench")]

import gpu_check  # noqa: E402
import gpu_check_lib  # noqa: E402
import gpu_check_report  # noqa: E402

# Cases whose skip on a CPU is expected, with what the reason must say.
CPU_SKIPS = {
    "1b-float8": ("option not available in this build", "needs the Python package", "does not run on the CPU"),
    "float8_loss": ("option not available in this build", "needs the Python package", "does not run on the CPU"),
    "1b-fused-kernels": ("option not available in this build", "does not run on the CPU"),
    "grouped_mm": ("does not run on the CPU", "has no torch._grouped_mm"),
    "peer": ("needs the Python package",),
    "peers": ("needs the Python package",),
    "kernels": ("needs the Python package",),
}


def _run(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MESHFORGE_CACHE": os.environ.get("MESHFORGE_CACHE", str(tmp_path / "cache")),
    }
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check" / "gpu_check.sh"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dry_run_exercises_every_case(tmp_path):
    p = _run(tmp_path, "--dry", "--out", "tmp")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "tmp" / "gpu_check.json").read_text())
    assert report["dry"] is True and report["machine"]["packages"]["torch"]
    by_name = {c["name"]: c for c in report["cases"]}
    assert list(by_name) == gpu_check_lib.DEFAULT  # every case, in order, once
    for name, c in by_name.items():
        assert c["status"] in ("ok", "skipped"), (name, c)
        if c["status"] == "skipped":
            assert any(why in c["reason"] for why in CPU_SKIPS.get(name, ())), (name, c["reason"])
            continue
        figures = c["figures"]
        assert figures and all(isinstance(v, (int, float, str, bool)) for v in figures.values()), (name, figures)
        assert c["checks"] and all(k["pass"] for k in c["checks"]), (name, c["checks"])
        if c["kind"] in ("speed", "peer"):
            assert figures["tokens_per_s"] > 0 and figures["tokens_per_step"] > 0, name
    for name in (
        "compile",
        "bf16",
        "flex_doc_mask",
        "fused_loss",
        "1b",
        "1b-fused-loss",
        "compile_model",
        "moe",
        "t5-base",
        "cp2",
    ):
        assert by_name[name]["status"] == "ok", by_name[name]  # nothing the CPU can run was skipped
    assert by_name["1b-fused-loss"]["figures"]["fused_loss"] != by_name["1b"]["figures"]["fused_loss"]
    whole = by_name["compile_model"]  # compiled in the dry run too (Dynamo's eager backend), checked against 1b
    assert whole["figures"]["speedup_vs_1b"] > 0 and any("first-step loss" in k["what"] for k in whole["checks"])
    if by_name["peers"]["status"] == "ok":  # bench_peers.py's comparison: meshforge and the HF loop, same parameters
        peers = by_name["peers"]["figures"]
        assert peers["eager_hf_ratio"] == pytest.approx(peers["eager_hf_s"] / peers["eager_meshforge_s"])
    if by_name["peer"]["status"] == "ok":
        peer = by_name["peer"]["figures"]
        assert peer["ratio"] == pytest.approx(by_name["1b"]["figures"]["tokens_per_s"] / peer["tokens_per_s"])
    md = (tmp_path / "tmp" / "gpu_check.md").read_text()
    assert md.startswith(gpu_check_report.SECTION) and "dry run" in md
    assert all(f"| {name} |" in md for name in by_name)
    assert (tmp_path / "tmp" / "gpu_check.log").stat().st_size > 0


def test_a_hang_costs_its_cap_and_a_crash_its_case(tmp_path):
    p = _run(tmp_path, "--dry", "--out", "o", "--only", "selftest-hang,selftest-crash", timeout=120)
    assert p.returncode == 1  # not ok: a timeout and an error
    cases = {c["name"]: c for c in json.loads((tmp_path / "o" / "gpu_check.json").read_text())["cases"]}
    cap = gpu_check_lib.BY_NAME["selftest-hang"].dry_cap_s
    assert cases["selftest-hang"]["status"] == "timeout" and "cap" in cases["selftest-hang"]["reason"]
    assert cap <= cases["selftest-hang"]["wall_s"] < cap + 10
    assert cases["selftest-crash"]["status"] == "error"  # ran in a fresh worker after the hang was killed
    assert "status 7" in cases["selftest-crash"]["reason"]


def test_no_cuda_without_dry_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "o")])
    assert gpu_check.main() == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry" in err
    assert not (tmp_path / "o").exists()


def test_options_and_packages_this_build_lacks_are_skipped(monkeypatch):
    assert gpu_check.option_available("train.fused_loss") and gpu_check.option_available("parallel.compile")
    assert not gpu_check.option_available("train.no_such_option")
    assert not gpu_check.option_available("nosection.key")
    fake = {
        "opt": gpu_check_lib.Case("opt", "speed", "m:f", 1, "x", option=("train.no_such_option", "on")),
        "pkg": gpu_check_lib.Case("pkg", "speed", "m:f", 1, "x", needs=("no_such_module_4711",)),
        "fine": gpu_check_lib.Case("fine", "speed", "m:f", 1, "x", option=("train.fused_loss", "on")),
    }
    monkeypatch.setattr(gpu_check, "BY_NAME", fake)
    assert gpu_check.pre_skip("opt") == "option not available in this build (no config key train.no_such_option)"
    assert "no_such_module_4711" in gpu_check.pre_skip("pkg")
    assert gpu_check.pre_skip("fine") is None


def test_the_gpu_jobs_are_valid_configs():
    """What only the GPU run builds: every speed job's config as the GPU run loads it (the CPU
    cannot run them; a wrong key or value must not wait for a GPU to show)."""
    import gpu_check_speed as speed

    from meshforge.config import load_config
    from meshforge.config.sections import ConfigError

    for name, (preset, overrides, micro) in speed.GPU_JOBS.items():
        cfg = load_config(
            preset,
            [
                *speed.QUIET_TRAIN,
                *overrides,
                "--train.global_batch_size",
                str(micro),
                "--train.micro_batch_size",
                str(micro),
                "--train.device",
                "cuda",
            ],
        )
        assert cfg.parallel.compile == "on" and cfg.parallel.ep == 1, name
    one_b = load_config("llama-1b", list(speed.LLAMA_1B))
    assert not one_b.model.qk_norm and one_b.data.seq_len == 4096 and not one_b.model.tie_embeddings
    load_config("llama-1b", [*speed.LLAMA_1B, "--train.fused_loss", "on"])
    with pytest.raises(ConfigError, match="unknown config key"):  # what an option this build lacks looks like
        load_config("llama-1b", ["--train.no_such_option", "on"])


def test_on_a_gpu_each_measurement_gets_a_fresh_worker():
    names = ["compile", "bf16", "1b", "peer", "fused_loss"]
    assert gpu_check.worker_groups(names, dry=True) == [names]
    assert gpu_check.worker_groups(names, dry=False) == [["compile", "bf16", "fused_loss"], ["1b"], ["peer"]]


def _gpu_report() -> dict:
    machine = {
        "cpu": "x",
        "platform": "Linux",
        "python": "3.12.3",
        "cuda": "13.0",
        "date": "2026-12-03 10:00 UTC",
        "packages": {"torch": "2.11.0"},
        "gpu": "NVIDIA H200",
        "gpu_count": 1,
        "gpu_mem_gib": 139.8,
        "sms": 132,
        "capability": "9.0",
        "driver": "580",
    }
    one_b = {
        "name": "1b",
        "kind": "speed",
        "what": "w",
        "status": "ok",
        "wall_s": 60,
        "figures": {
            "params": 1.07e9,
            "micro_batch": 4,
            "tokens_per_step": 16384,
            "tokens_per_s": 50000.0,
            "tflops": 400.0,
            "mfu": 0.404,
            "peak_mem_bytes": 60 * 2**30,
            "loss_first": 10.4,
            "loss_last": 9.9,
            "mem_predicted_backward": 40 * 2**30,
            "mem_backward_peak_bytes": 44 * 2**30,
            "mem_backward_rel_err": 40 / 44 - 1,
        },
        "checks": [gpu_check_lib.check("non-finite losses", 0, 0)],
    }
    peer = {
        "name": "peer",
        "kind": "peer",
        "what": "w",
        "status": "ok",
        "wall_s": 50,
        "figures": {
            "tokens_per_s": 40000.0,
            "meshforge_tokens_per_s": 50000.0,
            "ratio": 1.25,
            "params": 1.07e9,
            "tokens_per_step": 16384,
        },
        "checks": [],
    }
    skipped = {"name": "cp2", "kind": "speed", "what": "w", "status": "skipped", "wall_s": 0, "reason": "needs 2 GPUs"}
    bad = {
        "name": "compile",
        "kind": "correctness",
        "what": "w",
        "status": "failed",
        "wall_s": 9,
        "figures": {},
        "checks": [gpu_check_lib.check("losses", 0.5, 2e-3)],
    }
    return {
        "command": "bash bench/gpu_check/gpu_check.sh",
        "dry": False,
        "budget_s": 450,
        "wall_s": 400,
        "machine": machine,
        "cases": [bad, one_b, peer, skipped],
    }


def test_report_renders_gpu_figures_and_records_into_results(tmp_path):
    md = "\n".join(gpu_check_report.markdown(_gpu_report()))
    assert "NVIDIA H200" in md and "sm_90" in md and "CUDA 13.0" in md
    assert "| compile | **FAIL** | losses | 0.5 | 0.002 |" in md
    assert "| 1b | ok | 1.07B | 4 | 16,384 | 50,000 | 400 | 40.4% | 60.0 |" in md
    assert "**1.25x**" in md and "cp2 (skipped): needs 2 GPUs" in md
    assert "| 1b | n/a / n/a | 44.0 / 40.0 | -9.1% | yes |" in md
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    src = tmp_path / "gpu_check.json"
    src.write_text(json.dumps(_gpu_report()))
    gpu_check_report.record_from(src, results)
    text = results.read_text()
    assert "## Other\n\nkept\n" in text and text.count(gpu_check_report.SECTION) == 1
    assert "### 2026-12-03 — `bash bench/gpu_check/gpu_check.sh`" in text
