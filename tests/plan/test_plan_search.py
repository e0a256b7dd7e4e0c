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
    """`--exact --parallel.tp 4 --parallel.pp 2` prices exactly that layout (dp_shard resolved as train resolves it),
    with the same numbers the search gives the same layout."""
    base = ["--config", "llama-1b", "--gpus", "16", "--global-batch-tokens", "256K"]
    one = _plan_json(
        capsys,
        *base,
        "--exact",
        "--parallel.tp",
        "4",
        "--parallel.pp=2",
        "--parallel.pp_schedule",
        "interleaved_1f1b",
        "--parallel.pp_stages_per_rank",
        "4",
    )
    (rec,) = one["layouts"]
    assert rec["overrides"]["parallel.tp"] == 4 and rec["overrides"]["parallel.pp"] == 2
    assert rec["overrides"]["parallel.dp_shard"] == 2 and rec["overrides"]["parallel.pp_stages_per_rank"] == 4
    cfg = load_config("llama-1b", {"train.global_batch_size": 64, "train.micro_batch_size": 1})
    ac = rec["overrides"]["parallel.activation_checkpointing"]
    searched = plan_job(cfg, 16, 8, get_device("h100-80gb"), ac_modes=(ac,))
    same = [p for p in searched.fitting if p.layout.describe() == rec["layout"]]
    assert len(same) == 1 and same[0].time.step_s == pytest.approx(rec["step_s"])
    assert same[0].memory["total"] == rec["total"]


