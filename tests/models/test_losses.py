"""lm_loss: F.cross_entropy without z-loss, one log-sum-exp with it; values and gradients equal the
reference formula, with ignored targets left out of both means (and nothing left giving 0)."""

import pytest
import torch

from meshforge.models.losses import IGNORE_INDEX, lm_loss


def reference(logits, targets, coef):
    """The written-out formula (logsumexp, gather, mask) that lm_loss must equal."""
    logits = logits.double().flatten(0, -2)
    targets = targets.flatten()
    mask = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits, -1)
    target_logit = logits.gather(1, torch.where(mask, targets, 0)[:, None]).squeeze(1)
    count = mask.sum().clamp(min=1)
    ce = ((lse - target_logit) * mask).sum() / count
    z = coef * (lse.square() * mask).sum() / count
    return ce, z


def _grads(fn, logits, targets, coef, seed):
    x = logits.clone().requires_grad_()
    ce, z = fn(x, targets, coef)
    weights = torch.randn(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (weights[0] * ce + weights[1] * z).backward()  # ce and z get independent upstream gradients
    return ce.detach().double(), z.detach().double(), x.grad.double()


def _ours(x, targets, coef):
    parts = lm_loss(x, targets, coef)
    assert parts.total is parts.ce if not coef else torch.equal(parts.total, parts.ce + parts.z_loss)
    return parts.ce, parts.z_loss


@pytest.mark.parametrize("coef", [0.0, 1e-2])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_lm_loss_values_and_grads_match_the_formula(coef, ignored):
    gen = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(3, 7, 50, generator=gen)
    targets = torch.randint(0, 50, (3, 7), generator=gen)
    if ignored == "some":
        targets[0, :3] = IGNORE_INDEX
        targets[2, -1] = IGNORE_INDEX
    elif ignored == "all":
        targets[:] = IGNORE_INDEX
    got = _grads(_ours, logits, targets, coef, seed=2)
    want = _grads(reference, logits.double(), targets, coef, seed=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    if ignored == "all":  # nothing to average: zero loss, zero gradient (not NaN)
        assert got[0].item() == 0.0 and not got[2].any()
    if ignored == "some":  # an ignored position gets no gradient at all
        assert not got[2].view(21, 50)[:3].any() and got[2].view(21, 50)[3:20].abs().sum() > 0
    if not coef:
        assert got[1].item() == 0.0


def test_lm_loss_upcasts_low_precision_logits():
    logits = torch.randn(2, 5, 30, dtype=torch.bfloat16)
    targets = torch.randint(0, 30, (2, 5))
    for coef in (0.0, 1e-3):
        parts = lm_loss(logits, targets, coef)
        assert parts.ce.dtype == torch.float32
        ce, z = reference(logits.float(), targets, coef)
        torch.testing.assert_close(parts.ce.double(), ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts.z_loss.double(), z, rtol=1e-5, atol=1e-9)


def test_cpu_row_blocks_give_the_same_loss_and_grads(monkeypatch):
    """Logits larger than four blocks are taken block by block on a CPU: same values, same gradients."""
    from meshforge.models import losses

    logits = torch.randn(40, 16)
    targets = torch.randint(0, 16, (40,))
    targets[5:9] = IGNORE_INDEX
    whole = _grads(_ours, logits, targets, 0.0, seed=3)
    monkeypatch.setattr(losses, "CPU_CHUNK_BYTES", 4 * 16 * 3)  # blocks of 3 rows: 14 of them
    blocks = []
    real = losses.F.cross_entropy
    monkeypatch.setattr(losses.F, "cross_entropy", lambda x, *a, **k: blocks.append(len(x)) or real(x, *a, **k))
    chunked = _grads(_ours, logits, targets, 0.0, seed=3)
    assert blocks == [3] * 13 + [1]
    for c, w in zip(chunked, whole):
        torch.testing.assert_close(c, w, rtol=1e-6, atol=1e-7)
