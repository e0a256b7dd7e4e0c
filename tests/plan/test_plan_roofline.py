"""Compute priced op by op (meshforge/plan/roofline.py): the terms against hand-computed values, the
non-GEMM work lowering the predicted MFU, the --efficiency override's flat formula, the --why split."""

from __future__ import annotations

import dataclasses

import pytest

from meshforge.cli import main
from meshforge.config import load_config
from meshforge.plan.compute import efficiency_curves, model_flops_per_token
from meshforge.plan.devices import get_device
from meshforge.plan.layouts import Layout, check_layout
from meshforge.plan.time_model import estimate_time

H100 = get_device("h100-80gb")
TINY = {
    "model.dim": 256,
    "model.n_heads": 4,
    "model.n_kv_heads": 4,
    "model.n_layers": 2,
    "model.ffn_dim": 768,
    "model.vocab_size": 1000,
    "model.tie_embeddings": False,
    "model.qk_norm": False,
    "model.max_seq_len": 512,
    "data.seq_len": 512,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 1,
    "train.device": "cuda",
}


def test_roofline_terms_equal_hand_computed_values():
    """A 2-layer, 256-wide model on 2 H100s (FSDP2 over both, 4 microbatches of one 512-token sample): every
    GEMM is below the curve's first point and the sequence is attention's first point, so each term is a
    closed form of the shapes, the data-sheet bandwidth and the calibrated overhead."""
    lay = Layout(1, 1, 1, 2)
    cfg = check_layout(load_config("llama-1b", TINY), lay)
    t = estimate_time(cfg, lay, H100, 8)
    entry = efficiency_curves()["h100-80gb"]
    k, g0, a0 = entry["overhead"], entry["gemm"][0][1], entry["attention"][0][1]
    assert entry["gemm"][0][0] > 2 * 512 * 1000 * 256 and entry["attention"][0][0] == 512
    D, F, V, L, T, H, hd, e, mb = 256, 768, 1000, 2, 512, 4, 64, 2, 4
    peak, bw = 989e12, 3.35e12
    # GEMMs: q, k, v, o (4 D^2), w1, w3, w2 (3 D F) per block, the output projection (V D): forward + 2 backward
    gemm_flops = 3 * 2 * T * (L * (4 * D * D + 3 * D * F) + V * D)
    assert t.compute_parts["gemm"] == pytest.approx(k * mb * gemm_flops / (peak * g0))
    # attention: QK^T and PV (2 x 2 T T hd per head), causal half, forward + backward
    attn_flops = 3 * L * H * 2 * 2 * T * T * hd / 2
    assert t.compute_parts["attention"] == pytest.approx(k * mb * attn_flops / (peak * a0))
    # memory-bound, per token: 2 norms (5 D e), 2 residual adds (6 D e), RoPE on q, k (4 x 2 D e), the gate
    # (8 F e); embedding 5 D e and final norm 5 D e; loss (2 e + 32) per logit
    per_token = L * (2 * 5 * D * e + 2 * 6 * D * e + 4 * 2 * D * e + 8 * F * e) + 10 * D * e + (2 * e + 32) * V
    params = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
    accumulate = 8 * params * (mb - 1)  # grad_sync = "step": the unsharded gradients, microbatches 2 to 4
    assert t.compute_parts["memory"] == pytest.approx(k * (mb * T * per_token + accumulate) / bw)
    # AdamW on the half each rank holds: 28 bytes a parameter, the gradient norm 4 more
    assert t.compute_parts["optimizer"] == pytest.approx(k * params / 2 * 32 / bw)
    assert t.compute_s == pytest.approx(sum(t.compute_parts.values()))
    # recompute: full runs the blocks' forward GEMMs and attention again, selective their memory-bound forward
    full = estimate_time(cfg, dataclasses.replace(lay, ac="full"), H100, 8)
    block_fwd = 2 * T * L * (4 * D * D + 3 * D * F)
    assert full.compute_parts["gemm"] - t.compute_parts["gemm"] == pytest.approx(k * mb * block_fwd / (peak * g0))
    assert full.compute_parts["attention"] == pytest.approx(t.compute_parts["attention"] * 4 / 3)
    sel = estimate_time(cfg, dataclasses.replace(lay, ac="selective"), H100, 8)
    fwd_bytes = L * (2 * 2 * D * e + 2 * 3 * D * e + 2 * 2 * D * e + 3 * F * e)
    assert sel.compute_parts["memory"] - t.compute_parts["memory"] == pytest.approx(k * mb * T * fwd_bytes / bw)
    assert sel.compute_parts["gemm"] == t.compute_parts["gemm"]


