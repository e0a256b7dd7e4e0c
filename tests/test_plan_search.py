"""meshforge plan's search and what it prints: one given layout priced alone (the override path), ties,
labels, the --why view."""

from __future__ import annotations

import json

import pytest

from meshforge.cli import main
from meshforge.config import load_config
from meshforge.plan.devices import get_device
from meshforge.plan.planner import layout_keys_given, plan_job, plan_layout


def _plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_given_layout_is_priced_alone_as_the_search_prices_it(capsys):
    """`--parallel.tp 4 --parallel.pp 2` prices exactly that layout (dp_shard resolved as train resolves it),
    with the same numbers the search gives the same layout."""
    base = ["--config", "llama-1b", "--gpus", "64", "--global-batch-tokens", "1M"]
    one = _plan_json(capsys, *base, "--parallel.tp", "4", "--parallel.pp=2", "--parallel.pp_schedule",
                     "interleaved_1f1b", "--parallel.pp_stages_per_rank", "4")
    (rec,) = one["layouts"]
    assert rec["overrides"]["parallel.tp"] == 4 and rec["overrides"]["parallel.pp"] == 2
    assert rec["overrides"]["parallel.dp_shard"] == 8 and rec["overrides"]["parallel.pp_stages_per_rank"] == 4
    cfg = load_config("llama-1b", {"train.global_batch_size": 256, "train.micro_batch_size": 1})
    searched = plan_job(cfg, 64, 8, get_device("h100-80gb"))
    same = [p for p in searched.fitting if p.layout.describe() == rec["layout"]]
    assert len(same) == 1 and same[0].time.step_s == pytest.approx(rec["step_s"])
    assert same[0].memory["total"] == rec["total"]


def test_given_layout_that_does_not_fit_is_priced_and_says_so(capsys):
    assert main(["plan", "--config", "llama-70b", "--gpus", "8", "--global-batch-tokens", "1M",
                 "--parallel.tp", "8", "--parallel.pp", "1"]) == 0
    out = capsys.readouterr().out
    assert "0 layouts fit, 1 do not" in out and "tp8 pp1 dp1x1" in out and "needs" in out


@pytest.mark.parametrize("argv,message", [
    (["--parallel.tp", "3"], "refused on 64 GPUs: world size 64 does not divide by pp*dp_replicate*cp*tp"),
    (["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--parallel.pp_stages_per_rank", "2"],
     "refused on 64 GPUs: parallel.pp_schedule = '1f1b' runs one stage per rank"),
    (["--parallel.pp", "32"], "refused on 64 GPUs: model.n_layers = 16 cannot cover 32 pipeline stages"),
])
def test_given_layout_refused_in_one_line(capsys, argv, message):
    assert main(["plan", "--config", "llama-1b", "--gpus", "64", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_layout_keys_given():
    assert layout_keys_given(["--parallel.tp", "8", "--optim.lr", "1e-4", "--train.micro_batch_size=2"]) == \
        ["parallel.tp", "train.micro_batch_size"]
    assert layout_keys_given(["--optim.lr", "1e-4", "--parallel.compile", "off"]) == []
    cfg = load_config("small", {"parallel.tp": 2})
    plan = plan_layout(cfg, 4, 4, get_device("h100-80gb"))
    assert [p.layout.tp for p in plan.fitting] == [2]
