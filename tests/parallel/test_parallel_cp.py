"""Context parallel training against the single-process run, and its config checks.

- Config: a sequence not in 2*cp chunks, heads not divisible for all-to-all, an
  encoder-decoder, a document mask with tp and cp x pp with the zero-bubble schedule while FSDP
  reshards after forward fail with one line naming the numbers, before any process group
  (``job_checks.check_job`` is what the trainer calls first).
- Training parity (real `meshforge train` ranks, gloo): per-step losses and final weights
  equal one process within 1e-5 relative. Default: cp2 ring, cp2 all-to-all, cp2 x pp2.
  Slow: cp4 ring, cp2 x tp2, cp2 x fsdp2 (ring and all-to-all), cp2 on DeepSpeed ZeRO-2
  and ZeRO-3, document masking (and validation) under cp2, pp2 and cp2 x pp2
  (interleaved), cp2 x pp2 with the zero-bubble schedule, cp2 with activation checkpointing,
  cp2 with compiled blocks, a cp2 checkpoint resumed in one process and one process's checkpoint resumed under cp2.
  MoE and expert parallel with cp: ``test_parallel_cp_moe.py``.
  The attention cores themselves are checked, with their traffic counted, in
  ``test_cp_attention.py``.

Parameter tolerance: rtol 1e-5 with atol 3e-6 (as for TP): each cp rank's weight gradient is
a sum over its half of the tokens, averaged over the ranks afterwards, so the sums run in
another order than in one process; after 10 AdamW steps a single weight of ~200k whose
gradient nearly cancels may differ by ~1e-6. The per-tensor relative drift is checked at 1e-5.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from meshforge.config import ConfigError, load_config
from meshforge.parallel.context_parallel import context_parallel_inputs, split_for_context_parallel
from meshforge.parallel.job_checks import check_job
from meshforge.parallel.mesh import Degrees, resolve_degrees
from meshforge.parallel.ring_attention import zigzag_merge
from meshforge.pretrain.data import dp_coordinates
from meshforge.pretrain.metrics import read_metrics
from meshforge.pretrain.objectives import LMObjective
from parallel_harness import PARITY_ARGS, TP_ATOL, assert_parity, read_result, run_ranks, train_layout


def _assert_cp_parity(ref, got) -> None:
    assert_parity(ref, got, atol=TP_ATOL)
    drift = max(((got.params[k] - v).norm() / v.norm()).item() for k, v in ref.params.items())
    assert drift < 1e-5, drift


def _check(world: int, **overrides):
    cfg = load_config("tiny-test", {k.replace("__", "."): v for k, v in overrides.items()})
    check_job(cfg, resolve_degrees(cfg.parallel, world))


def test_cp_config_is_checked_before_any_process_group():
    _check(2, parallel__cp=2)
    _check(4, parallel__cp=2, parallel__cp_method="alltoall")
    with pytest.raises(ConfigError, match=r"data.seq_len = 36 does not divide into 2\*cp = 8 zigzag chunks"):
        _check(4, parallel__cp=4, data__seq_len=36)
    with pytest.raises(ConfigError, match=r"model.n_kv_heads = 2 divisible by tp\*cp = 1\*4 = 4"):
        _check(4, parallel__cp=4, parallel__cp_method="alltoall")
    with pytest.raises(ConfigError, match=r"model.n_heads = 4 divisible by tp\*cp = 2\*4 = 8"):
        _check(8, parallel__cp=4, parallel__tp=2, parallel__cp_method="alltoall")
    with pytest.raises(ConfigError, match="decoder family only, not model.family = 'encoder_decoder'"):
        _check(2, parallel__cp=2, model__family="encoder_decoder", model__position_encoding="relative")
    _check(2, parallel__cp=2, model__moe_experts=4)  # more in test_parallel_cp_moe.py
    _check(4, parallel__cp=2, parallel__pp=2)
    _check(4, parallel__cp=2, parallel__pp=2, data__document_mask=True)
    with pytest.raises(
        ConfigError,
        match=r"parallel.pp_schedule = 'zero_bubble' with FSDP2 data parallel "
        r"\(dp_replicate x dp_shard x cp = 1 x 1 x 2\) needs "
        r"parallel.fsdp_reshard_after_forward = false",
    ):
        _check(4, parallel__cp=2, parallel__pp=2, parallel__pp_schedule="zero_bubble")
    _check(
        4,
        parallel__cp=2,
        parallel__pp=2,
        parallel__pp_schedule="zero_bubble",
        parallel__fsdp_reshard_after_forward=False,
        model__n_layers=4,
    )
    with pytest.raises(
        ConfigError,
        match=r"data.document_mask does not work with tensor parallelism yet "
        r"\(parallel.tp = 2\)",
    ):
        _check(4, parallel__cp=2, parallel__tp=2, data__document_mask=True)
    _check(4, parallel__cp=2, parallel__dp_backend="deepspeed")
    with pytest.raises(ConfigError, match=r"supports data parallelism only .* got tp = 2, pp = 1"):
        _check(4, parallel__cp=2, parallel__tp=2, parallel__dp_backend="deepspeed")
    with pytest.raises(ConfigError, match="parallel.cp_method = 'zigzag' is not one of ring, alltoall"):
        load_config("tiny-test", {"parallel.cp_method": "zigzag"})


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ranks_of_a_sample_split_it_exactly(cp):
    """The loader gives every cp rank of a data-parallel coordinate the same samples (the global
    sample order is the loader's, whatever the layout: ``test_dataset_loader.py``), and the cp
    ranks' splits tile each sample once: tokens, targets, document ids and RoPE positions merge
    back into the objective's, the pipeline runner's input path (``context_parallel_inputs``) too."""
    d = Degrees(pp=2, dp_replicate=1, dp_shard=2, cp=cp, tp=2, ep=1)
    grid = torch.arange(d.world_size).reshape(d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp)
    for dp in range(d.dp_shard):
        assert {dp_coordinates(int(r), d) for r in grid[:, 0, dp].flatten()} == {(dp, d.dp)}
    seq = 8 * cp
    tokens = torch.randint(0, 500, (3, seq + 1))
    segments = torch.arange(seq + 1).div(5, rounding_mode="floor").expand(3, -1)
    (want_tokens, want_segments), want_targets = LMObjective(seq, document_mask=True).model_inputs((tokens, segments))
    parts = [split_for_context_parallel((want_tokens, want_segments), want_targets, r, cp) for r in range(cp)]
    for i, want in enumerate((want_tokens, want_segments)):
        assert torch.equal(zigzag_merge([args[i] for args, _ in parts]), want)
    assert torch.equal(zigzag_merge([t for _, t in parts]), want_targets)
    assert torch.equal(zigzag_merge([args[2] for args, _ in parts], dim=0), torch.arange(seq))

    class CpMesh:  # the two calls context_parallel_inputs makes of a 1-D cp mesh
        def __init__(self, rank):
            self.rank = rank

        def __getitem__(self, name):
            assert name == "cp"
            return self

        def size(self):
            return cp

        def get_local_rank(self):
            return self.rank

    for r in range(cp):
        args, targets = context_parallel_inputs(LMObjective(seq).model_inputs, CpMesh(r))(tokens)
        assert torch.equal(args[0], parts[r][0][0]) and torch.equal(targets, parts[r][1])
        assert args[1] is None and torch.equal(args[2], parts[r][0][2])


@pytest.mark.parametrize("method", ["ring", "alltoall"])
def test_cp2_matches_single_process(method, tiny_data, single_process_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / method, 2, "--parallel.cp", "2", "--parallel.cp_method", method)
    _assert_cp_parity(single_process_ref, got)


def test_cp2_x_pp2_matches_single_process(tiny_data, single_process_ref, tmp_path):
    """Each pipeline stage's attention rings over its cp group; the runner feeds the stages this
    rank's zigzag chunks and their global RoPE positions (tied embeddings: first and last stage)."""
    got = train_layout(tiny_data, tmp_path / "cp2-x-pp2", 4, "--parallel.cp", "2", "--parallel.pp", "2")
    _assert_cp_parity(single_process_ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_cp2_on_deepspeed_matches_single_process(stage, tiny_data, single_process_ref, tmp_path):
    """The DeepSpeed engine averages gradients over every rank: the cp ranks count as its data-parallel ranks."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[test]')")
    got = train_layout(
        tiny_data,
        tmp_path / f"cp2-zero{stage}",
        2,
        "--parallel.cp",
        "2",
        "--parallel.dp_backend",
        "deepspeed",
        "--parallel.zero_stage",
        str(stage),
    )
    _assert_cp_parity(single_process_ref, got)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("cp4-ring", 4, ("--parallel.cp", "4")),
        ("cp2-x-tp2", 4, ("--parallel.cp", "2", "--parallel.tp", "2")),
        ("cp2-x-fsdp2", 4, ("--parallel.cp", "2", "--parallel.dp_shard", "2")),
        (
            "cp2-alltoall-x-fsdp2",
            4,
            ("--parallel.cp", "2", "--parallel.dp_shard", "2", "--parallel.cp_method", "alltoall"),
        ),
        # zero-bubble's split backward with the FSDP2 that cp brings: parameters gathered until the weight pass
        (
            "cp2-x-pp2-zero-bubble",
            4,
            (
                "--parallel.cp",
                "2",
                "--parallel.pp",
                "2",
                "--parallel.pp_schedule",
                "zero_bubble",
                "--parallel.fsdp_reshard_after_forward",
                "false",
            ),
        ),
    ],
)
def test_cp_layouts_match_single_process(name, world, overrides, tiny_data, single_process_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, *overrides)
    _assert_cp_parity(single_process_ref, got)


DOCS = ("--data.document_mask", "true", "--train.eval_interval", "5", "--train.eval_batches", "2")
"""Document masking plus validation every 5 steps (the eval path splits too)."""


@pytest.fixture(scope="module")
def docs_ref(tiny_data, tmp_path_factory):
    return train_layout(tiny_data, tmp_path_factory.mktemp("cp_docs") / "ref-docs", 1, *DOCS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("cp2-docs", 2, ("--parallel.cp", "2")),
        # the document ids reach every pipeline stage as a keyword input, split into microbatches with the tokens
        ("pp2-docs", 2, ("--parallel.pp", "2")),
        (
            "cp2-x-pp2-docs",
            4,
            ("--parallel.cp", "2", "--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b"),
        ),
    ],
)
def test_document_mask_and_validation_match_single_process(name, world, overrides, tiny_data, docs_ref, tmp_path):
    """Packed documents crossing the zigzag chunks (and the pipeline's stages)."""
    ref = docs_ref
    got = train_layout(tiny_data, tmp_path / name, world, *DOCS, *overrides)
    _assert_cp_parity(ref, got)
    val = [[r["val_loss"] for r in read_metrics(run.output_dir) if "val_loss" in r] for run in (ref, got)]
    assert len(val[0]) == 3  # steps 0, 5, 10
    torch.testing.assert_close(
        torch.tensor(val[1], dtype=torch.float64), torch.tensor(val[0], dtype=torch.float64), rtol=1e-5, atol=0
    )


@pytest.mark.slow
def test_cp2_with_activation_checkpointing_matches_single_process(tiny_data, single_process_ref, tmp_path):
    """Full recomputation re-runs the ring forward inside backward, on every rank in the same order."""
    got = train_layout(
        tiny_data, tmp_path / "cp2-ac", 2, "--parallel.cp", "2", "--parallel.activation_checkpointing", "full"
    )
    _assert_cp_parity(single_process_ref, got)


@pytest.mark.slow
def test_cp2_checkpoint_resumes_in_one_process(tiny_data, single_process_ref, tmp_path):
    """A cp2 ring run's step-5 checkpoint continued by one process to step 10."""
    out = tmp_path / "cp2-then-1"
    args = [
        "train",
        *PARITY_ARGS,
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--checkpoint.interval",
        "5",
    ]
    run_ranks(2, [*args, "--parallel.cp", "2"])
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    run_ranks(1, args)  # resumes at step 5 without cp
    _assert_cp_parity(single_process_ref, read_result(out))


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_cp2(tiny_data, single_process_ref, tmp_path):
    """One process's step-5 checkpoint continued by cp2 all-to-all ranks to step 10."""
    out = tmp_path / "1-then-cp2"
    args = [
        "train",
        *PARITY_ARGS,
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--checkpoint.interval",
        "5",
    ]
    run_ranks(1, args)
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    run_ranks(2, [*args, "--parallel.cp", "2", "--parallel.cp_method", "alltoall"])
    _assert_cp_parity(single_process_ref, read_result(out))


@pytest.mark.slow
def test_cp2_with_compiled_blocks_matches_single_process(tiny_data, single_process_ref, tmp_path):
    """torch.compile'd blocks: the ring core runs eagerly between the compiled regions."""
    got = train_layout(tiny_data, tmp_path / "cp2-compile", 2, "--parallel.cp", "2", "--parallel.compile", "on")
    _assert_cp_parity(single_process_ref, got)
