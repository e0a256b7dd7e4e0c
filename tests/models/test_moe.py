"""MoE layer: routing, capacity dropping, aux losses, bias update, equivalence with a dense FFN."""

import math

import pytest
import torch

from meshforge.config import ModelConfig
from meshforge.models import build_model
from meshforge.models.layers import FeedForward
from meshforge.models.moe import STAT_KEYS, MoE, RouterStats, collect_router_stats


def moe_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=97, dim=16, n_layers=2, n_heads=2, max_seq_len=32, moe_experts=4, moe_top_k=2, moe_ffn_dim=24
    )
    return ModelConfig(**{**base, **kw})


def make_moe(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(moe_cfg(**kw))
    m.init_weights(0.2, 0.2)
    return m


def collected(m: MoE, x: torch.Tensor, aux_grad_scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """``m(x)`` with a step's collector lent to it; its summed statistics by key (``load``: per expert)."""
    stats = RouterStats(aux_grad_scale)
    with collect_router_stats(m, stats):
        y = m(x)
    sums = stats.sums(m)
    got = {} if sums is None else {**dict(zip(STAT_KEYS, sums[: len(STAT_KEYS)])), "load": sums[len(STAT_KEYS) :]}
    return y, got


def reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: y_t = sum_{e in topk} g_te FFN_e(x_t) (+ shared)."""
    ids, w, _, _ = m.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(m.top_k):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(x[t] @ m.experts.w1[e].T) * (x[t] @ m.experts.w3[e].T)
            out[t] += w[t, j] * (h @ m.experts.w2[e].T)
    if m.shared is not None:
        out += m.shared(x)
    return out


@pytest.mark.parametrize("kw", [{}, {"moe_score": "sigmoid"}, {"moe_shared_experts": 1}, {"moe_norm_topk": False}])
def test_dropless_matches_token_loop(kw):
    m = make_moe(**kw)
    x = torch.randn(20, 16)
    torch.testing.assert_close(m(x), reference(m, x), rtol=1e-5, atol=1e-6)


def test_single_expert_equals_dense_ffn():
    m = make_moe(moe_experts=1, moe_top_k=1)
    ffn = FeedForward(16, 24)
    with torch.no_grad():
        ffn.w1.weight.copy_(m.experts.w1[0])
        ffn.w3.weight.copy_(m.experts.w3[0])
        ffn.w2.weight.copy_(m.experts.w2[0])
    x = torch.randn(7, 16)
    torch.testing.assert_close(m(x), ffn(x), rtol=1e-5, atol=1e-6)


def test_capacity_keeps_highest_probability_tokens():
    m = make_moe(moe_top_k=1, moe_capacity_factor=0.5)
    n = 16
    with torch.no_grad():  # every token prefers expert 0, with increasing confidence
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0
    x = torch.zeros(n, 16)
    x[:, 0] = torch.linspace(1, 4, n)
    ids, _, _, probs = m.route(x)
    assert (ids[:, 0] == 0).all()
    keep = m.keep_mask(ids, probs.gather(1, ids), n)
    capacity = math.ceil(0.5 * n * 1 / 4)
    assert keep.sum() == capacity
    assert keep[-capacity:].all() and not keep[:-capacity].any()  # the most confident tokens stay
    y, stats = collected(m, x)
    dropped_rows = y.abs().sum(-1) == 0
    assert dropped_rows.sum() == n - capacity
    assert stats["dropped"] == n - capacity and stats["assigned"] == n


def test_aux_loss_equals_formula_on_hand_case():
    """2 experts, top-1, 4 tokens: probs chosen so f = (3/4, 1/4), P = mean probs."""
    m = make_moe(moe_experts=2, moe_top_k=1, moe_z_loss_coef=0.0)
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2, 16))
    x = torch.zeros(4, 16)
    x[:, :2] = logits
    _, stats = collected(m, x)
    p = logits.softmax(-1)
    f = torch.tensor([3 / 4, 1 / 4])
    expected = 2 * (f * p.mean(0)).sum()
    torch.testing.assert_close(stats["aux_loss"], expected)
    torch.testing.assert_close(stats["z_loss"], torch.logsumexp(logits, -1).square().mean())


def test_aux_loss_reaches_the_router_gradient():
    """Backward through the layer adds d(scale * aux)/d(router) to the router's gradient."""
    m = make_moe(moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1)
    x = torch.randn(12, 16)
    stats = RouterStats(aux_grad_scale=0.25)  # the step's weight of the aux losses
    with collect_router_stats(m, stats):
        m(x).sum().backward()
    got = m.router.weight.grad.clone()
    m.zero_grad()
    # explicit: output sum + 0.25 * (0.5 * balance + 0.1 * z)
    m.aux_coef = m.z_coef = 0.0
    y = m(x)
    ids, _, logits, probs = m.route(x)
    assigned = torch.bincount(ids.flatten(), minlength=4).float()
    balance = 4 * torch.sum(assigned / (12 * 2) * probs.mean(0))
    z = torch.logsumexp(logits, -1).square().mean()
    (y.sum() + 0.25 * (0.5 * balance + 0.1 * z)).backward()
    torch.testing.assert_close(got, m.router.weight.grad, rtol=1e-5, atol=1e-6)


def test_bias_update_moves_load_toward_balance():
    m = make_moe(moe_top_k=2)
    with torch.no_grad():
        m.router.weight.mul_(0.5)
        m.router.weight[0, 0] += 2.0  # expert 0 is strongly preferred
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1)).abs()
    spread = []
    for _ in range(100):
        load = collected(m, x)[1]["load"]
        spread.append(float(load.max() - load.min()))
        m.update_bias(load, rate=0.01)
    assert spread[0] > 200
    assert max(spread[-10:]) < 0.3 * spread[0], spread[-10:]
    assert m.route_bias[0] < 0 < m.route_bias[1:].max()


