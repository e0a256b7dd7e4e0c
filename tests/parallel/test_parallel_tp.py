"""Tensor parallel with sequence parallel and loss parallel, against the single-process run.

- Training parity (real `meshforge train` ranks, gloo): tp2, tp2 without loss parallel,
  tp2 x fsdp2 on 4 ranks, and tp2 with untied embeddings. The tiny-test preset has
  QK-norm on, 4 query heads and 2 KV heads (GQA), and ties its embeddings, so every run
  checks QK-norm grads and the (un)tied embedding/output on the vocab-sharded layout.
- Communication: one forward + backward of the TP decoder under ``CommDebugMode`` with the
  exact collectives sequence parallel needs, halved weight shards, and logits that stay
  vocab-sharded with loss parallel (so a plan that silently replicates cannot pass).
- A tp that does not divide the heads fails with one clear line before any process group.

Parity tolerance: losses within 1e-5 relative (observed ~1e-7). Final params within
rtol 1e-5 and atol 3e-6 instead of the harness's 1e-6: TP splits the contraction of the
rowwise matmuls (wo, w2) and of the embedding lookup across ranks, so their sums run in a
different order; after 10 AdamW steps a handful of the ~200k weights whose gradient nearly
cancels differ by up to ~1.4e-6 (median difference ~2e-10). Gradient agreement itself is
checked at 1e-6 relative in the communication test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from parallel_harness import REPO, TP_ATOL, assert_parity, free_port, train_layout


def _param_drift(ref, got) -> float:
    """Largest per-tensor relative L2 difference of the final parameters."""
    return max(((got.params[k] - v).norm() / v.norm()).item() for k, v in ref.params.items())


def test_tiny_preset_exercises_qk_norm_and_gqa():
    m = load_config("tiny-test").model
    assert m.qk_norm and m.tie_embeddings
    assert (m.n_heads, m.kv_heads) == (4, 2)


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("tp2", 2, ("--parallel.tp", "2")),
        ("tp2-no-loss-parallel", 2, ("--parallel.tp", "2", "--parallel.loss_parallel", "false")),
        ("tp2-x-fsdp2", 4, ("--parallel.tp", "2", "--parallel.dp_shard", "2")),
    ],
)
def test_tp_layouts_match_single_process(name, world, overrides, tiny_data, single_process_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, *overrides)
    assert_parity(single_process_ref, got, atol=TP_ATOL)
    assert _param_drift(single_process_ref, got) < 1e-5


@pytest.mark.slow
def test_tp_untied_embeddings_match_single_process(tiny_data, tmp_path):
    ref = train_layout(tiny_data, tmp_path / "ref-untied", 1, "--model.tie_embeddings", "false")
    got = train_layout(tiny_data, tmp_path / "tp2-untied", 2, "--model.tie_embeddings", "false", "--parallel.tp", "2")
    assert "output.weight" in ref.params
    assert not torch.equal(ref.params["output.weight"], ref.params["tok_embeddings.weight"])
    assert_parity(ref, got, atol=TP_ATOL)
    assert _param_drift(ref, got) < 1e-5


# --------------------------------------------------------------------------- communication


@pytest.fixture(scope="module")
def comm_report(tmp_path_factory) -> dict:
    """Run tests/harness/tp_comm_check.py as 2 gloo ranks; rank 0's JSON report."""
    out = tmp_path_factory.mktemp("tp_comm") / "report.json"
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
                [sys.executable, str(REPO / "tests" / "harness" / "tp_comm_check.py"), str(out)],
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


