"""The chunked linear + cross-entropy equals lm_loss on materialised logits, without saving [N, V]."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from meshforge.kernels.fused_loss import fused_linear_lm_loss
from meshforge.models.losses import IGNORE_INDEX, lm_loss


def _inputs(n=37, d=16, v=53, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE_INDEX
    return hidden, weight, targets


def _both(hidden, weight, targets, coef, scale, chunk):
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = lm_loss((h1 @ w1.t()) * scale, targets, coef)
    ref.total.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_lm_loss(h2, w2, targets, coef, logit_scale=scale, chunk_size=chunk)
    out.total.backward()
    return (ref, h1.grad, w1.grad), (out, h2.grad, w2.grad)


@pytest.mark.parametrize("coef", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [8, 37, 1000])  # 8 does not divide 37
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_values_and_grads_match_lm_loss(coef, chunk, ignore_every):
    hidden, weight, targets = _inputs(ignore_every=ignore_every)
    (ref, gh_ref, gw_ref), (out, gh, gw) = _both(hidden, weight, targets, coef, 1.0, chunk)
    for a, b in [(ref.total, out.total), (ref.ce, out.ce), (ref.z_loss, out.z_loss), (gh_ref, gh), (gw_ref, gw)]:
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert (out.z_loss > 0) == (coef > 0)


def test_logit_scale_and_upstream_grad():
    """muP's 1/width_mult on the logits, and a loss that is scaled before backward (grad accumulation)."""
    hidden, weight, targets = _inputs(seed=1)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (lm_loss((h1 @ w1.t()) * 0.25, targets, 1e-3).total * 0.5).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused_linear_lm_loss(h2, w2, targets, 1e-3, logit_scale=0.25, chunk_size=10).total * 0.5).backward()
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-6)


def test_batched_shapes_and_all_ignored():
    hidden, weight, targets = _inputs(n=24)
    out = fused_linear_lm_loss(hidden.view(4, 6, -1), weight, targets.view(4, 6))  # default_chunk: 24*16/53 -> 8
    torch.testing.assert_close(out.ce, lm_loss(hidden @ weight.t(), targets).ce, atol=1e-6, rtol=1e-6)
    h = hidden.clone().requires_grad_()
    none = fused_linear_lm_loss(h, weight, torch.full_like(targets, IGNORE_INDEX), 1e-2, chunk_size=5)
    none.total.backward()
    assert none.total.item() == 0.0 and h.grad.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_lm_loss(hidden, weight, targets[:-1])


def _largest_saved(fn):
    """numel of the largest tensor autograd saves for backward while running fn()."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_no_tokens_by_vocab_tensor_saved():
    n, d, v = 256, 8, 512
    hidden, weight, targets = _inputs(n=n, d=d, v=v)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    plain = _largest_saved(lambda: lm_loss(h @ w.t(), targets, 1e-3))
    fused = _largest_saved(lambda: fused_linear_lm_loss(h, w, targets, 1e-3, chunk_size=32))
    assert plain >= n * v  # the check sees the logits the plain path keeps
    assert fused <= max(n * d, v * d) < n * v


def _bf16_run(hidden, weight, targets, coef, fused, autocast, chunk=16):
    """(total, grad of hidden, grad of weight): the fused loss, or the plain path (the output layer's
    F.linear, then lm_loss outside it, as pretrain/step.py does), under bf16 autocast or not."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fused_linear_lm_loss(h, w, targets, coef, chunk_size=chunk) if fused else F.linear(h, w)
    out = out if fused else lm_loss(out, targets, coef)
    out.total.backward()
    return out.total.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bf16_inputs(seed):
    hidden, weight, targets = _inputs(n=96, d=64, v=300, seed=seed)
    return hidden, weight * 2, targets  # logits of a few units: bf16 rounding shows in the loss


# bf16 tolerances: the fused loss takes the same bf16-rounded logits as the plain path (measured loss gap
# <= 1.4e-7 relative, dh equal); dW differs by the plain path's one bf16 rounding of the whole product
# against the fused fp32 sum of bf16 block products (measured 2.3-2.8e-3 of its norm). Tolerances ~4x that
# for dW and dh, 1e-5 for the loss; the fp32 loss is 1e-5 to 1e-4 away from either.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-5, 1e-2


