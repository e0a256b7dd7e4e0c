"""Our Triton RMSNorm, RoPE and SwiGLU (run by Triton's CPU interpreter) equal the models' PyTorch code,
forward and backward; the tiny decoder trains alike with them; ``train.fused_kernels`` refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from meshforge.config import ConfigError, load_config  # noqa: E402
from meshforge.kernels.apply import apply_fused_kernels, check_fused_kernels, fused_kernels_backend  # noqa: E402
from meshforge.models.layers import RMSNorm, apply_rope_qk, rope_tables, swiglu  # noqa: E402
from meshforge.parallel.mesh import Degrees  # noqa: E402

ONE = Degrees(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1, ep=1)
FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=1.6e-2)
"""Two bf16 ulps: the interpreter's fp32 -> bf16 cast truncates (a GPU rounds to nearest), and the PyTorch
code may round twice where a kernel rounds once."""


@pytest.fixture(scope="module")
def k():
    """The kernel modules, run by Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
    anything imports triton); this module's tests keep the variable set."""
    from triton.runtime.interpreter import InterpretedFunction

    from meshforge.kernels import rmsnorm, rope
    from meshforge.kernels import swiglu as fused_swiglu

    if not isinstance(rmsnorm._rms_norm_fwd, InterpretedFunction):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (the kernels would need a GPU)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield type(
            "Kernels",
            (),
            {
                "rms_norm": staticmethod(rmsnorm.rms_norm),
                "rope_qk": staticmethod(rope.rope_qk),
                "swiglu": staticmethod(fused_swiglu.swiglu),
            },
        )


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cot = tuple(torch.randn(o.shape, generator=g).to(o.dtype) for o in outputs)
    return torch.autograd.grad(outputs, inputs, cot)


@pytest.mark.parametrize("shape", [(3, 5, 37), (130, 20), (2, 3, 300)])  # rows in 1, 3 (the last partial), 2 tiles
def test_rms_norm_matches_module(k, shape):
    x, w = _leaves(shape, shape[-1:])
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight = torch.nn.Parameter(w.detach().clone())
    ref = norm(x)
    ref_grads = _grads(ref, (x, norm.weight))
    out = k.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, ref, **FP32)
    for got, want in zip(_grads(out, (x, w)), ref_grads):
        torch.testing.assert_close(got, want, **FP32)


