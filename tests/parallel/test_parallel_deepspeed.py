"""The DeepSpeed engine backend (ZeRO-1/2/3, optimizer offload) against the single-process run.

Every run is real: two `meshforge train` ranks on DeepSpeed's CPU accelerator over gloo,
in fp32. Final weights come from the consolidated fp32 copy each DeepSpeed checkpoint
carries (read by `parallel_harness.read_result` like any other checkpoint).
"""

import json
import shutil

import pytest

from meshforge.cli import main as cli_main
from parallel_harness import PARITY_ARGS, assert_parity, read_result, run_ranks, train_layout

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[test]')")

DS = ("--parallel.dp_backend", "deepspeed")


def _zero(stage: int, *extra: str) -> tuple[str, ...]:
    return (*DS, "--parallel.zero_stage", str(stage), *extra)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_single_process(stage, tiny_data, single_process_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / f"zero{stage}", 2, *_zero(stage))
    assert_parity(single_process_ref, got)
    assert (got.output_dir / "checkpoints" / "step_00000010" / "deepspeed").is_dir()


def _cpu_adam_buildable() -> str:
    """Empty when DeepSpeedCPUAdam's C++ op loads (JIT-building it once, cached), else why not."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # a missing compiler or headers: say exactly what failed
        return f"DeepSpeedCPUAdam's op cannot be built here: {type(e).__name__}: {e}"
    return ""


@pytest.mark.slow  # first use JIT-builds DeepSpeed's cpu_adam extension (minutes on 2 cores)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_cpu_optimizer_offload_matches_single_process(stage, tiny_data, single_process_ref, tmp_path):
    reason = _cpu_adam_buildable()
    if reason:
        pytest.skip(reason)
    got = train_layout(tiny_data, tmp_path / f"offload{stage}", 2, *_zero(stage, "--parallel.offload_optimizer", "cpu"))
    assert_parity(single_process_ref, got)


def _losses_by_step(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_zero2_resume_continues_exactly(tiny_data, tmp_path):
    """A 10-step ZeRO-2 run killed after its step-5 checkpoint (mid-way through writing step 10)
    and resumed equals the uninterrupted run, bit for bit."""
    args = [
        "train",
        *PARITY_ARGS,
        *_zero(2),
        "--checkpoint.interval",
        "5",
        "--checkpoint.keep_last",
        "3",
        "--data.path",
        str(tiny_data),
    ]
    whole = tmp_path / "whole"
    run_ranks(2, [*args, "--train.output_dir", str(whole)])
    full = read_result(whole)

    # what a kill during the step-10 save leaves: step 5 complete, step 10 half-written, metrics up to 10
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    partial = cut / "checkpoints" / "step_00000010.tmp"
    (cut / "checkpoints" / "step_00000010").rename(partial)
    (partial / "meta.json").unlink()
    run_ranks(2, [*args, "--train.output_dir", str(cut)])
    resumed = read_result(cut)
    assert not partial.exists()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]

    steps = _losses_by_step(cut)
    assert sorted(steps) == list(range(1, 11))
    assert steps == _losses_by_step(whole)
    assert full.params.keys() == resumed.params.keys()
    for name, p in full.params.items():
        assert resumed.params[name].equal(p), name


def _fail_before_process_groups(tmp_path, capsys, monkeypatch, *args) -> str:
    # A world of 2 with nobody else running: creating a process group would hang, so
    # returning at all proves the check came first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    code = cli_main(["train", "--config", "tiny-test", "--train.output_dir", str(out), *DS, *args])
    assert code == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--parallel.offload_param", "cpu", "--parallel.zero_stage", "2"),
            "parallel.offload_param = 'cpu' needs ZeRO stage 3",
        ),
        (("--parallel.offload_optimizer", "nvme", "--parallel.zero_stage", "3"), "needs parallel.nvme_path"),
        (
            ("--parallel.offload_optimizer", "nvme", "--parallel.zero_stage", "1", "--parallel.nvme_path", "/tmp"),
            "parallel.offload_optimizer = 'nvme' needs ZeRO stage 3",
        ),
        (
            ("--parallel.offload_param", "nvme", "--parallel.zero_stage", "3", "--parallel.nvme_path", "/no/such/dir"),
            "is not an existing directory",
        ),
        (("--parallel.fsdp_cpu_offload", "true"), "is a setting of parallel.dp_backend = 'fsdp2'"),
    ],
)
def test_bad_deepspeed_config_fails_before_process_groups(args, message, tiny_data, tmp_path, capsys, monkeypatch):
    err = _fail_before_process_groups(tmp_path, capsys, monkeypatch, "--data.path", str(tiny_data), *args)
    assert message in err


def test_missing_deepspeed_is_a_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    err = _fail_before_process_groups(tmp_path, capsys, monkeypatch, "--data.path", str(tiny_data))
    assert "DeepSpeed is not installed" in err and "pip install deepspeed" in err


def test_fsdp_checkpoint_is_not_resumed_by_deepspeed(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run_ranks(
        1, ["train", *PARITY_ARGS, "--train.steps", "2", "--data.path", str(tiny_data), "--train.output_dir", str(out)]
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = cli_main(["train", *PARITY_ARGS, "--data.path", str(tiny_data), "--train.output_dir", str(out), *DS])
    assert code == 2
    assert (
        "written with parallel.dp_backend = 'fsdp2' and cannot be resumed with 'deepspeed'" in capsys.readouterr().err
    )


def test_moe_metrics_match_fsdp2_names_and_values(tiny_data, tmp_path):
    """An MoE model on the DeepSpeed engine reports the same router metrics (names and values) as FSDP2
    on the same 2 ranks: the statistics are read from the engine's module, not the engine."""
    from meshforge.pretrain.metrics import read_metrics

    moe = ("--model.moe_experts", "4", "--model.moe_top_k", "2", "--train.steps", "3")
    runs = {}
    for name, extra in (("fsdp2", ()), ("deepspeed", _zero(1))):
        out = tmp_path / name
        run_ranks(
            2, ["train", *PARITY_ARGS, "--data.path", str(tiny_data), "--train.output_dir", str(out), *moe, *extra]
        )
        runs[name] = [{k: v for k, v in r.items() if k.startswith("moe_")} for r in read_metrics(out) if "loss" in r]
    assert any(k.startswith("moe_load_max/") for k in runs["fsdp2"][0])  # per-layer metrics exist
    assert [sorted(r) for r in runs["deepspeed"]] == [sorted(r) for r in runs["fsdp2"]]
    assert not any("module." in k for r in runs["deepspeed"] for k in r)
    for ds, fs in zip(runs["deepspeed"], runs["fsdp2"]):
        assert ds == pytest.approx(fs, rel=1e-4, abs=1e-6)


def test_one_process_without_a_launcher(tiny_data, tmp_path):
    """`meshforge train` with the DeepSpeed backend as a plain process (no torchrun: no LOCAL_RANK, which
    DeepSpeed asserts on) trains and checkpoints."""
    import os
    import subprocess
    import sys

    from parallel_harness import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    out = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshforge",
            "train",
            *PARITY_ARGS,
            "--data.path",
            str(tiny_data),
            "--train.output_dir",
            str(out),
            "--train.steps",
            "2",
            *_zero(1),
        ],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "checkpoints" / "step_00000002" / "deepspeed").is_dir()
