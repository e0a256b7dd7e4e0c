"""The encoder-decoder (T5) under tensor, sequence, fully sharded and pipeline parallelism.

- Training parity (real `meshforge train` ranks, gloo): tp2, fsdp2, tp2 x fsdp2, pp2 (1f1b,
  encoder | decoder), pp2 (interleaved 1F1B and zero-bubble, four stages: the decoder stream
  and the position biases pass through an encoder-only stage) and pp2 x tp2 (gpipe, the split
  inside the encoder),
  each against one single-process run: losses of all 10 steps within 1e-5 relative, final
  parameters, and validation losses (steps 0, 5, 10: the forward-only schedule), z-losses
  and gradient norms (which catch a wrong loss or gradient scale).
- Communication: one forward + backward of the TP encoder-decoder under ``CommDebugMode``
  with the exact collectives of the plan, head-sharded position tables and halved weight
  shards, vocab-sharded logits, and loss and gradients equal to one process (so a plan that
  replicates everything, or gathers where it should not, cannot pass).
- Config: the pipeline split of encoder + decoder layers and its errors; MoE refused.

Parity tolerance for TP layouts: final params within atol 3e-6 as in test_parallel_tp.py
(the rowwise matmuls and the embedding lookup sum in a different order across ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from meshforge.config import ConfigError, load_config
from meshforge.parallel.job_checks import check_job
from meshforge.parallel.mesh import resolve_degrees
from meshforge.parallel.pipeline import plan_pipeline
from parallel_harness import REPO, TP_ATOL, assert_parity, free_port, train_layout
from test_encoder_decoder_train import T5_ARGS, t5_data  # noqa: F401  (the module-scoped data fixture)
from torch_compat import pp_tp

PAR_ARGS = (*T5_ARGS, "--train.eval_interval", "5", "--train.eval_batches", "2")
"""A 2+2-layer fp32 T5 (relative position bias, untied output), 10 steps, validation every 5."""


def _metric(out, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def ref(t5_data, tmp_path_factory):  # noqa: F811
    return train_layout(t5_data, tmp_path_factory.mktemp("encdec_ref") / "ref", 1, extra_args=PAR_ARGS)


def _assert_parity(ref, got, atol: float) -> None:
    assert_parity(ref, got, atol=atol)
    for key, steps in (("val_loss", [0, 5, 10]), ("grad_norm", list(range(1, 11))), ("z_loss", list(range(1, 11)))):
        want, have = _metric(ref.output_dir, key), _metric(got.output_dir, key)
        assert sorted(want) == sorted(have) == steps, key
        for step, v in want.items():
            assert have[step] == pytest.approx(v, rel=1e-5), (key, step)


@pytest.mark.parametrize(
    "name, world, overrides, atol",
    [
        ("tp2", 2, ("--parallel.tp", "2"), TP_ATOL),
        ("fsdp2", 2, (), 1e-6),
        pytest.param(
            "tp2xfsdp2", 4, ("--parallel.tp", "2", "--parallel.dp_shard", "2"), TP_ATOL, marks=pytest.mark.slow
        ),
        # encoder (2 layers) | decoder (2 layers): the encoder output crosses once
        ("pp2-1f1b", 2, ("--parallel.pp", "2", "--parallel.pp_schedule", "1f1b"), 1e-6),
        # 4 stages, one layer each: stage 0 hands the decoder stream and both biases through stage 1
        ("pp2-interleaved", 2, ("--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b"), 1e-6),
        # the same with input and weight gradients computed apart, the passed-through tensors included
        ("pp2-zero-bubble", 2, ("--parallel.pp", "2", "--parallel.pp_schedule", "zero_bubble"), 1e-6),
        # encoder layer 0 | encoder layer 1 + decoder: DTensor activations and head-sharded biases cross
        pp_tp(
            "pp2xtp2-gpipe",
            4,
            ("--parallel.pp", "2", "--parallel.pp_schedule", "gpipe", "--parallel.pp_split", "1", "--parallel.tp", "2"),
            TP_ATOL,
            slow=True,
        ),
    ],
)
def test_encoder_decoder_layouts_match_single_process(name, world, overrides, atol, t5_data, ref, tmp_path):  # noqa: F811
    got = train_layout(t5_data, tmp_path / name, world, *overrides, extra_args=PAR_ARGS)
    _assert_parity(ref, got, atol)


@pytest.mark.slow
def test_tied_encoder_decoder_pipeline_matches_single_process(t5_data, tmp_path):  # noqa: F811
    """A tied T5 (the output projection shares the embedding, logits scaled by dim^-1/2) over pp2:
    stage 0 embeds both streams, the last stage's copy projects; their gradients are summed."""
    tied = ("--model.tie_embeddings", "true")
    want = train_layout(t5_data, tmp_path / "ref", 1, *tied, extra_args=PAR_ARGS)
    got = train_layout(
        t5_data, tmp_path / "pp2", 2, *tied, "--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", extra_args=PAR_ARGS
    )
    torch.testing.assert_close(got.params["output.weight"], got.params["tok_embeddings.weight"], rtol=0, atol=0)
    _assert_parity(want, got, 1e-6)