@pytest.mark.parametrize("coef", [0.0, 1e-2])
def test_bf16_autocast_matches_plain_path(coef):
    hidden, weight, targets = _bf16_inputs(seed=1)
    loss, gh, gw = _bf16_run(hidden, weight, targets, coef, fused=True, autocast=True)
    ref_loss, ref_gh, ref_gw = _bf16_run(hidden, weight, targets, coef, fused=False, autocast=True)
    assert gh.dtype == gw.dtype == torch.float32  # the parameters' dtype, as the plain path's
    torch.testing.assert_close(loss, ref_loss, rtol=BF16_LOSS_RTOL, atol=0)
    assert _rel(gh, ref_gh) < BF16_GRAD_RTOL and _rel(gw, ref_gw) < BF16_GRAD_RTOL, (_rel(gh, ref_gh), _rel(gw, ref_gw))


@pytest.mark.parametrize("coef", [0.0, 1e-2])
def test_bf16_autocast_is_not_fp32(coef):
    """The fused loss under autocast is far closer to the plain bf16 path than to fp32 (loss and dh):
    an fp32 matmul would sit on the fp32 reference instead."""
    hidden, weight, targets = _bf16_inputs(seed=1)
    loss, gh, _ = _bf16_run(hidden, weight, targets, coef, fused=True, autocast=True)
    bf16_loss, bf16_gh, _ = _bf16_run(hidden, weight, targets, coef, fused=False, autocast=True)
    fp32_loss, fp32_gh, _ = _bf16_run(hidden, weight, targets, coef, fused=False, autocast=False)
    bf16_gap = abs(bf16_loss - fp32_loss).item()
    assert bf16_gap > 3e-5 * fp32_loss.item()  # the case shows bf16 rounding at all
    assert abs(loss - bf16_loss).item() < 0.1 * bf16_gap
    assert _rel(gh, bf16_gh) < 0.1 * _rel(fp32_gh, bf16_gh)


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the tensor inputs of every matmul (mm / addmm) that runs under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["fp32", "autocast", "bf16_operands"])
def test_matmul_dtypes(case):
    """Every chunk matmul (logits, dh, dW) takes bf16 operands under autocast or with bf16 hidden and
    weight, fp32 ones otherwise; the dW accumulator (addmm_'s first input in fp32) stays fp32."""
    hidden, weight, targets = _bf16_inputs(seed=2)
    if case == "bf16_operands":
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with _MatmulDtypes() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            out = fused_linear_lm_loss(h, w, targets, 1e-2, chunk_size=40)  # 3 chunks
        out.total.backward()
    want = torch.float32 if case == "fp32" else torch.bfloat16
    assert len(rec.seen) >= 3 * 3  # per chunk: logits, dh and at least one dW product
    assert all(dt[-2:] == (want, want) for dt in rec.seen), rec.seen
    assert h.grad.dtype == w.grad.dtype == hidden.dtype


@pytest.mark.parametrize("coef", [0.0, 1e-2])
def test_bf16_operands_match_plain_path(coef):
    """bf16 hidden and weight without autocast (FSDP2 with param_dtype bf16): the plain bf16 linear + lm_loss."""
    hidden, weight, targets = _bf16_inputs(seed=3)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    loss, gh, gw = _bf16_run(hidden, weight, targets, coef, fused=True, autocast=False)
    ref_loss, ref_gh, ref_gw = _bf16_run(hidden, weight, targets, coef, fused=False, autocast=False)
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=BF16_LOSS_RTOL, atol=0)
    assert _rel(gh, ref_gh) < BF16_GRAD_RTOL and _rel(gw, ref_gw) < BF16_GRAD_RTOL, (_rel(gh, ref_gh), _rel(gw, ref_gw))