def test_given_layout_that_does_not_fit_is_priced_and_says_so(capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                "llama-70b",
                "--gpus",
                "8",
                "--global-batch-tokens",
                "1M",
                "--exact",
                "--parallel.tp",
                "8",
                "--parallel.pp",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "0 layouts fit, 1 do not" in out and "tp8 pp1 dp1x1" in out and "needs" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--parallel.tp", "3"], "refused on 64 GPUs: world size 64 does not divide by pp*dp_replicate*cp*tp"),
        (
            ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--parallel.pp_stages_per_rank", "2"],
            "refused on 64 GPUs: parallel.pp_schedule = '1f1b' runs one stage per rank",
        ),
        (["--parallel.pp", "32"], "refused on 64 GPUs: model.n_layers = 16 cannot cover 32 pipeline stages"),
    ],
)
def test_given_layout_refused_in_one_line(capsys, argv, message):
    assert main(["plan", "--config", "llama-1b", "--gpus", "64", "--exact", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_layout_keys_given():
    assert layout_keys_given(["--parallel.tp", "8", "--optim.lr", "1e-4", "--train.micro_batch_size=2"]) == [
        "parallel.tp",
        "train.micro_batch_size",
    ]
    assert layout_keys_given(["--optim.lr", "1e-4", "--parallel.compile", "off"]) == []
    cfg = load_config("small", {"parallel.tp": 2})
    plan = plan_layout(cfg, 4, 4, get_device("h100-80gb"))
    assert [p.layout.tp for p in plan.fitting] == [2]


def test_ties_go_to_less_memory_then_fewer_collectives():
    """Layouts whose predicted step times tie (within planner.TIE) are listed leanest first, then by fewer
    collective calls -- not in enumeration order (a 57 GiB layout listed above a 23 GiB one at the same speed)."""
    from meshforge.plan.planner import TIE

    cfg = load_config("llama-1b", {"train.global_batch_size": 64, "train.micro_batch_size": 1})
    plan = plan_job(cfg, 16, 8, get_device("h100-80gb"), 0.5, ac_modes=("none", "full"))  # flat: ties abound
    rows = plan.fitting
    fastest = min(p.time.step_s for p in rows)
    tied = [p for p in rows if p.time.step_s <= fastest * (1 + TIE)]
    assert len(tied) > 3 and rows[: len(tied)] == tied  # the case arises; the tie comes first
    keys = [(p.memory["total"], p.time.n_collectives) for p in tied]
    assert keys == sorted(keys) and keys[0] < keys[-1]
    assert all(a.time.step_s <= b.time.step_s * (1 + TIE) for a, b in zip(rows, rows[1:]))


@pytest.mark.parametrize(
    "kwargs,label",
    [
        (dict(dp_replicate=16, dp_shard=1), "replicated"),
        (dict(dp_replicate=1, dp_shard=1, tp=8, pp=2), "no-dp"),
        (dict(dp_replicate=1, dp_shard=16), "fsdp-zero3"),
        (dict(dp_replicate=4, dp_shard=4, zero="fsdp-zero2"), "hsdp-zero2"),
        (dict(dp_replicate=1, dp_shard=1, cp=2, tp=8), "fsdp-zero3"),  # sharded over cp
        (dict(dp_replicate=1, dp_shard=16, zero="ds-zero1"), "ds-zero1"),
    ],
)
def test_layout_labels_say_replicated_or_sharded(kwargs, label):
    from meshforge.plan.layouts import Layout

    args = {"tp": 1, "pp": 1, **kwargs}
    lay = Layout(**args)
    assert lay.label == label and f" {label} " in lay.describe()


def test_why_lists_the_time_terms_that_sum_to_the_step(capsys):
    argv = [
        "plan",
        "--config",
        "llama-1b",
        "--gpus",
        "64",
        "--global-batch-tokens",
        "1M",
        "--exact",
        "--parallel.tp",
        "4",
        "--parallel.pp",
        "2",
        "--parallel.dp_replicate",
        "2",
        "--why",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("why tp4 pp2 dp2x4 hsdp-zero3 1f1b")
    terms = {}
    for line in out.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("      "):
            name, secs = line[2:26].strip(), float(line[26:].split()[0])
            terms[name] = secs
    assert {"compute", "bubble", "exposed tp", "exposed pp", "exposed data parallel", "total"} <= set(terms)
    total = terms.pop("total")
    assert sum(terms.values()) == pytest.approx(total, abs=5e-4)
    assert "(behind compute)" in out and "reduce_scatter" in out
    assert main(["plan", "--config", "small", "--gpus", "2", "--why", "999"]) == 2
    assert "--why 999: the plan lists layouts 1 to" in capsys.readouterr().err


def test_dominated_layouts_are_pruned_before_pricing():
    """The search leaves out GPipe where 1F1B of the same layout is accepted and heavier activation
    checkpointing where a lighter mode of the same layout fits; the layouts it prices rank as in the full
    enumeration, its first is the full enumeration's first, and every pruned layout that fits is no faster
    than the one that rules it out."""
    import dataclasses

    from meshforge.plan.layouts import enumerate_layouts
    from meshforge.plan.planner import price

    cfg = load_config("llama-1b", {"train.global_batch_size": 32, "data.seq_len": 4096, "model.max_seq_len": 4096})
    h100 = get_device("h100-80gb")
    pruned = plan_job(cfg, 16, 8, h100)
    full = price(cfg, enumerate_layouts(cfg, 16, 8)[0], h100, 8, None)
    kept = {p.layout for p in pruned.fitting + pruned.overflowing}
    assert len(kept) < 0.7 * len(full)
    # the same prices (the order within a tie may differ: a run of ties is cut where the fastest of it was)
    same = {p.layout: (p.time.step_s, p.memory["total"]) for p in full if p.layout in kept and p.fits}
    assert same == {p.layout: (p.time.step_s, p.memory["total"]) for p in pruned.fitting}
    assert pruned.fitting[0].layout == next(p for p in full if p.fits).layout
    by_layout = {p.layout: p for p in full}
    dropped = [p for p in full if p.layout not in kept]
    assert {p.layout.schedule for p in dropped} >= {"gpipe"} and {p.layout.ac for p in dropped} >= {"selective", "full"}
    for p in dropped:
        lay = p.layout
        rivals = [by_layout.get(dataclasses.replace(lay, schedule="1f1b"))] if lay.schedule == "gpipe" else []
        rivals += [
            by_layout.get(dataclasses.replace(lay, ac=a))
            for a in ("none", "selective")[: ("none", "selective", "full").index(lay.ac)]
        ]
        rivals = [r for r in rivals if r is not None and r.layout in kept and (r.fits or not p.fits)]
        assert rivals and min(r.time.step_s for r in rivals) <= p.time.step_s * (1 + 1e-9), lay.describe()


@pytest.mark.parametrize(
    "overrides",
    [
        {"train.global_batch_size": 64},
        # refusals that config.validate_layout gives: the whole-model compile and a window under context parallel
        {"train.global_batch_size": 64, "parallel.compile": "on", "parallel.compile_scope": "model"},
        {"train.global_batch_size": 64, "model.sliding_window": 512, "data.seq_len": 2048, "model.max_seq_len": 2048},
    ],
)
def test_search_checks_settings_once_with_the_same_result(monkeypatch, overrides):
    """The search checks what no layout changes once (``settings_pass``) and each candidate with
    ``config.validate_layout`` only: the full ranked list (layout, step time, memory, fits) and the
    refusals by reason equal those of the full per-candidate checks (``settings_pass`` forced false)."""
    from meshforge.plan import layouts

    cfg = load_config("llama-1b", overrides)
    assert layouts.settings_pass(cfg)
    h100 = get_device("h100-80gb")

    def listing(plan):
        return [
            (p.layout, p.time.step_s, p.memory["total"], p.fits) for p in plan.fitting + plan.overflowing
        ], plan.refused

    fast = listing(plan_job(cfg, 16, 8, h100))
    monkeypatch.setattr(layouts, "settings_pass", lambda cfg: False)
    slow = listing(plan_job(cfg, 16, 8, h100))
    assert len(fast[0]) > 100 and fast[1]
    assert fast == slow


def test_a_layout_sets_only_layout_fields():
    """``apply_layout`` changes no field outside ``config.LAYOUT_FIELDS`` (what the search checks once must
    be the same for every candidate), whatever the backend, schedule and degrees."""
    import dataclasses

    from meshforge.config import LAYOUT_FIELDS
    from meshforge.plan.layouts import Layout, apply_layout

    cfg = load_config("llama-1b", {"train.global_batch_size": 64})
    changed = set()
    for layout in (
        Layout(2, 2, 1, 4, zero="fsdp-zero2", schedule="zero_bubble", micro_batch_size=2, ac="full", pp_split="3"),
        Layout(1, 1, 2, 4, cp=2, zero="ds-zero3", cp_method="alltoall", ac="selective"),
        Layout(1, 4, 1, 4, schedule="interleaved_1f1b", stages_per_rank=4),
    ):
        job = apply_layout(cfg, layout)
        for sec in dataclasses.fields(cfg):
            for f in dataclasses.fields(getattr(cfg, sec.name)):
                if getattr(getattr(job, sec.name), f.name) != getattr(getattr(cfg, sec.name), f.name):
                    changed.add(f"{sec.name}.{f.name}")
    assert "parallel.compile" in changed and "parallel.zero_stage" in changed  # the walk sees changes
    assert changed <= LAYOUT_FIELDS, changed - LAYOUT_FIELDS
