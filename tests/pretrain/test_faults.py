"""Fault-handling building blocks: preemption flag, non-finite guard, spike detector."""

import math
import os
import signal
import time

import torch

from meshforge.pretrain.faults import (
    PREEMPTED_MARKER_ENV,
    NonFiniteGuard,
    PreemptionWatcher,
    SpikeDetector,
    TrainingDiverged,
)


def test_preemption_watcher_catches_sigterm_and_restores_the_handler():
    w = PreemptionWatcher()
    try:
        assert w.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.received == signal.SIGTERM
    finally:
        w.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# Each rank: a real TrainStep (the base class the backends share) whose stop signal is this rank's
# PreemptionWatcher; the trainer's path for the flag is with_stop_flag -> the loss all_mean -> read_scalars.
_AGREEMENT_RANK = """
import os, signal, sys
import torch, torch.distributed as dist
from meshforge.config import load_config
from meshforge.parallel.mesh import Degrees
from meshforge.pretrain.faults import CollectiveWatch, NonFiniteGuard, PreemptionWatcher
from meshforge.pretrain.step import StepSetup, TrainStep

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
watcher = PreemptionWatcher()
setup = StepSetup(cfg=load_config("tiny-test"), degrees=Degrees(1, 1, world, 1, 1, 1), mesh=None,
                  device=torch.device("cpu"), objective=None, collectives=CollectiveWatch(rank, world, 60.0),
                  nonfinite=NonFiniteGuard(3), fused_loss=False, stop_signal=lambda: watcher.received is not None)
model = torch.nn.Linear(2, 2)
step = TrainStep(setup, model, torch.optim.SGD(model.parameters(), lr=0.1))
seen = []
for n in range(1, 4):
    if n == 2 and rank == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGTERM)
    losses = torch.tensor([1.0 + rank, 0.5])
    record = step.read_scalars(step.all_mean(step.with_stop_flag(losses), f"the loss at step {n}"), None)
    seen.append(f"{int(step.stop_requested)}:{record['loss']}:{record['z_loss']}")
print(" ".join(seen))
dist.destroy_process_group()
"""


def test_one_ranks_signal_stops_every_rank_through_the_loss_reduction(tmp_path):
    """Rank 1 alone gets SIGTERM before step 2: from step 2 on every rank reads stop_requested, and the
    flag riding along leaves the reduced losses as they were."""
    import subprocess

    from parallel_harness import start_ranks

    script = tmp_path / "rank.py"
    script.write_text(_AGREEMENT_RANK)
    procs = start_ranks(2, ["1"], script=[str(script)], stdout=subprocess.PIPE)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
        outs.append(out.decode().split())
    assert outs == [["0:1.5:0.5", "1:1.5:0.5", "1:1.5:0.5"]] * 2


def test_non_finite_guard_counts_streaks_and_stops_after_the_limit():
    g = NonFiniteGuard(max_consecutive=3)
    assert g.check(1, 2.0, 1.0)
    assert not g.check(2, math.nan, 1.0)
    assert not g.check(3, 2.0, math.inf)
    assert g.check(4, 2.0, 1.0) and g.consecutive == 0  # a good step resets the count
    assert not g.check(5, math.nan, math.nan)
    assert not g.check(6, math.nan, math.nan)
    assert not g.diverged
    assert not g.check(7, math.nan, 1.0)  # the step that ends the streak is still a (skipped) step
    assert g.diverged and g.total_skipped == 5
    err = g.diverged_error("runs/x/checkpoints/step_00000004")
    assert isinstance(err, TrainingDiverged)
    assert "3 consecutive steps with non-finite" in str(err) and "(steps 5-7;" in str(err)
    assert "the newest checkpoint, runs/x/checkpoints/step_00000004, is from before them" in str(err)
    assert "no checkpoint was written before them" in str(g.diverged_error(None))
    ds = NonFiniteGuard(max_consecutive=5)  # a backend that cannot skip (DeepSpeed) stops after the step's record
    ds.stop_after_this_step("non-finite loss nan at step 3 under the DeepSpeed engine")
    assert ds.diverged and str(ds.diverged_error("c/step_00000002")).endswith(
        "; the newest checkpoint is c/step_00000002"
    )


def test_spike_detector():
    d = SpikeDetector(window=20, sigmas=4.0, min_history=5)
    flags = [d.update(3.0 + 0.01 * (i % 3)) for i in range(20)]
    assert not any(flags)
    assert d.update(5.0)
    assert not d.update(3.01)