def _train_records(tiny_data, tmp_path, overrides: dict) -> dict:
    """{fused setting: [(loss, z_loss, grad_norm) per step]} of 3 steps of the tiny-test preset."""
    from meshforge.config import load_config
    from meshforge.pretrain.metrics import read_metrics
    from meshforge.pretrain.trainer import Trainer

    runs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        cfg = load_config(
            "tiny-test",
            {
                "data.path": str(tiny_data),
                "train.output_dir": str(out),
                "train.steps": 3,
                "train.eval_interval": 0,
                "train.sample_tokens": 0,
                "train.z_loss_coef": 1e-2,
                "train.fused_loss": setting,
                **overrides,
            },
        )
        trainer = Trainer(cfg)
        assert trainer.fused_loss == (setting == "on")
        trainer.run()
        runs[setting] = [(r["loss"], r["z_loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]
    assert len(runs["on"]) == 3
    return runs


def test_train_fused_on_matches_off(tiny_data, tmp_path):
    """3 steps of the tiny-test preset: the same losses, z-losses and gradient norms with the fused loss on and off."""
    runs = _train_records(tiny_data, tmp_path, {})
    torch.testing.assert_close(torch.tensor(runs["on"]), torch.tensor(runs["off"]), atol=1e-5, rtol=0)


def test_train_bf16_fused_on_matches_off(tiny_data, tmp_path):
    """train.dtype = bf16 on CPU: the fused loss runs under the step's autocast, so it takes the plain path's
    bf16 logits. Measured on vs off: first loss 8e-8 relative, grad norms <= 4e-5; with the loss outside
    autocast (fp32 logits) they were 6e-6 and ~1e-3. Later losses follow the slightly different
    (fp32-accumulated) output-weight gradient: <= 4e-6."""
    runs = _train_records(tiny_data, tmp_path, {"train.dtype": "bf16"})
    on, off = torch.tensor(runs["on"]), torch.tensor(runs["off"])
    torch.testing.assert_close(on[0, :2], off[0, :2], rtol=1e-6, atol=0)
    torch.testing.assert_close(on[:, 2], off[:, 2], rtol=2e-4, atol=0)
    torch.testing.assert_close(on[:, :2], off[:, :2], rtol=1e-4, atol=0)


def test_fused_on_layouts_and_refusals():
    from meshforge.config import ConfigError, load_config
    from meshforge.parallel.job_checks import use_fused_loss
    from meshforge.parallel.mesh import Degrees

    def deg(**kw):
        return Degrees(**{"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1, "ep": 1, **kw})

    cfg = load_config("tiny-test", {"train.fused_loss": "on"})
    for d in (deg(), deg(dp_shard=2), deg(tp=2), deg(pp=2), deg(cp=2), deg(pp=2, tp=2, dp_shard=2)):
        assert use_fused_loss(cfg, d, "cpu"), d
    cfg.parallel.loss_parallel = False
    with pytest.raises(ConfigError, match=r"parallel.tp = 2 and parallel.loss_parallel = false"):
        use_fused_loss(cfg, deg(tp=2), "cpu")
    assert use_fused_loss(cfg, deg(dp_shard=2), "cpu")  # without tp loss_parallel does not matter
    cfg.parallel.loss_parallel = True
    cfg.parallel.dp_backend = "deepspeed"
    with pytest.raises(ConfigError, match=r"dp_backend = 'deepspeed'"):
        use_fused_loss(cfg, deg(dp_shard=2), "cpu")
    cfg.parallel.dp_backend = "fsdp2"
    cfg.train.fused_loss = "auto"
    assert not use_fused_loss(cfg, deg(), "cpu") and not use_fused_loss(cfg, deg(), "cuda")  # until measured on a GPU
    assert not use_fused_loss(cfg, deg(tp=2), "cuda")


def test_fused_on_refused_for_other_families():
    from meshforge.config import ConfigError, load_config
    from meshforge.parallel.job_checks import use_fused_loss
    from meshforge.parallel.mesh import Degrees

    cfg = load_config("tiny-test", {"train.fused_loss": "on", "model.family": "encoder_decoder"})
    with pytest.raises(ConfigError, match=r"model.family = 'encoder_decoder'"):
        use_fused_loss(cfg, Degrees(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1, ep=1), "cpu")


def test_no_grad_computes_no_gradients(monkeypatch):
    """Evaluation (no_grad) gives the same values and skips the gradient work (no chunk matmul with W for dh)."""
    hidden, weight, targets = _inputs(seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = fused_linear_lm_loss(h, w, targets, 1e-3, chunk_size=8)
    calls = []
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or real_addmm(self, *a, **k))
    with torch.no_grad():
        out = fused_linear_lm_loss(h, w, targets, 1e-3, chunk_size=8)
    assert calls == [] and not out.total.requires_grad
    torch.testing.assert_close(out.total, ref.total, atol=0, rtol=0)
    fused_linear_lm_loss(h, w, targets, 1e-3, chunk_size=8)
    assert len(calls) == 5  # ceil(37 / 8) chunks accumulate dW when grad is on