def test_moe_decoder_builds_with_dense_first_layers():
    torch.manual_seed(0)
    model = build_model(moe_cfg(moe_dense_layers=1))
    assert not isinstance(model.layers["0"].feed_forward, MoE)
    assert isinstance(model.layers["1"].feed_forward, MoE)
    y = model(torch.randint(0, 97, (2, 8)))
    assert y.shape == (2, 8, 97) and torch.isfinite(y).all()


def test_moe_training_logs_router_metrics_and_resumes(tiny_data, tmp_path):
    from meshforge.config import load_config
    from meshforge.pretrain.metrics import read_metrics
    from meshforge.pretrain.trainer import Trainer

    over = {
        "data.path": str(tiny_data),
        "train.output_dir": str(tmp_path / "moe"),
        "train.steps": 12,
        "train.eval_interval": 0,
        "train.sample_prompt": "",
        "checkpoint.interval": 6,
        "model.moe_experts": 4,
        "model.moe_top_k": 2,
        "model.moe_dense_layers": 1,
        "model.moe_capacity_factor": 1.0,
        "model.moe_bias_update_rate": 0.001,
    }
    result = Trainer(load_config("tiny-test", over)).run()
    records = [r for r in read_metrics(tmp_path / "moe") if "loss" in r]
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"]
    for key in ("moe_aux_loss", "moe_z_loss", "moe_dropped_frac", "moe_load_cv/layers.1", "moe_load_max/layers.1"):
        assert all(key in r for r in records), key
    assert 0.9 < records[0]["moe_aux_loss"] < 2.0  # ~1 when balanced, E when collapsed
    assert 0.0 <= records[0]["moe_dropped_frac"] < 0.5
    # resume from step 6 reproduces steps 7..12 exactly (the routing bias is in the checkpoint)
    import shutil

    shutil.rmtree(tmp_path / "moe" / "checkpoints" / "step_00000012")
    again = Trainer(load_config("tiny-test", over)).run()
    assert again.losses == result.losses[6:]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_gemm_experts_match_the_per_expert_loop():
    """The grouped-GEMM path (GPU under bf16) computes what the loop does, values and gradients."""
    from meshforge.models.moe import swiglu_grouped, swiglu_loop

    torch.manual_seed(0)
    x = torch.randn(13, 16, requires_grad=True)
    ws = [torch.randn(4, 32, 16) / 4, torch.randn(4, 16, 32) / 4, torch.randn(4, 32, 16) / 4]
    for w in ws:
        w.requires_grad_(True)
    counts = torch.tensor([5, 0, 6, 2])  # an expert with no tokens too
    outs, grads = [], []
    for fn in (swiglu_grouped, swiglu_loop):
        y = fn(x, *ws, counts)
        g = torch.autograd.grad(y.pow(2).sum(), [x, *ws])
        outs.append(y)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_router_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    moe = MoE(moe_cfg())
    moe.router.weight.data.normal_()
    x = torch.randn(8, moe_cfg().dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weights, logits, probs = moe.route(x)
    assert logits.dtype == weights.dtype == probs.dtype == torch.float32
    torch.testing.assert_close(logits, x @ moe.router.weight.T, rtol=1e-6, atol=1e-6)


def test_eval_forwards_leave_router_statistics_alone():
    """Validation batches must not count in the step's metrics nor steer the aux-loss-free bias."""
    m = make_moe(moe_top_k=2)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    _, trained = collected(m, x)
    m.eval()
    with torch.no_grad():
        assert collected(m, x)[1] == {}
    m.train()
    _, again = collected(m, x)
    assert again.keys() == trained.keys() and trained["passes"] == 1
    for k, v in trained.items():
        torch.testing.assert_close(again[k], v)
    assert m.collector is None  # lent for the block only: no statistics live in the module


def test_router_stats_are_not_module_state():
    """Without a collector the layer computes and keeps nothing; one collector per step, rows per pass."""
    m = make_moe()
    x = torch.randn(8, 16)
    m(x)  # no collector lent: nothing recorded anywhere
    assert not [b for b in m.buffers() if b is not m.route_bias] and m.collector is None
    stats = RouterStats()
    with collect_router_stats(m, stats):
        m(x)
        m(x)
    assert len(stats.rows[m]) == 2
    stats.keep_last(1)
    assert len(stats.rows[m]) == 1 and stats.sums(m)[STAT_KEYS.index("passes")] == 1
