"""Tied embeddings under pipeline parallel against one process with the same tied weights.

The embedding (first stage) and the output projection (last stage) each hold a copy of the
shared matrix; their gradients are summed over the pair of ranks after every backward. The
runs give only ``--parallel.pp 2`` (and a schedule): the micro batch and the pipeline
microbatch count are the defaults (``train.micro_batch_size = 0``: 4 microbatches for
1f1b, 8 for interleaved), while the reference accumulates micro batches of 2.
"""

from __future__ import annotations

import pytest
import torch

from parallel_harness import PARITY_ARGS, read_result, run_ranks, train_layout
from test_parallel_pp import _assert_pp_parity
from torch_compat import pp_tp

TIED_ARGS = ("--model.tie_embeddings", "true", "--train.eval_interval", "5")
DEFAULT_MICRO = ("--train.micro_batch_size", "0")


@pytest.fixture(scope="module")
def tied_ref(tiny_data, tmp_path_factory):
    """The single-process reference with tied embeddings (micro batches of 2, accumulated)."""
    return train_layout(tiny_data, tmp_path_factory.mktemp("pp_tied_ref") / "ref", 1, *TIED_ARGS)


def _assert_tied(got) -> None:
    """In the run's last checkpoint the first stage's copy (the embedding) and the last stage's
    (the output projection), written by different ranks, are bit-identical."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from meshforge.pretrain.checkpoint import find_checkpoint

    ckpt = find_checkpoint(got.output_dir)
    files = {}
    for idx, info in FileSystemReader(str(ckpt)).read_metadata().storage_data.items():
        if idx.fqn in ("model.tok_embeddings.weight", "model.output.weight"):
            files.setdefault(tuple(idx.offset), {})[idx.fqn] = info.relative_path
    assert any(len(set(f.values())) == 2 for f in files.values()), files  # two ranks' copies, not one
    dcp_to_torch_save(str(ckpt), str(got.output_dir / "flat.pt"))
    model = torch.load(got.output_dir / "flat.pt", weights_only=False)["model"]
    torch.testing.assert_close(model["output.weight"], model["tok_embeddings.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_tied_pipeline_matches_single_process(schedule, tiny_data, tied_ref, tmp_path):
    got = train_layout(
        tiny_data,
        tmp_path / schedule,
        2,
        "--parallel.pp",
        "2",
        "--parallel.pp_schedule",
        schedule,
        *TIED_ARGS,
        *DEFAULT_MICRO,
    )
    _assert_pp_parity(tied_ref, got)
    _assert_tied(got)


def test_tied_pipeline_checkpoint_resumes(tiny_data, tied_ref, tmp_path):
    """pp2 1f1b (tied) trains 5 steps and checkpoints; pp2 interleaved (4 virtual stages) resumes
    from it to step 10; its checkpoint holds the shared matrix once, under the single-process
    names, and loads into a single-process model: the same run as the reference."""
    from torch.distributed.checkpoint import FileSystemReader

    out = tmp_path / "run"
    common = [
        "train",
        *PARITY_ARGS,
        *TIED_ARGS,
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--parallel.pp",
        "2",
        *DEFAULT_MICRO,
    ]
    run_ranks(2, [*common, "--parallel.pp_schedule", "1f1b", "--train.steps", "5"])
    run_ranks(2, [*common, "--parallel.pp_schedule", "interleaved_1f1b"])
    for step in (5, 10):
        keys = FileSystemReader(str(out / "checkpoints" / f"step_{step:08d}")).read_metadata().state_dict_metadata
        tied = sorted(k for k in keys if "tok_embeddings" in k or "output.weight" in k)
        assert tied == [
            "model.output.weight",
            "model.tok_embeddings.weight",
            "optim.state.tok_embeddings.weight.exp_avg",
            "optim.state.tok_embeddings.weight.exp_avg_sq",
            "optim.state.tok_embeddings.weight.step",
        ], tied
    got = read_result(out)  # the pp2 checkpoint loaded into one process
    _assert_pp_parity(tied_ref, got)
    _assert_tied(got)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, world, overrides",
    [
        # both copies FSDP-sharded over dp_shard 2: each rank sums its rows with its partner's same rows
        ("pp2xfsdp2-interleaved", 4, ("--parallel.pp_schedule", "interleaved_1f1b")),
        # the embedding rowwise and the output colwise over tp 2: both shard the shared matrix's rows
        # (the embedding's gradient comes back replicated over tp and is sliced to the weight's rows first)
        pp_tp("pp2xtp2", 4, ("--parallel.pp_schedule", "1f1b", "--parallel.tp", "2")),
        pp_tp("pp2xtp2xfsdp2", 8, ("--parallel.pp_schedule", "1f1b", "--parallel.tp", "2")),
        ("pp2-zero-bubble", 2, ("--parallel.pp_schedule", "zero_bubble")),
        # the split backward under FSDP2 (which needs the parameters gathered until the weight pass)
        (
            "pp2xfsdp2-zero-bubble",
            4,
            ("--parallel.pp_schedule", "zero_bubble", "--parallel.fsdp_reshard_after_forward", "false"),
        ),
        ("pp2-gpipe", 2, ("--parallel.pp_schedule", "gpipe")),
    ],
)
def test_tied_pipeline_layouts_match_single_process(name, world, overrides, tiny_data, tied_ref, tmp_path):
    from parallel_harness import TP_ATOL

    got = train_layout(tiny_data, tmp_path / name, world, "--parallel.pp", "2", *overrides, *TIED_ARGS, *DEFAULT_MICRO)
    _assert_pp_parity(tied_ref, got, atol=TP_ATOL if "--parallel.tp" in overrides else 1e-6)
    _assert_tied(got)


def test_last_stage_names_its_copy_as_one_process_does():
    """The last stage's view names the output's copy ``tok_embeddings.weight`` first (the optimizer
    and checkpoints see the single-process names); the middle stages hold no copy."""
    from meshforge.config import load_config
    from meshforge.models import build_model
    from meshforge.parallel.mesh import resolve_degrees
    from meshforge.parallel.pipeline import PipelineModel, plan_pipeline, split_model

    cfg = load_config("tiny-test", ["--model.n_layers", "3", "--parallel.pp", "3", "--train.micro_batch_size", "0"])
    assert cfg.model.tie_embeddings
    plan = plan_pipeline(cfg, resolve_degrees(cfg.parallel, 3))
    torch.manual_seed(0)
    full = build_model(cfg.model)
    names = {n for n, _ in full.named_parameters()}
    views = [PipelineModel(split_model(full, plan, r), plan.stages_of_rank(r), plan) for r in range(3)]
    first, middle, last = ([n for n, _ in v.named_parameters()] for v in views)
    assert "tok_embeddings.weight" in first and "tok_embeddings.weight" in last
    assert not any(n.startswith(("tok_embeddings", "output")) for n in middle)
    assert "output.weight" not in last and last[0] == "tok_embeddings.weight"  # one name, the single-process one
    assert views[2].tok_embeddings.weight is views[2].output.weight
    assert set(first) | set(middle) | set(last) == names
    assert views[2].state_dict().keys() >= {"tok_embeddings.weight", "output.weight"}
