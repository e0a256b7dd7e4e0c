"""The step interface: a backend plugged into the trainer (and nothing else) runs the job.

A stand-in backend that changes the weights by a known amount each step and reports made-up
losses must produce the run's metrics, validation losses, checkpoints and resume, without
the trainer knowing anything of it beyond :class:`~meshforge.pretrain.step.TrainStep`.
"""

from __future__ import annotations

import torch

from meshforge.config import config_from_dict, load_config
from meshforge.pretrain import trainer as trainer_mod
from meshforge.pretrain.checkpoint import list_checkpoints, load_model_weights, read_meta
from meshforge.pretrain.metrics import read_metrics
from meshforge.pretrain.step import StepSetup, TrainStep, new_optimizer


class ShiftStep(TrainStep):
    """Step ``s`` adds ``s`` to every weight and reports loss ``1 / s``; no forward, no backward."""

    def __init__(self, setup: StepSetup, model):
        super().__init__(setup, model, new_optimizer(setup, model))

    def train_step(self, batch, step: int) -> dict:
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(float(step))
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"loss": 1.0 / step, "z_loss": 0.0, "lr": lr, "grad_norm": 0.0, "batch_sum": int(batch.sum())}

    def eval_loss(self, batches, step: int) -> float:
        return 1000.0 + step + sum(1 for _ in batches)


def _run(tiny_data, out, steps: int, monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_step", ShiftStep)
    cfg = load_config(
        "tiny-test",
        {
            "data.path": str(tiny_data),
            "train.output_dir": str(out),
            "train.steps": steps,
            "train.eval_interval": 2,
            "train.eval_batches": 3,
            "checkpoint.interval": 2,
            "checkpoint.keep_last": 10,
            "train.sample_prompt": "",
            "train.progress": False,
        },
    )
    trainer_mod.Trainer(cfg).run()
    return {r["step"]: r for r in read_metrics(out) if "loss" in r or "val_loss" in r}


def _weights(ckpt, model_cfg):
    from meshforge.models import build_model

    model = build_model(model_cfg, "cpu")
    load_model_weights(ckpt, model)
    return model.state_dict()


def test_a_backend_plugged_into_the_trainer_runs_evaluates_checkpoints_and_resumes(tiny_data, tmp_path, monkeypatch):
    full = _run(tiny_data, tmp_path / "full", 6, monkeypatch)
    assert [full[s]["loss"] for s in range(1, 7)] == [1.0 / s for s in range(1, 7)]
    assert {s: full[s]["val_loss"] for s in (0, 2, 4, 6)} == {s: 1003.0 + s for s in (0, 2, 4, 6)}
    ckpts = {int(p.name.split("_")[1]): p for p in list_checkpoints(tmp_path / "full" / "checkpoints")}
    assert sorted(ckpts) == [2, 4, 6] and read_meta(ckpts[4])["step"] == 4
    model_cfg = config_from_dict(read_meta(ckpts[2])["config"]).model
    w2, w4 = _weights(ckpts[2], model_cfg), _weights(ckpts[4], model_cfg)
    for name in w2:  # steps 3 and 4 added 3 + 4 to every weight
        torch.testing.assert_close(w4[name], w2[name] + 7.0, rtol=0, atol=1e-4)

    # stopped after step 4, resumed: the backend's load restores the weights, the loader continues
    part = tmp_path / "part"
    _run(tiny_data, part, 4, monkeypatch)
    again = _run(tiny_data, part, 6, monkeypatch)
    assert [again[s]["batch_sum"] for s in (5, 6)] == [full[s]["batch_sum"] for s in (5, 6)]
    assert [again[s]["lr"] for s in (5, 6)] == [full[s]["lr"] for s in (5, 6)]
    w6 = _weights(part / "checkpoints" / "step_00000006", model_cfg)
    for name, value in _weights(ckpts[6], model_cfg).items():
        torch.testing.assert_close(w6[name], value, rtol=0, atol=0)