def test_moe_encoder_decoder_ep2_matches_single_process(t5_data, tmp_path):  # noqa: F811
    """ST-MoE-style: every encoder and decoder FFN an MoE of 4 experts (top-2), experts over ep = 2."""
    moe = ("--model.moe_experts", "4", "--model.moe_top_k", "2")
    want = train_layout(t5_data, tmp_path / "ref", 1, *moe, extra_args=PAR_ARGS)
    got = train_layout(t5_data, tmp_path / "ep2", 2, *moe, "--parallel.ep", "2", extra_args=PAR_ARGS)
    assert any(".experts." in k for k in want.params)
    _assert_parity(want, got, 1e-6)


# --------------------------------------------------------------------------- communication


@pytest.fixture(scope="module")
def comm_report(tmp_path_factory) -> dict:
    """Run tests/harness/encoder_decoder_tp_check.py as 2 gloo ranks; rank 0's JSON report."""
    out = tmp_path_factory.mktemp("encdec_tp_comm") / "report.json"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "harness" / "encoder_decoder_tp_check.py"), str(out)],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=300)[1].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    return json.loads(out.read_text())


def _counts(report: dict, module: str, phase: str) -> dict:
    return report["modules"].get(module, {}).get(phase, {})


def test_encoder_decoder_tp_collectives(comm_report):
    r = comm_report
    n_enc, n_dec = r["n_enc"], r["n_dec"]
    root = "EncoderDecoder"
    for i in range(n_enc):  # attention and FFN: gather the normed sequence shard, reduce-scatter the output
        block = f"{root}.encoder.layers.{i}"
        for phase in ("forward", "backward"):
            assert _counts(r, block, phase) == {"all_gather": 2, "reduce_scatter": 2}, (block, phase)
        for norm in ("attention_norm", "ffn_norm"):
            assert _counts(r, f"{block}.{norm}", "forward") == {"all_gather": 1}
    for i in range(n_dec):  # self-attention, cross-attention, FFN
        block = f"{root}.decoder.layers.{i}"
        for phase in ("forward", "backward"):
            assert _counts(r, block, phase) == {"all_gather": 3, "reduce_scatter": 3}, (block, phase)
        # cross-attention reads the encoder output already gathered: only its output is reduce-scattered
        assert _counts(r, f"{block}.cross_attention", "forward") == {"reduce_scatter": 1}
    # the encoder output is gathered once for every cross-attention; its gradients (partial over
    # heads, summed over the decoder layers) are reduce-scattered once
    assert _counts(r, f"{root}.encoder.norm", "forward") == {"all_gather": 1}
    assert _counts(r, f"{root}.encoder.norm", "backward") == {"reduce_scatter": 1}
    # one vocab-sharded table looked up twice (source and decoder inputs)
    assert _counts(r, f"{root}.tok_embeddings", "forward") == {"reduce_scatter": 2}
    assert _counts(r, f"{root}.output", "forward") == {"all_gather": 1}
    # the head-sharded position tables need no communication at all
    for stack in ("encoder", "decoder"):
        assert not _counts(r, f"{root}.{stack}.rel_bias", "forward")
        assert not _counts(r, f"{root}.{stack}.rel_bias", "backward")
    gathers = 2 * n_enc + 3 * n_dec + 2  # + the encoder output and the output projection's input
    scatters = 2 * n_enc + 3 * n_dec + 2  # + the two embedding lookups
    assert _counts(r, "Global", "forward") == {"all_gather": gathers, "reduce_scatter": scatters, "all_reduce": 3}
    assert _counts(r, "Global", "backward") == {"all_gather": scatters, "reduce_scatter": gathers}
    # loss parallel: logits stay vocab-sharded
    assert r["logits_is_dtensor"] and r["logits_local_shape"][-1] == r["vocab"] // 2
    assert r["logits_global_shape"][-1] == r["vocab"]


def test_encoder_decoder_tp_shards_weights_and_matches_reference_grads(comm_report):
    r = comm_report
    params = r["params"]

    def check(name, placement, dim):
        p = params[name]
        assert p["placements"] == [placement], (name, p)
        expect = list(p["global"])
        expect[dim] //= 2
        assert p["local"] == expect, (name, p)

    attn = {"encoder": ("attention",), "decoder": ("self_attention", "cross_attention")}
    for stack, n in (("encoder", r["n_enc"]), ("decoder", r["n_dec"])):
        check(f"{stack}.rel_bias.weight", "S(1)", 1)  # [buckets, heads]: this rank's heads
        assert params[f"{stack}.norm.weight"]["placements"] == ["R"]
        for i in range(n):
            pre = f"{stack}.layers.{i}"
            for a in attn[stack]:
                for w in ("wq", "wk", "wv"):
                    check(f"{pre}.{a}.{w}.weight", "S(0)", 0)  # colwise: this rank's heads
                check(f"{pre}.{a}.wo.weight", "S(1)", 1)  # rowwise
            check(f"{pre}.feed_forward.w1.weight", "S(0)", 0)
            check(f"{pre}.feed_forward.w3.weight", "S(0)", 0)
            check(f"{pre}.feed_forward.w2.weight", "S(1)", 1)
    check("tok_embeddings.weight", "S(0)", 0)
    check("output.weight", "S(0)", 0)
    assert max(r["loss_err"].values()) < 1e-6, r["loss_err"]
    assert max(r["grad_err"].values()) < 1e-6, {k: v for k, v in r["grad_err"].items() if v >= 1e-6}


