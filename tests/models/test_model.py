"""The decoder model: shapes, causality, GQA, tying, init determinism, loss and schedules."""

import math

import pytest
import torch
import torch.nn.functional as F

from meshforge.config import ModelConfig, OptimConfig
from meshforge.models import build_model, flops_per_token
from meshforge.models.layers import apply_rope, rope_tables
from meshforge.models.losses import IGNORE_INDEX, lm_loss
from meshforge.pretrain.optim import build_optimizer, lr_factor, param_groups

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def test_forward_shape_and_causality():
    torch.manual_seed(0)
    model = build_model(tiny(n_kv_heads=2, qk_norm=True))
    x = torch.randint(0, 97, (2, 16))
    y = model(x)
    assert y.shape == (2, 16, 97)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 97
    y2 = model(x2)
    torch.testing.assert_close(y[:, :10], y2[:, :10])  # earlier positions never see later tokens
    assert not torch.allclose(y[:, 10:], y2[:, 10:])


def test_init_is_deterministic_and_tied():
    torch.manual_seed(3)
    a = build_model(tiny())
    torch.manual_seed(3)
    b = build_model(tiny())
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.output.weight is a.tok_embeddings.weight
    untied = build_model(tiny(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() == a.num_params() + 97 * 32


def test_gqa_matches_repeated_kv_heads():
    """A GQA model equals an MHA model whose k/v projections repeat each kv head."""
    torch.manual_seed(0)
    gqa = build_model(tiny(n_kv_heads=2))
    mha = build_model(tiny())
    sd = gqa.state_dict()
    hd = 8
    for key in list(sd):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = sd[key].view(2, hd, 32)
            sd[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_relative_position():
    cos, sin = rope_tables(8, 32, 10000.0)
    q = torch.randn(1, 32, 1, 8)
    rq = apply_rope(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # <R_m q, R_n k> depends only on m - n
    k = torch.randn(8)
    qs = apply_rope(k.expand(1, 32, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(qs[3] @ qs[1], qs[12] @ qs[10], atol=1e-5)


def test_lm_loss_matches_cross_entropy_and_z_loss():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = IGNORE_INDEX
    parts = lm_loss(logits, targets, z_loss_coef=1e-2)
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(parts.ce, ref)
    lse = torch.logsumexp(logits, -1).view(-1)[1:]
    torch.testing.assert_close(parts.z_loss, 1e-2 * lse.square().mean())
    torch.testing.assert_close(parts.total, parts.ce + parts.z_loss)
    assert lm_loss(logits, targets).z_loss.item() == 0.0


def test_schedules():
    c = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, c) == pytest.approx(0.1)
    assert lr_factor(9, 100, c) == pytest.approx(1.0)
    assert lr_factor(99, 100, c) == pytest.approx(0.1)
    mid = lr_factor(10 + 89 // 2, 100, c)
    assert 0.5 < mid < 0.6
    w = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_factor(s, 100, w) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(89, 100, w) == pytest.approx(0.5)
    assert lr_factor(99, 100, w) == pytest.approx(0.0)
    ws = OptimConfig(schedule="wsd", wsd_decay="sqrt", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(84, 100, ws) == pytest.approx(1 - math.sqrt(0.25))


def test_weight_decay_only_on_matrices():
    model = build_model(tiny())
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()
    opt = build_optimizer(model, OptimConfig(), "cpu")
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_cpu_adamw_is_the_fused_kernel_and_steps_as_the_multi_tensor_one():
    """On a CPU the optimizer is the fused AdamW (6.5x faster than foreach at 27M parameters,
    bench/bench_adamw.py); three steps of it land where torch's multi-tensor AdamW does."""
    torch.manual_seed(0)
    model = build_model(tiny())
    twin = build_model(tiny())
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, OptimConfig(lr=1e-2), "cpu")
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    x = torch.arange(33).remainder(7)[None].repeat(4, 1)
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            lm_loss(m(x[:, :-1]), x[:, 1:]).total.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_small_model_learns_a_pattern():
    """A few AdamW steps on a repeating sequence drive the loss down (the model can learn)."""
    torch.manual_seed(0)
    model = build_model(tiny())
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0), "cpu")
    x = torch.arange(33).remainder(7)[None].repeat(4, 1)
    first = None
    for _ in range(30):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:]).total
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first


def test_document_mask_isolates_documents():
    """A token's output does not change when other documents in the window change."""
    torch.manual_seed(0)
    model = build_model(tiny(n_kv_heads=2))
    x = torch.randint(0, 97, (2, 20))
    segments = torch.tensor([[0] * 7 + [1] * 8 + [2] * 5, [0] * 20])
    base = model(x, segments)
    x2 = x.clone()
    x2[0, :7] = (x2[0, :7] + 5) % 97  # change document 0 of row 0
    x2[0, 15:] = (x2[0, 15:] + 5) % 97  # and document 2
    out = model(x2, segments)
    torch.testing.assert_close(out[0, 7:15], base[0, 7:15], rtol=1e-5, atol=1e-5)  # document 1 unaffected
    assert not torch.allclose(out[0, :7], base[0, :7])
    torch.testing.assert_close(base[1], model(x[1:])[0], rtol=1e-5, atol=1e-5)  # one document == plain causal
    # without segments the same change leaks into document 1
    assert not torch.allclose(model(x2)[0, 7:15], model(x)[0, 7:15])


def test_flex_document_mask_matches_dense():
    from meshforge.models.layers import document_mask

    torch.manual_seed(0)
    model = build_model(tiny(n_kv_heads=2))
    attn = model.layers["0"].attention
    x = torch.randn(2, 16, 32)
    segments = torch.tensor([[0] * 5 + [1] * 11, [0] * 3 + [1] * 3 + [2] * 10])
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    model.requires_grad_(False)  # FlexAttention has no CPU backward; the forward is what is compared
    for window in (0, 4):  # plain document masks, and with a sliding window (model.sliding_window)
        dense = attn(x, cos, sin, mask=document_mask(segments, use_flex=False, window=window))
        flex = attn(x, cos, sin, mask=document_mask(segments, use_flex=True, window=window))
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_sliding_window_sees_exactly_the_window():
    """Position i depends on tokens i - window + 1 .. i and on nothing earlier (one layer: no second hop)."""
    torch.manual_seed(0)
    model = build_model(tiny(n_layers=1, sliding_window=4)).eval()
    x = torch.randint(0, 97, (1, 12))
    x2 = x.clone()
    x2[0, 3] = (x2[0, 3] + 1) % 97
    base, out = model(x), model(x2)
    torch.testing.assert_close(out[0, 7:], base[0, 7:])  # 3 is outside the windows of 7..11
    assert all(not torch.allclose(out[0, i], base[0, i]) for i in range(3, 7))  # and inside those of 3..6
    full = build_model(tiny(n_layers=1))
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x[:, :4]), full(x[:, :4]))  # within the window: plain causal attention


