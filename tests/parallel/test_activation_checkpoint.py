"""Activation checkpointing recomputes exactly: losses and grads equal the run without it."""

import pytest
import torch

from meshforge.config import ModelConfig
from meshforge.models import build_model
from meshforge.models.losses import lm_loss
from meshforge.parallel.activation_checkpoint import apply_activation_checkpointing


def _loss_and_grads(mode: str):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, qk_norm=True, max_seq_len=64)
    )
    apply_activation_checkpointing(model, mode)
    x = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(model(x[:, :-1]), x[:, 1:], 1e-3).total
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, names


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_matches_no_checkpointing(mode):
    ref_loss, ref_grads, ref_names = _loss_and_grads("none")
    loss, grads, names = _loss_and_grads(mode)
    assert names == ref_names  # module names (and checkpoint keys) are unchanged
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-7)


def test_recompute_counts_none_selective_full():
    """Ops run during backward: selective recomputes the cheap ops but no matmul; full recomputes matmuls too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.total += 1
            self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    def backward_counts(mode: str) -> tuple[int, int]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64))
        apply_activation_checkpointing(model, mode)
        loss = model(torch.randint(0, 97, (2, 9))).square().mean()
        with Count() as c:
            loss.backward()
        return c.mm, c.total

    (none_mm, none_ops), (sel_mm, sel_ops), (full_mm, full_ops) = map(backward_counts, ("none", "selective", "full"))
    assert sel_mm == none_mm < full_mm, (none_mm, sel_mm, full_mm)
    assert none_ops < sel_ops < full_ops, (none_ops, sel_ops, full_ops)


@pytest.mark.parametrize("early_stop", [False, True])
def test_moe_router_stats_do_not_depend_on_recomputation(early_stop):
    """MoE statistics are counted once per forward whatever checkpointing recomputes: with early
    stop off, full checkpointing reruns each MoE layer whole in backward and selective
    checkpointing must see the same ops as in forward. Statistics, loss and grads equal the
    run without checkpointing."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from meshforge.models.moe import MoE, RouterStats, collect_router_stats

    def run(mode: str):
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(
                vocab_size=97,
                dim=32,
                n_layers=3,
                n_heads=4,
                max_seq_len=64,
                moe_experts=4,
                moe_top_k=2,
                moe_capacity_factor=1.0,
                moe_dense_layers=1,
            )
        )
        apply_activation_checkpointing(model, mode)
        x = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
        stats = RouterStats(aux_grad_scale=0.5)
        with set_checkpoint_early_stop(early_stop), collect_router_stats(model, stats):
            for half in x.split(2):  # two microbatches: two passes per layer
                loss = lm_loss(model(half[:, :-1]), half[:, 1:], 1e-3).total
                loss.backward()
        layers = [m for m in model.modules() if isinstance(m, MoE)]
        assert len(layers) == 2 and all(len(stats.rows[m]) == 2 for m in layers), mode
        return [stats.sums(m) for m in layers], {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_stats, ref_grads = run("none")
    for mode in ("full", "selective"):
        got_stats, grads = run(mode)
        for got, want in zip(got_stats, ref_stats):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{mode} {n}: {m}")
