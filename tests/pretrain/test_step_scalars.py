"""The step's host reads: one transfer for every logged scalar, the preemption flag riding the
loss reduction (no collective or read of its own), and the gradient norm only where needed."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from meshforge.config import load_config
from meshforge.pretrain import faults, step_local
from meshforge.pretrain.checkpoint import list_checkpoints
from meshforge.pretrain.metrics import read_metrics
from meshforge.pretrain.trainer import Trainer

PACKAGE = str(Path(faults.__file__).resolve().parent.parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def _cfg(data, out, **over):
    base = {
        "data.path": str(data),
        "train.output_dir": str(out),
        "train.eval_interval": 0,
        "train.sample_prompt": "",
        "checkpoint.interval": 0,
        "logging.tensorboard": False,
    }
    return load_config("tiny-test", {**base, **over})


def _count_host_reads(monkeypatch) -> dict[str, int]:
    """Count the tensor -> Python reads made by meshforge's own code (torch's internals excluded:
    AdamW reads its CPU step counters, which costs no device sync)."""
    counts = dict.fromkeys(READS, 0)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                counts[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_one_host_read_per_step(tiny_data, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tiny_data, tmp_path / "run", **{"checkpoint.on_preemption": True}))
    trainer._setup()
    trainer.train_step()  # warm up
    counts = _count_host_reads(monkeypatch)
    for _ in range(3):
        record = trainer.train_step()
    assert counts == {**dict.fromkeys(READS, 0), "tolist": 3}, counts
    assert set(record) >= {"loss", "z_loss", "lr", "grad_norm"} and not trainer.backend.stop_requested


def test_signal_rides_the_loss_reduction_and_stops_after_that_step(tiny_data, tmp_path, monkeypatch):
    """SIGTERM during step 3's forward: step 3's reduction carries it, the run checkpoints step 3 and stops."""
    original = Trainer.train_step

    def train_step(self):
        if self.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        result = Trainer(_cfg(tiny_data, out, **{"train.steps": 8, "checkpoint.on_preemption": True})).run()
    finally:  # a preempted run keeps its handler (the process is exiting); this one is pytest's
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert result.preempted and result.final_step == 3
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]


def test_grad_norm_only_where_clipping_or_logging_needs_it(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = step_local.clip_grad_norm
    monkeypatch.setattr(step_local, "clip_grad_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for name, every in {"every": 1, "third": 3}.items():  # clipping off (with it on: every step, test_train)
        calls.clear()
        Trainer(
            _cfg(
                tiny_data, tmp_path / name, **{"train.steps": 7, "optim.grad_clip": 0.0, "logging.log_interval": every}
            )
        ).run()
        runs[name] = [r for r in read_metrics(tmp_path / name) if "loss" in r]
        assert len(calls) == {"every": 7, "third": 2}[name], name
    assert [r["step"] for r in runs["third"] if "grad_norm" in r] == [3, 6]
    every, third = runs["every"], runs["third"]
    assert [r["loss"] for r in third] == [r["loss"] for r in every]  # skipping the norm changes nothing else
    assert [r["grad_norm"] for r in third if "grad_norm" in r] == [every[2]["grad_norm"], every[5]["grad_norm"]]
