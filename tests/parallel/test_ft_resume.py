"""The usual DCP checkpoint of one replica group resumes the whole job (issue 28, item 5).

Two groups x 2 ranks (FSDP2 inside, torchft across, a real lighthouse) train 8 steps with a checkpoint at
step 4 and 8; that run is the uninterrupted reference (its losses and weights match the one-process replay).
From group 0's step-4 checkpoint (``checkpoint.resume_from``), into a fresh output dir:

- (a) both groups again: steps 5-8 have the reference's losses within 1e-6, the groups hold bit-identical
  weights, equal to the reference's final weights;
- (b) a plain run (``fault_tolerance = none``) of 4 FSDP2 ranks -- the same 4 data slices per step as
  2 groups x 2 ranks -- resumes it too: the same losses within 1e-6 and the same final weights within float
  tolerance (the gradient sum runs in another order).

Both with FSDP2 inside each group and with pipeline parallel (pp 2: each group's checkpoint holds both
stages; the plain run is pp 2 x dp_shard 2).

``-m slow`` (three 4-process runs per layout: ~4 min on a loaded 2-core machine); the default suite runs two
groups against the replay in tests/parallel/test_fault_tolerance.py and tests/launch/test_ft_slurm.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchft")

from ft_harness import Lighthouse, final_weights, finish, group_args, records, replay, start_group  # noqa: E402
from meshforge.pretrain.checkpoint import list_checkpoints, read_meta  # noqa: E402
from meshforge.pretrain.metrics import read_metrics  # noqa: E402
from parallel_harness import read_result, run_ranks  # noqa: E402

STEPS = 8
LOSS_ATOL = 1e-6
CHECKPOINTS = ("--checkpoint.interval", "4", "--checkpoint.keep_last", "2", "--optim.warmup_steps", "2")


def run_groups(args: list[str]) -> None:
    groups = [start_group(args, g) for g in range(2)]
    results = [finish(procs, 300) for procs in groups]
    failed = [
        f"group {g} rank {r}: {err[-2000:]}" for g, ranks in enumerate(results) for r, (s, err) in enumerate(ranks) if s
    ]
    assert not failed, "\n".join(failed)


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_close_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(5, STEPS + 1)), sorted(got)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64),
        torch.tensor([want[s] for s in sorted(got)], dtype=torch.float64),
        rtol=0,
        atol=LOSS_ATOL,
    )


LAYOUTS = {"fsdp2": (), "pp2": ("--parallel.dp_shard", "1", "--parallel.pp", "2")}
"""Inside each group; ``PLAIN``: the same layout's plain run of 4 ranks (the same data slices per step)."""
PLAIN = {"fsdp2": (), "pp2": ("--parallel.dp_shard", "2")}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def reference(request, tiny_data, tmp_path_factory):
    """The uninterrupted 2 x 2 run (checkpoints at steps 4 and 8), checked against the one-process replay;
    -> (its output dir, group 0's step-4 checkpoint, the layout's name)."""
    out = tmp_path_factory.mktemp(f"ft_reference_{request.param}")
    with Lighthouse(min_replicas=2) as lh:  # both groups in every step
        run_groups(group_args(tiny_data, out, lh, STEPS, 2, *CHECKPOINTS, *LAYOUTS[request.param]))
    got, want, weights = replay(out, 0)
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=LOSS_ATOL)
    step4 = out / "group_0" / "checkpoints" / "step_00000004"
    assert step4 in list_checkpoints(out / "group_0" / "checkpoints") and read_meta(step4)["step"] == 4
    return out, step4, request.param


@pytest.mark.slow
def test_whole_job_resumes_from_one_groups_checkpoint(tiny_data, reference, tmp_path):
    ref, step4, layout = reference
    with Lighthouse(min_replicas=2) as lh:
        resume = ("--checkpoint.resume_from", str(step4))
        run_groups(group_args(tiny_data, tmp_path, lh, STEPS, 2, *CHECKPOINTS, *LAYOUTS[layout], *resume))
    for g in (0, 1):
        rows = records(tmp_path, g)
        assert [r["ft_groups"] for r in rows] == [[0, 1]] * 4 and all(r["ft_committed"] for r in rows)
        assert_close_losses(losses(rows), losses(records(ref, 0)))
    weights = [final_weights(tmp_path, g) for g in (0, 1)]
    want = final_weights(ref, 0)
    for name in want:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the replica groups"
        torch.testing.assert_close(weights[0][name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_plain_run_resumes_from_a_groups_checkpoint(tiny_data, reference, tmp_path):
    ref, step4, layout = reference
    resume = ("--checkpoint.resume_from", str(step4))
    args = group_args(tiny_data, tmp_path, Lighthouse(), STEPS, 2, *CHECKPOINTS, *LAYOUTS[layout], *resume)
    args += ["--parallel.fault_tolerance", "none", *PLAIN[layout]]  # the last value wins: a plain job
    run_ranks(4, args)
    assert_close_losses(losses(read_metrics(tmp_path)), losses(records(ref, 0)))
    got, want = read_result(tmp_path).params, final_weights(ref, 0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