@pytest.mark.parametrize("variant", ["sp_lp", "sp_nolp", "sp_lp_untied"])
def test_sequence_parallel_collectives(comm_report, variant):
    r = comm_report[variant]
    n_layers = r["n_layers"]
    for i in range(n_layers):
        block = f"Decoder.layers.{i}"
        # attention and FFN: all-gather the sequence-sharded input, reduce-scatter the output
        assert _counts(r, block, "forward") == {"all_gather": 2, "reduce_scatter": 2}
        assert _counts(r, block, "backward") == {"all_gather": 2, "reduce_scatter": 2}
        for sub in ("attention", "feed_forward"):
            assert _counts(r, f"{block}.{sub}", "forward") == {"all_gather": 1, "reduce_scatter": 1}
    # vocab-sharded embedding: partial lookups reduce-scattered onto the sequence dim
    assert _counts(r, "Decoder.tok_embeddings", "forward") == {"reduce_scatter": 1}
    out_fwd = _counts(r, "Decoder.output", "forward")
    assert _counts(r, "Decoder.output", "backward") == {"reduce_scatter": 1}
    glob_fwd, glob_bwd = _counts(r, "Global", "forward"), _counts(r, "Global", "backward")
    assert glob_bwd == {"all_gather": 2 * n_layers + 1, "reduce_scatter": 2 * n_layers + 1}
    vocab = r["vocab"]
    if variant.startswith("sp_lp"):
        # loss parallel: the final norm output is gathered once, the logits never are;
        # the loss costs three [B*T] all-reduces (max, sum-exp, target logit)
        assert out_fwd == {"all_gather": 1}
        assert glob_fwd == {"all_gather": 2 * n_layers + 1, "reduce_scatter": 2 * n_layers + 1, "all_reduce": 3}
        assert r["logits_is_dtensor"]
        assert r["logits_local_shape"][-1] == vocab // 2 and r["logits_global_shape"][-1] == vocab
    else:
        # plain loss: one more all-gather, of the logits, into full replicated logits
        assert out_fwd == {"all_gather": 2}
        assert glob_fwd == {"all_gather": 2 * n_layers + 2, "reduce_scatter": 2 * n_layers + 1}
        assert not r["logits_is_dtensor"] and r["logits_local_shape"][-1] == vocab


def test_tensor_parallel_without_sequence_parallel_collectives(comm_report):
    """The plan with sequence_parallel=False: Megatron TP, all-reduces on a replicated stream."""
    r = comm_report["nosp_lp"]
    for i in range(r["n_layers"]):
        assert _counts(r, f"Decoder.layers.{i}", "forward") == {"all_reduce": 2}
        assert _counts(r, f"Decoder.layers.{i}", "backward") == {"all_reduce": 2}
    assert r["logits_local_shape"][-1] == r["vocab"] // 2
    assert max(r["grad_err"].values()) < 1e-6


@pytest.mark.parametrize("variant", ["sp_lp", "sp_nolp", "nosp_lp", "sp_lp_untied"])
def test_tp_shards_weights_and_matches_reference_grads(comm_report, variant):
    r = comm_report[variant]
    params = r["params"]

    def check(name, placement, dim):
        p = params[name]
        assert p["placements"] == [placement], (name, p)
        expect = list(p["global"])
        expect[dim] //= 2
        assert p["local"] == expect, (name, p)

    for i in range(r["n_layers"]):
        pre = f"layers.{i}"
        for w in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            check(f"{pre}.{w}.weight", "S(0)", 0)  # colwise: half the output rows
        for w in ("attention.wo", "feed_forward.w2"):
            check(f"{pre}.{w}.weight", "S(1)", 1)  # rowwise: half the input cols
        if variant != "nosp_lp":
            for norm in ("attention_norm", "ffn_norm"):
                assert params[f"{pre}.{norm}.weight"]["placements"] == ["R"]
        if variant != "sp_lp_untied":  # QK-norm on: replicated weights whose grads are summed over tp
            for norm in ("q_norm", "k_norm"):
                assert params[f"{pre}.attention.{norm}.weight"]["placements"] == ["R"]
    check("tok_embeddings.weight", "S(0)", 0)  # vocab rows
    if variant == "sp_lp_untied":
        assert not r["tied"]
        check("output.weight", "S(0)", 0)
    else:
        assert r["tied"] and "output.weight" not in params  # one shared parameter
    # one forward+backward (with ignored targets and z-loss) equals the single-process model
    assert max(r["loss_err"].values()) < 1e-6, r["loss_err"]
    assert max(r["grad_err"].values()) < 1e-6, {k: v for k, v in r["grad_err"].items() if v >= 1e-6}


# --------------------------------------------------------------------------- errors


def test_tp_not_dividing_heads_fails_before_process_groups(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    for world, tp, message in (
        (3, 3, "model.n_heads = 4 does not divide by parallel.tp = 3"),
        (4, 4, "model.n_kv_heads = 2 does not divide by parallel.tp = 4"),
    ):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
        out = tmp_path / f"run-tp{tp}"
        args = [
            "train",
            "--config",
            "tiny-test",
            "--data.path",
            str(tiny_data),
            "--train.output_dir",
            str(out),
            "--parallel.tp",
            str(tp),
        ]
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert err.count("\n") == 1, f"expected one line: {err!r}"
        assert not dist.is_initialized()
        assert not out.exists()


def test_tp_with_an_moe_encoder_decoder_fails_before_process_groups(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "t5-small",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
        "--parallel.tp",
        "2",
        "--model.moe_experts",
        "4",
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "MoE feed-forwards in the decoder family only, not in an encoder_decoder" in err, err
    assert err.count("\n") == 1, err
    assert not dist.is_initialized() and not out.exists()