def test_non_gemm_work_lowers_the_predicted_mfu():
    """The same FLOPs with more memory traffic (QK-norm: no FLOPs counted, bytes moved) run slower; a narrow
    model with a long vocabulary spends a larger share of its compute outside GEMMs and predicts a lower MFU
    than a wide one with a short vocabulary. Under one flat efficiency neither differs."""
    lay = Layout(1, 1, 1, 8)
    base = load_config("llama-1b", {"train.global_batch_size": 64, "model.qk_norm": False})
    normed = load_config("llama-1b", {"train.global_batch_size": 64, "model.qk_norm": True})
    # the norms' weights add ~nothing to the FLOPs
    assert model_flops_per_token(base) == pytest.approx(model_flops_per_token(normed), rel=1e-5)
    plain, qk = (estimate_time(check_layout(c, lay), lay, H100, 8) for c in (base, normed))
    assert qk.compute_parts["memory"] > plain.compute_parts["memory"] and qk.mfu < plain.mfu
    flat = [estimate_time(check_layout(c, lay), lay, H100, 8, efficiency=0.5).mfu for c in (base, normed)]
    assert flat[0] == pytest.approx(flat[1])

    def split(overrides):
        cfg = check_layout(load_config("llama-1b", {"train.global_batch_size": 64, **overrides}), lay)
        t = estimate_time(cfg, lay, H100, 8)
        return 1 - t.compute_parts["gemm"] / t.compute_s, t.mfu

    narrow = split({"model.dim": 512, "model.n_heads": 8, "model.n_kv_heads": 8, "model.vocab_size": 256_000})
    wide = split({"model.dim": 4096, "model.n_heads": 32, "model.n_kv_heads": 8, "model.vocab_size": 32_000})
    assert narrow[0] > wide[0] + 0.2 and narrow[1] < wide[1]


def test_efficiency_override_is_the_flat_formula():
    """``--efficiency F``: FLOPs / (peak F), full recompute 4/3, no per-op parts -- as before the roofline;
    the CPU (no curve, no bandwidth) keeps the flat 0.5."""
    lay = Layout(1, 1, 1, 8, ac="full")
    cfg = check_layout(load_config("llama-1b", {"train.global_batch_size": 64}), lay)
    t = estimate_time(cfg, lay, H100, 8, efficiency=0.4)
    tokens = 64 * cfg.data.seq_len
    assert t.compute_s == pytest.approx(model_flops_per_token(cfg) * tokens / 8 / (989e12 * 0.4) * 4 / 3)
    assert t.compute_parts == {}
    cpu_cfg = load_config("small", {"train.device": "cpu"})
    cpu = get_device("cpu")
    assert cpu.hbm_bytes_per_s == 0.0
    one = Layout(1, 1, 1, 2)
    assert estimate_time(cpu_cfg, one, cpu, 2).compute_s == pytest.approx(
        estimate_time(cpu_cfg, one, cpu, 2, efficiency=0.5).compute_s
    )


def test_why_splits_compute_into_its_parts(capsys):
    argv = ["plan", "--config", "llama-1b", "--gpus", "8", "--parallel.tp", "2", "--parallel.dp_shard", "4", "--why"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    parts, compute = {}, None
    for line in out.splitlines()[1:]:
        name = line[:28].strip()
        if line.startswith("  compute "):
            compute = float(line[26:].split()[0])
        elif name in ("GEMMs", "attention", "memory-bound ops", "optimizer step"):
            parts[name] = float(line[28:].split()[0])
    assert len(parts) == 4 and all(v > 0 for v in parts.values())
    assert sum(parts.values()) == pytest.approx(compute, abs=5e-4)
    assert parts["GEMMs"] > parts["memory-bound ops"]