# --------------------------------------------------------------------------- config


def _cfg(*overrides):
    return load_config(
        "t5-small",
        [
            "--model.n_layers",
            "3",
            "--model.n_decoder_layers",
            "2",
            "--train.global_batch_size",
            "8",
            "--train.micro_batch_size",
            "2",
            *overrides,
        ],
    )


def test_pipeline_split_counts_encoder_then_decoder_layers():
    cfg = _cfg("--parallel.pp", "2")
    plan = plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2))
    assert plan.layer_ranges == ((0, 3), (3, 5))  # 3 encoder + 2 decoder layers
    cfg = _cfg("--parallel.pp", "2", "--parallel.pp_split", "4")
    assert plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2)).layer_ranges == ((0, 4), (4, 5))
    cfg = _cfg("--parallel.pp", "2", "--parallel.pp_split", "5")
    with pytest.raises(ConfigError, match=r"within 1\.\.4 \(model.n_layers \+ decoder layers \(3 \+ 2\) = 5\)"):
        plan_pipeline(cfg, resolve_degrees(cfg.parallel, 2))
    cfg = _cfg(
        "--parallel.pp",
        "4",
        "--parallel.pp_schedule",
        "interleaved_1f1b",
        "--model.n_layers",
        "2",
        "--model.n_decoder_layers",
        "1",
        "--train.micro_batch_size",
        "1",
    )
    with pytest.raises(ConfigError, match=r"model.n_layers \+ decoder layers \(2 \+ 1\) = 3 cannot cover 8 pipeline"):
        check_job(cfg, resolve_degrees(cfg.parallel, 4))


def test_moe_encoder_decoder_is_refused_for_tp_and_pp():
    dense = _cfg("--parallel.tp", "2")
    check_job(dense, resolve_degrees(dense.parallel, 2))
    cfg = _cfg("--parallel.tp", "2", "--model.moe_experts", "4")
    with pytest.raises(ConfigError, match="MoE feed-forwards in the decoder family only, not in an encoder_decoder"):
        check_job(cfg, resolve_degrees(cfg.parallel, 2))
    cfg = _cfg("--parallel.pp", "2", "--model.moe_experts", "4")
    with pytest.raises(ConfigError, match="MoE layers in the decoder family only, not in an encoder_decoder"):
        check_job(cfg, resolve_degrees(cfg.parallel, 2))


@pytest.mark.parametrize("position", ["relative", "rope"])
@pytest.mark.parametrize(
    "layout",
    [
        ("--parallel.pp", "2"),  # encoder | decoder
        ("--parallel.pp", "2", "--parallel.pp_split", "1"),  # inside the encoder
        ("--parallel.pp", "2", "--parallel.pp_split", "4"),  # inside the decoder
        ("--parallel.pp", "3", "--parallel.pp_split", "2,3"),  # a stage that ends exactly with the encoder
        ("--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b"),  # loop placement, 4 stages
    ],
)
def test_stages_hold_the_model_and_compose_to_its_forward(position, layout):
    """Every rank's view together holds exactly the model's parameters, by name and value, and
    running the stages one after another (activations, then logits) is the model's forward, bit for bit."""
    from meshforge.models import build_model
    from meshforge.parallel.pipeline import PipelineModel, split_model

    cfg = _cfg(
        "--model.vocab_size",
        "128",
        "--model.dim",
        "32",
        "--model.n_heads",
        "4",
        "--model.ffn_dim",
        "64",
        "--model.position_encoding",
        position,
        *layout,
    )
    plan = plan_pipeline(cfg, resolve_degrees(cfg.parallel, cfg.parallel.pp))
    torch.manual_seed(0)
    full = build_model(cfg.model)
    gen = torch.Generator().manual_seed(1)
    src, tgt_in = torch.randint(2, 128, (2, 12), generator=gen), torch.randint(2, 128, (2, 7), generator=gen)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[0, -3:] = False
    want = full(src, tgt_in, src_mask)
    seen, stages = {}, {}
    for rank in range(plan.pp):
        torch.manual_seed(0)
        parts = split_model(build_model(cfg.model), plan, rank)
        sd = PipelineModel(parts, plan.stages_of_rank(rank), plan).state_dict()
        assert not seen.keys() & sd.keys()
        seen.update(sd)
        stages.update(zip(plan.stages_of_rank(rank), parts))
    assert seen.keys() == full.state_dict().keys()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(seen[k], v, rtol=0, atol=0)
    acts = (src, tgt_in)
    for sid in range(plan.n_stages):
        out = stages[sid](*acts, src_mask=src_mask)
        acts = out if isinstance(out, tuple) else (out,)
    torch.testing.assert_close(acts[0], want, rtol=0, atol=0)