def test_rms_norm_bf16_input_fp32_weight(k):
    """bf16 activations with an fp32 weight (autocast): output and dx in bf16, dw in fp32, near the fp32 math."""
    x32, w = _leaves((4, 6, 40), (40,), seed=2)
    x = x32.detach().bfloat16().requires_grad_()
    out = k.rms_norm(x, w, 1e-5)
    dx, dw = _grads(out, (x, w))
    assert out.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    x_ref = x.detach().float().requires_grad_()
    ref = torch.nn.functional.rms_norm(x_ref, (40,), w, 1e-5)
    ref_dx, ref_dw = _grads(ref, (x_ref, w))
    torch.testing.assert_close(out.float(), ref, **BF16)
    torch.testing.assert_close(dx.float(), ref_dx, **BF16)
    torch.testing.assert_close(dw, ref_dw, **BF16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_module_gqa(k, dtype):
    """6 query heads, 2 key heads, head dim 10 (half 5: not a power of two), positions out of order."""
    cos, sin = rope_tables(10, 16, 10000.0)
    pos = torch.tensor([3, 1, 4, 15, 5])
    q, kk = _leaves((2, 5, 6, 10), (2, 5, 2, 10), dtype=dtype)
    ref = apply_rope_qk(q, kk, cos[pos], sin[pos])
    out = k.rope_qk(q, kk, cos[pos], sin[pos])
    tol = FP32 if dtype == torch.float32 else BF16
    for got, want in zip(out + _grads(out, (q, kk)), ref + _grads(ref, (q, kk))):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_module(k, dtype):
    a, b = _leaves((3, 5, 37), (3, 5, 37), dtype=dtype, seed=3)
    ref, out = swiglu(a, b), k.swiglu(a, b)
    tol = FP32 if dtype == torch.float32 else BF16
    for got, want in zip((out,) + _grads(out, (a, b)), (ref,) + _grads(ref, (a, b))):
        torch.testing.assert_close(got, want, **tol)


def test_swap_covers_every_norm_and_only_silu_gates(k):
    """T5-style encoder-decoder: every RMSNorm swapped (same parameters), its gated-GELU feed-forwards kept."""
    from meshforge.kernels.rmsnorm import TritonRMSNorm
    from meshforge.models import build_model
    from meshforge.models.layers import FeedForward, geglu

    cfg = load_config("tiny-test", {"model.family": "encoder_decoder", "model.ffn_activation": "gelu"})
    model = build_model(cfg.model, torch.device("cpu"))
    before = dict(model.named_parameters())
    apply_fused_kernels(model, "triton")
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(after[n] is p for n, p in before.items())
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(type(m) is TritonRMSNorm for m in norms)
    ffns = [m for m in model.modules() if isinstance(m, FeedForward)]
    assert ffns and all(m.gate is geglu for m in ffns)


def test_liger_rope_matches_module():
    """liger-kernel's RoPE through our adapter (its other kernels do not run on Triton's interpreter)."""
    pytest.importorskip("liger_kernel")
    from meshforge.kernels.liger import rope_qk

    cos, sin = rope_tables(10, 16, 10000.0)
    pos = torch.tensor([3, 1, 4, 15, 5])
    q, kk = _leaves((2, 5, 6, 10), (2, 5, 2, 10))
    ref = apply_rope_qk(q, kk, cos[pos], sin[pos])
    ref_grads = _grads(ref, (q, kk))
    q2, k2 = (t.detach().clone().requires_grad_() for t in (q, kk))
    out = rope_qk(q2 * 1, k2 * 1, cos[pos], sin[pos])  # liger rotates in place: hand it copies
    for got, want in zip(out + _grads(out, (q2, k2)), ref + ref_grads):
        torch.testing.assert_close(got, want, **FP32)


def _decoder(fused: str):
    from meshforge.models import build_model
    from meshforge.parallel import parallelize

    cfg = load_config(
        "tiny-test",
        {
            "model.dim": 48,
            "model.n_heads": 6,
            "model.n_kv_heads": 2,
            "train.fused_kernels": fused,
            "parallel.compile": "off",
        },
    )
    torch.manual_seed(0)
    return parallelize(build_model(cfg.model, torch.device("cpu")), None, ONE, cfg), cfg


def test_two_training_steps_fused_on_match_off(k):
    """The tiny decoder (GQA, qk-norm, head dim 8, FFN width 128) swapped to the kernels trains as the plain one."""
    from meshforge.kernels.rmsnorm import TritonRMSNorm

    runs = {}
    for fused in ("off", "triton"):
        model, cfg = _decoder(fused)
        norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
        assert len(norms) == 9 and all(isinstance(m, TritonRMSNorm) == (fused == "triton") for m in norms)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # linear in the gradients (Adam would amplify ~0 ones)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
        losses = []
        for _ in range(2):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[fused] = losses, {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(torch.tensor(runs["triton"][0]), torch.tensor(runs["off"][0]), atol=1e-5, rtol=0)
    assert runs["triton"][1].keys() == runs["off"][1].keys()  # same parameter names: checkpoints line up
    for name, p in runs["off"][1].items():
        torch.testing.assert_close(runs["triton"][1][name], p, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_block_traces_the_kernels(k):
    """A block with the kernels swapped in compiles whole (fullgraph) and gives the eager values and gradients."""
    from meshforge.models.decoder import DecoderBlock

    cfg = load_config("tiny-test", {"model.dim": 48, "model.n_heads": 6, "model.n_kv_heads": 2})
    torch.manual_seed(0)
    block = DecoderBlock(cfg.model)
    for m in block.modules():
        if isinstance(m, RMSNorm):
            m.reset_parameters()
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    apply_fused_kernels(block, "triton")
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(1, 5, 48, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (block, compiled):
        y = fn(x, cos[:5], sin[:5])
        outs.append((y,) + _grads(y, (x,) + tuple(block.parameters())))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, **FP32)


def test_kernels_compile_for_hopper():
    """Every kernel compiles to sm_90 machine code with the installed Triton, no GPU needed
    (tests/harness/triton_sm90_compile.py, without the interpreter): the GPU machine's Triton (3.6 beside
    torch 2.11) rejects there what its front end or ptxas rejects here."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not (Path(spec.origin).parent / "bin" / "ptxas").is_file():
        pytest.skip("this Triton has no CUDA back end with its own ptxas")
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(repo / "tests" / "harness" / "triton_sm90_compile.py")],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert sum(line.startswith("ok ") for line in run.stdout.splitlines()) == 14, run.stdout


def test_backend_choice_and_refusals(monkeypatch):
    cfg = load_config("tiny-test", {"train.fused_kernels": "auto"})
    assert fused_kernels_backend(cfg, "cuda") is None  # auto stays off until measured on a GPU
    cfg.train.fused_kernels = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fused_kernels_backend(cfg, "cuda") == "triton"
    assert fused_kernels_backend(cfg, "meta") is None  # the planner's dry run: nothing computes
    with pytest.raises(ConfigError, match=r"fused_kernels = 'triton' runs on CUDA, or on a CPU under TRITON_INTERPRET"):
        check_fused_kernels(cfg, "cpu")
    check_fused_kernels(cfg, None)  # the planner: no device, nothing to check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_kernels_backend(cfg, "cpu") == "triton"
    cfg.train.fused_kernels = "liger"
    with pytest.raises(ConfigError, match=r"'liger' (runs on CUDA only|needs the liger_kernel package)"):
        check_fused_kernels(cfg, "cpu")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs the liger_kernel package"):
        check_fused_kernels(cfg, "cuda")


def test_trainer_refuses_before_writing(tmp_path, monkeypatch):
    """Triton kernels asked for on a CPU without the interpreter: a ConfigError before the output dir exists."""
    from meshforge.pretrain.trainer import Trainer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    cfg = load_config(
        "tiny-test", {"train.fused_kernels": "triton", "train.output_dir": str(out), "train.device": "cpu"}
    )
    with pytest.raises(ConfigError, match=r"train.fused_kernels = 'triton'"):
        Trainer(cfg)
    assert not out.exists()


SHORT_RUN = (
    "--config",
    "tiny-test",
    "--train.steps",
    "3",
    "--train.global_batch_size",
    "4",
    "--train.micro_batch_size",
    "2",
    "--data.seq_len",
    "8",
    "--train.eval_interval",
    "0",
    "--train.sample_prompt",
    "",
    "--checkpoint.interval",
    "0",
    "--train.progress",
    "false",
)
"""3 steps of 4 sequences of 8 tokens: few kernel launches, as the interpreter is slow."""


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("fsdp2", 2, ()),
        ("pp2-1f1b", 2, ("--parallel.pp", "2", "--parallel.pp_schedule", "1f1b")),
        ("tp2", 2, ("--parallel.tp", "2")),
        ("cp2-ring", 2, ("--parallel.cp", "2")),
        ("deepspeed-zero3", 2, ("--parallel.dp_backend", "deepspeed", "--parallel.zero_stage", "3")),
    ],
)
def test_layouts_with_kernels_match_plain_single_process(k, name, world, overrides, tiny_data, tmp_path):
    """With the kernels, FSDP2 (plain unsharded tensors in the forward), a pipeline (the swap runs per stage),
    tensor parallel (RoPE and SwiGLU on local heads / columns, the DTensor norms left to PyTorch) and context
    parallel (RoPE of this rank's positions) train as one process without them: losses and final parameters."""
    from parallel_harness import train_layout

    if "deepspeed" in name:
        pytest.importorskip("deepspeed")
    ref = train_layout(tiny_data, tmp_path / "ref", 1, "--train.fused_kernels", "off", extra_args=SHORT_RUN)
    got = train_layout(
        tiny_data, tmp_path / name, world, "--train.fused_kernels", "triton", *overrides, extra_args=SHORT_RUN
    )
    assert len(got.losses) == 3  # the ranks inherit TRITON_INTERPRET=1; without it they would refuse to start
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), atol=1e-5, rtol=0)
    for name_, p in ref.params.items():
        torch.testing.assert_close(got.params[name_], p, atol=1e-5, rtol=1e-4, msg=name_)