# --------------------------------------------------------------------------- in the trainer

from meshforge.config import load_config  # noqa: E402
from meshforge.pretrain import trainer as trainer_mod  # noqa: E402
from meshforge.pretrain.checkpoint import list_checkpoints, load_model_weights  # noqa: E402
from meshforge.pretrain.metrics import read_metrics  # noqa: E402
from meshforge.pretrain.step import TrainStep  # noqa: E402
from parallel_harness import PARITY_ARGS, read_result, start_ranks  # noqa: E402


def _change_training_loss(monkeypatch, change) -> None:
    """Call ``change(parts, step)`` on the loss of every training micro-batch (``step``: 1-based)."""
    running = {}
    original_step, original_loss = trainer_mod.Trainer.train_step, TrainStep.microbatch_loss

    def train_step(self):
        running["step"] = self.step + 1
        return original_step(self)

    def microbatch_loss(self, model, batch):
        parts = original_loss(self, model, batch)
        if model.training:
            change(parts, running["step"])
        return parts

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", train_step)
    monkeypatch.setattr(TrainStep, "microbatch_loss", microbatch_loss)


def _poison(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss (and so every gradient) NaN on the given 1-based steps."""

    def nan(parts, step):
        if step in bad_steps:
            parts.total = parts.total * float("nan")
            parts.ce = parts.ce * float("nan")

    _change_training_loss(monkeypatch, nan)


def _weights(ckpt):
    from meshforge.config import config_from_dict
    from meshforge.models import build_model
    from meshforge.pretrain.checkpoint import read_meta

    model = build_model(config_from_dict(read_meta(ckpt)["config"]).model, "cpu")
    load_model_weights(ckpt, model)
    return model.state_dict()


def test_non_finite_step_is_skipped_without_an_update(tiny_data, tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    after = {}  # the weights after each step's update (or skipped update)
    original = TrainStep.optimizer_update

    def optimizer_update(self, losses, grad_norm, step):
        record = original(self, losses, grad_norm, step)
        after[step] = {n: p.detach().clone() for n, p in self.model.state_dict().items()}
        return record

    monkeypatch.setattr(TrainStep, "optimizer_update", optimizer_update)
    out = tmp_path / "run"
    trainer_mod.train(
        load_config(
            "tiny-test",
            [
                *PARITY_ARGS[2:],
                "--data.path",
                str(tiny_data),
                "--train.output_dir",
                str(out),
                "--train.steps",
                "5",
                "--checkpoint.interval",
                "1",
                "--checkpoint.keep_last",
                "10",
            ],
        )
    )
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert records[3].get("skipped") == 1 and records[3]["skipped_total"] == 1 and math.isnan(records[3]["loss"])
    assert all("skipped" not in records[s] and math.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5))
    ckpts = {int(p.name.split("_")[1]): p for p in list_checkpoints(out / "checkpoints")}
    assert sorted(ckpts) == [1, 2, 4, 5]  # none inside the (one-step) streak
    w2, w4 = _weights(ckpts[2]), _weights(ckpts[4])
    for name in w2:  # step 3 changed nothing; step 4 trained again
        torch.testing.assert_close(after[3][name], after[2][name], rtol=0, atol=0)
        torch.testing.assert_close(after[4][name], w4[name], rtol=0, atol=0)
    assert any(not torch.equal(w4[name], w2[name]) for name in w2)


def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    from meshforge.cli import main as cli_main

    _poison(monkeypatch, {4, 5, 6})
    out = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            "--config",
            "tiny-test",
            *PARITY_ARGS[2:],
            "--data.path",
            str(tiny_data),
            "--train.output_dir",
            str(out),
            "--checkpoint.interval",
            "3",
            "--train.max_nonfinite_steps",
            "3",
        ]
    )
    assert rc == 2
    assert "3 consecutive steps with non-finite loss" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert all(math.isfinite(v.abs().max().item()) for v in _weights(out / "checkpoints" / "step_00000003").values())


def test_a_non_finite_streak_writes_no_checkpoint_and_resume_matches_a_run_without_it(
    tiny_data, tmp_path, monkeypatch, capsys
):
    """NaN at steps 3-7 with checkpoints every 2 steps and keep_last = 2: the saves of steps 4 and 6
    wait (none is written inside the streak), so step 2 survives pruning; every step has its record;
    the stop names step 2; the rerun resumes from it and matches a run that never saw the streak."""
    from meshforge.cli import main as cli_main

    args = [
        "train",
        "--config",
        "tiny-test",
        *PARITY_ARGS[2:],
        "--data.path",
        str(tiny_data),
        "--checkpoint.interval",
        "2",
        "--checkpoint.keep_last",
        "2",
        "--train.max_nonfinite_steps",
        "5",
        "--train.steps",
        "8",
        "--model.n_layers",
        "2",
    ]
    out, ref = tmp_path / "run", tmp_path / "ref"
    with monkeypatch.context() as m:
        _poison(m, {3, 4, 5, 6, 7})
        assert cli_main([*args, "--train.output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    newest = out / "checkpoints" / "step_00000002"
    assert f"the newest checkpoint, {newest}, is from before them" in err, err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # the step that stopped the run has its record too
    assert cli_main([*args, "--train.output_dir", str(out)]) == 0  # resumes from step 2, no NaN now
    assert cli_main([*args, "--train.output_dir", str(ref)]) == 0

    def losses(o):
        return {r["step"]: r["loss"] for r in read_metrics(o) if "loss" in r}

    assert losses(out) == losses(ref) and sorted(losses(ref)) == list(range(1, 9))


def test_a_save_due_inside_a_streak_waits_for_the_next_good_step(tiny_data, tmp_path, monkeypatch):
    _poison(monkeypatch, {4, 5})
    out = tmp_path / "run"
    trainer_mod.train(
        load_config(
            "tiny-test",
            [
                *PARITY_ARGS[2:],
                "--data.path",
                str(tiny_data),
                "--train.steps",
                "7",
                "--train.output_dir",
                str(out),
                "--checkpoint.interval",
                "2",
                "--checkpoint.keep_last",
                "10",
            ],
        )
    )
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step_00000002",
        "step_00000006",
        "step_00000007",
    ]  # step 4's save was written after step 6 (good) only
    assert [r["step"] for r in read_metrics(out) if "checkpoint_blocked_s" in r] == [2, 6, 7]


def test_loss_spike_is_logged(tiny_data, tmp_path, monkeypatch):
    def spike(parts, step):
        if step == 14:
            parts.ce = parts.ce * 50  # reported loss only: the update stays the same

    _change_training_loss(monkeypatch, spike)
    out = tmp_path / "run"
    trainer_mod.train(
        load_config(
            "tiny-test",
            [*PARITY_ARGS[2:], "--data.path", str(tiny_data), "--train.output_dir", str(out), "--train.steps", "16"],
        )
    )
    spikes = [r["step"] for r in read_metrics(out) if r.get("loss_spike")]
    assert spikes == [14]


def _wait_for_step(out, step: int, procs, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(out)):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank ended early: " + b"".join(p.stderr.read() for p in procs).decode()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigterm_to_one_rank_checkpoints_all_and_resume_matches_uninterrupted(tiny_data, tmp_path):
    """SIGTERM reaches rank 1 only (as a stray signal might); both ranks agree to stop after the step,
    write one checkpoint and exit 42; the rerun resumes and ends with the same losses and weights."""
    steps = "60"
    common = ["train", *PARITY_ARGS, "--data.path", str(tiny_data), "--train.steps", steps]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    marker = tmp_path / "logs" / "preempted"
    procs = start_ranks(2, [*common, "--train.output_dir", str(out)], {PREEMPTED_MARKER_ENV: str(marker)})
    _wait_for_step(out, 3, procs)
    assert not marker.exists()
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [42, 42], [p.stderr.read().decode()[-2000:] for p in procs]
    assert marker.read_text().strip() == "42"  # rank 0 marked the finished preemption checkpoint for the job script
    stopped = [int(p.name.split("_")[1]) for p in list_checkpoints(out / "checkpoints")]
    assert len(stopped) == 1 and 3 <= stopped[0] < int(steps), stopped
    procs = start_ranks(2, [*common, "--train.output_dir", str(out)])
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    procs = start_ranks(2, [*common, "--train.output_dir", str(ref_out)])
    assert [p.wait(timeout=300) for p in procs] == [0, 0]

    def by_step(o):
        return {r["step"]: r["loss"] for r in read_metrics(o) if "loss" in r}

    got, want = by_step(out), by_step(ref_out)
    assert sorted(got) == sorted(want) == list(range(1, int(steps) + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bit-identical continuation
    a, b = read_result(out), read_result(ref_out)
    for name, p in b.params.items():
        assert torch.equal(a.params[name], p), name
