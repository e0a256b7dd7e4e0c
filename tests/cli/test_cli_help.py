"""What a new user reads first: `--help` says how to override the config, lists every device,
and a schedule that never leaves warmup is pointed out at the start of the run."""

from __future__ import annotations

import re

import pytest

from meshforge.cli import main as cli_main
from meshforge.config import OptimConfig, load_config
from meshforge.pretrain.optim import lr_factor, schedule_notes


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main([*argv, "--help"])
    assert e.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def test_train_help_says_how_to_override_any_key(capsys):
    text = _help(capsys, "train")
    assert "[--section.key VALUE ...]" in text
    assert "Any config key can be set on the command line as --section.key value" in text
    assert "--help-config lists every key" in text


@pytest.mark.parametrize("argv", [("plan",), ("scaling", "plan")])
def test_gpu_help_lists_every_device_of_the_table(capsys, argv):
    from meshforge.plan.devices import load_devices

    text = _help(capsys, *argv)
    listed = re.search(
        r"--gpu GPU .*?\((?:`meshforge plan`'s device table: )?([a-z0-9, -]+); more with --devices\)", text
    ).group(1)
    assert listed.split(", ") == list(load_devices()) and "cpu" in listed.split(", ")


def test_schedule_notes_a_run_that_never_leaves_warmup():
    cfg = OptimConfig(warmup_steps=30, schedule="cosine")
    (note,) = schedule_notes(20, cfg)
    assert note.startswith("optim.warmup_steps = 30 >= train.steps = 20: the LR never leaves warmup")
    assert f"ends at {lr_factor(19, 20, cfg):.0%} of optim.lr" in note and "--optim.warmup_steps 2" in note
    assert schedule_notes(31, cfg) == [] and schedule_notes(20, OptimConfig(warmup_steps=0)) == []


def test_train_prints_the_warmup_note_at_start(tiny_data, tmp_path, capsys):
    from meshforge.pretrain.trainer import Trainer

    over = {
        "data.path": str(tiny_data),
        "train.output_dir": str(tmp_path / "run"),
        "train.steps": 4,
        "optim.warmup_steps": 6,
    }
    trainer = Trainer(load_config("tiny-test", over))
    trainer._setup()
    trainer.metrics.close()
    assert "note: optim.warmup_steps = 6 >= train.steps = 4: the LR never leaves warmup" in capsys.readouterr().out


def test_a_missing_optional_package_names_its_extra(tmp_path, capsys, monkeypatch):
    """The quick start installs no extras: a command that needs one says which, in one line."""
    import sys

    from test_scaling_fit import isoflop_rows, write_csv

    path = write_csv(tmp_path / "results.csv", isoflop_rows(sizes=5))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli_main(["scaling", "plot", str(path), "--output", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "meshforge: error: `meshforge scaling plot` needs matplotlib, which is not installed: "
        'pip install -e ".[scaling]" (in the meshforge checkout)'
    )
    assert not (tmp_path / "figs").exists()


def test_every_optional_package_is_in_the_extra_named_for_it():
    import tomllib
    from pathlib import Path

    from meshforge.cli import OPTIONAL_PACKAGES

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    for module, extra in OPTIONAL_PACKAGES.items():
        names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("-", "_") for d in extras[extra]}
        assert module in names, (module, extra)