def _counted_train_flops(model, *inputs) -> int:
    """Matmul + attention FLOPs of one forward and backward, as torch's FlopCounterMode counts them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as countable bmm's
        model(*inputs).float().pow(2).mean().backward()
    return counter.get_total_flops()


def test_flops_formula_matches_counted_flops_of_forward_and_backward():
    from meshforge.models import active_params

    cfg = tiny()
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    formula = flops_per_token(cfg, active_params(model, cfg), 16) * tokens.numel()
    # 6N counts the norm weights too (no matmul): 0.4% of this tiny model, nothing in a real one
    assert _counted_train_flops(model, tokens) == pytest.approx(formula, rel=1e-2)


def test_encoder_decoder_flops_formula_matches_counted_flops():
    from meshforge.models import encoder_decoder_flops_per_token

    cfg = ModelConfig(
        family="encoder_decoder",
        vocab_size=96,
        dim=32,
        n_layers=2,
        n_decoder_layers=3,
        n_heads=4,
        ffn_dim=48,
        ffn_activation="gelu",
        position_encoding="relative",
        max_seq_len=64,
        tie_embeddings=False,
    )
    model = build_model(cfg)
    src, tgt = torch.randint(0, 96, (2, 24)), torch.randint(0, 96, (2, 7))
    formula = encoder_decoder_flops_per_token(model, cfg, 24, 7) * 2 * (24 + 7)
    # the rule's 6N also counts norm weights and the relative-bias table, which do no matmul
    no_matmul = sum(
        p.numel() * (24 if stack == "encoder" else 7)
        for stack in ("encoder", "decoder")
        for n, p in getattr(model, stack).named_parameters()
        if "norm" in n or "rel_bias" in n
    )
    assert _counted_train_flops(model, src, tgt) == formula - 6 * 2 * no_matmul


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Some Future GPU", None),
    ],
)
def test_peak_flops_by_device_name(name, peak, monkeypatch):
    from meshforge.pretrain.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None
