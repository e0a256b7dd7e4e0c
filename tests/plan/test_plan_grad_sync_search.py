"""``parallel.grad_sync`` as a search dimension: per step everywhere, per microbatch added only where per step
does not fit (FSDP2, no pipeline, several microbatches), carried into the printed train command."""

from __future__ import annotations

import dataclasses

from meshforge.cli import main
from meshforge.config import load_config
from meshforge.plan.devices import get_device
from meshforge.plan.layouts import Layout, check_layout
from meshforge.plan.memory import estimate_memory
from meshforge.plan.planner import HEADROOM, grad_sync_variant, plan_job

H100 = get_device("h100-80gb")
BATCH = {"train.global_batch_size": 64}


def _total(cfg, layout: Layout) -> int:
    return estimate_memory(check_layout(cfg, layout), layout)["total"]


def test_per_microbatch_sync_is_searched_only_where_per_step_does_not_fit():
    cfg = load_config("llama-1b", BATCH)
    lay = Layout(1, 1, 1, 8, micro_batch_size=1)  # 8 microbatches: per step keeps the unsharded gradients
    per_mb = dataclasses.replace(lay, grad_sync="microbatch")
    step, small = _total(cfg, lay), _total(cfg, per_mb)
    assert small < step
    tight = dataclasses.replace(H100, hbm_bytes=int((step + small) / 2 / HEADROOM))  # between the two
    plan = plan_job(cfg, 8, 8, tight)
    usable = HEADROOM * tight.hbm_bytes
    synced = [p for p in plan.fitting if p.layout.grad_sync == "microbatch"]
    assert per_mb in [p.layout for p in synced]
    for p in synced:  # each one's per-step twin does not fit, and is not listed
        assert "sync:microbatch" in p.layout.describe()
        assert p.layout.overrides()["parallel.grad_sync"] == "microbatch"
        assert _total(cfg, dataclasses.replace(p.layout, grad_sync="")) > usable
    listed = {p.layout for p in plan.fitting + plan.overflowing}
    assert lay not in listed and all(p.layout.grad_sync != "microbatch" for p in plan.overflowing)
    # where per step fits (the H100's own memory) the search lists it and no per-microbatch twin
    roomy = plan_job(cfg, 8, 8, H100)
    assert lay in [p.layout for p in roomy.fitting] and per_mb not in [p.layout for p in roomy.fitting]


def test_grad_sync_variant_only_where_it_changes_something():
    cfg = load_config("llama-1b", BATCH)
    for lay, differs in (
        (Layout(1, 1, 1, 8, micro_batch_size=1), True),  # FSDP2, 8 microbatches
        (Layout(1, 1, 1, 8, micro_batch_size=8), False),  # one microbatch
        (Layout(1, 2, 1, 4, micro_batch_size=1), False),  # a pipeline reduces once per step anyway
        (Layout(8, 1, 1, 1, micro_batch_size=1), False),  # nothing sharded
    ):
        variant = grad_sync_variant(lay, check_layout(cfg, lay))
        assert (variant is not None) == differs
        if variant:
            assert variant[1].parallel.grad_sync == "microbatch"
    microbatch = load_config("llama-1b", {**BATCH, "parallel.grad_sync": "microbatch"})
    lay = Layout(1, 1, 1, 8, micro_batch_size=1)
    assert grad_sync_variant(lay, check_layout(microbatch, lay)) is None  # the config already asks for it


def test_the_printed_train_command_carries_grad_sync(capsys):
    """A layout that reduces per microbatch says so in its row and in the train line; per step needs no key."""
    argv = ["plan", "--config", "llama-1b", "--gpus", "8", "--train.global_batch_size", "64"]
    argv += ["--parallel.tp", "1", "--parallel.dp_shard", "8", "--train.micro_batch_size", "1"]
    assert main([*argv, "--parallel.grad_sync", "microbatch"]) == 0
    out = capsys.readouterr().out
    assert "sync:microbatch" in out and "--parallel.grad_sync microbatch" in out.split("meshforge train")[-1]
    assert main([*argv, "--parallel.grad_sync", "step"]) == 0
    out = capsys.readouterr().out
    assert "sync:" not in out and "--parallel.grad_sync step" in out.split("meshforge train")[-1]
