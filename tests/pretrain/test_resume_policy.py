"""Resuming with changed settings: those that would change the run are refused naming the difference;
the others take effect with a line saying so, and config.json / meta.json record what the run uses."""

from __future__ import annotations

import json

import pytest

from meshforge.cli import main as cli_main
from meshforge.config import describe, load_config
from meshforge.config.resume import resume_policy
from meshforge.pretrain.checkpoint import list_checkpoints, read_meta
from meshforge.pretrain.metrics import read_metrics
from meshforge.pretrain.optim import lr_factor
from meshforge.pretrain.trainer import Trainer
from parallel_harness import PARITY_ARGS
from test_errors import fails, tree_digest


def _args(data, out, *extra):
    return [
        "train",
        *PARITY_ARGS,
        "--data.path",
        str(data),
        "--train.output_dir",
        str(out),
        "--checkpoint.interval",
        "2",
        "--optim.warmup_steps",
        "2",
        *extra,
    ]


def test_a_refused_change_then_a_changed_lr_that_takes_effect_and_config_json_tells_the_truth(
    tiny_data, tmp_path, capsys
):
    out = tmp_path / "run"
    assert cli_main(_args(tiny_data, out, "--train.steps", "4")) == 0
    capsys.readouterr()
    before = tree_digest(out)  # a change that would make another run: refused, nothing written
    fails(
        capsys,
        _args(tiny_data, out, "--train.steps", "8", "--data.document_mask", "true"),
        "was written with data.document_mask = False and this run sets True, which would change what each token "
        "attends to; resume with data.document_mask = False",
    )
    assert tree_digest(out) == before
    capsys.readouterr()
    trainer = Trainer(
        load_config(
            "tiny-test", _args(tiny_data, out, "--train.steps", "8", "--optim.lr", "0.001", "--optim.beta2", "0.9")[3:]
        )
    )
    trainer.run()
    assert {g["betas"] for g in trainer.backend.optimizer.param_groups} == {(0.9, 0.9)}  # not the checkpoint's
    said = capsys.readouterr().out
    assert "resume: optim.lr = 0.001 takes effect from step 5 (the checkpoint's run had 0.003)" in said, said
    assert "resume: optim.beta2 = 0.9 takes effect from step 5" in said
    assert "resume: train.steps = 8 takes effect from step 5" in said
    cfg = load_config("tiny-test", [*PARITY_ARGS[2:], "--optim.warmup_steps", "2", "--optim.lr", "0.001"])
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}
    for step in range(5, 9):  # the LR of the new peak, on the schedule of the new length
        assert lrs[step] == pytest.approx(0.001 * lr_factor(step - 1, 8, cfg.optim), rel=1e-12), step
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.001
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "step_00000008" and read_meta(newest)["config"]["optim"]["lr"] == 0.001


def test_help_config_names_each_keys_resume_policy():
    text = describe()
    assert "model.dim = 192" in text and "[on resume: a change is refused (it changes the model)]" in text
    assert resume_policy("optim.lr") == "applies" and resume_policy("data.blend") == "refused"
    assert resume_policy("checkpoint.init_from") == "ignored"
    lines = text.splitlines()
    keys = [
        i for i, line in enumerate(lines) if line.startswith("  ") and " = " in line and not line.startswith("    ")
    ]
    for i, end in zip(keys, keys[1:] + [len(lines)]):  # every key has its policy line after its docstring
        assert any(line.startswith("      [on resume: ") for line in lines[i + 1 : end]), lines[i]
