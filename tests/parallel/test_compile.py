"""torch.compile gives the eager results: per block (``parallel.compile_scope = blocks``) and
whole forward + loss (``model``), in one process (CPU Inductor, or ``aot_eager``: Dynamo's
capture and AOT autograd's graphs without Inductor's minutes of C++ builds) and under FSDP2 /
TP / context parallel; and what ``model`` cannot compile is refused before anything is written."""

from pathlib import Path

import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from meshforge.config.sections import ConfigError
from meshforge.parallel.compile import compile_enabled
from meshforge.pretrain.trainer import Trainer

RANK_SCRIPT = [str(Path(__file__).resolve().parents[1] / "harness" / "compile_backend_rank.py")]

SMALL_SHRUNK = {
    "model.dim": 64,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.max_seq_len": 64,
    "data.seq_len": 32,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 4,
    "train.eval_batches": 2,
    "train.eval_interval": 0,
    "train.sample_prompt": "",
    "checkpoint.interval": 0,
    "train.progress": False,
}
"""The small preset (tied embeddings, z-loss) cut to 2 layers of width 64, two micro-batches a step."""
STEPS = 3
LOSS_RTOL = 1e-5
"""fp32: the compiled loss within 1e-5 (relative) of the eager one, every step and the validation loss."""
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
"""fp32: every gradient within 1e-4 relative + 1e-6 absolute of the eager one (Inductor reorders sums)."""


def test_compile_setting():
    assert compile_enabled("auto", "cuda") and not compile_enabled("auto", "cpu")
    assert compile_enabled("on", "cpu") and not compile_enabled("off", "cuda")


@pytest.mark.slow
def test_compiled_blocks_match_eager(tiny_data, tmp_path):
    def losses(setting: str) -> list[float]:
        cfg = load_config(
            "tiny-test",
            {
                "data.path": str(tiny_data),
                "train.output_dir": str(tmp_path / setting),
                "train.steps": 4,
                "train.eval_interval": 0,
                "train.sample_prompt": "",
                "parallel.compile": setting,
            },
        )
        return Trainer(cfg).run().losses

    eager, compiled = losses("off"), losses("on")
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)


def _steps(data: Path, out: Path, **overrides) -> tuple[list[float], list[dict], float]:
    """Per-step losses, per-step gradients (as the optimizer sees them) and a validation loss."""
    cfg = load_config(
        "small",
        {**SMALL_SHRUNK, "data.path": str(data), "train.output_dir": str(out), "train.steps": STEPS, **overrides},
    )
    trainer = Trainer(cfg)
    trainer._setup()
    grads, update = [], trainer.backend.optimizer_update

    def update_with_capture(losses, grad_norm, step):
        grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
        return update(losses, grad_norm, step)

    trainer.backend.optimizer_update = update_with_capture
    losses = []
    for _ in range(STEPS):
        losses.append(trainer.train_step()["loss"])
        trainer.step += 1
    return losses, grads, trainer.evaluate()


def _model_scope_matches_eager(data: Path, tmp_path: Path, **overrides) -> dict:
    """compile_scope = model against eager: losses, gradients, validation loss; -> dynamo's counters."""
    from torch._dynamo.utils import counters

    eager = _steps(data, tmp_path / "eager", **{"parallel.compile": "off", **overrides})
    torch._dynamo.reset()
    counters.clear()
    compiled = _steps(
        data, tmp_path / "model", **{"parallel.compile": "on", "parallel.compile_scope": "model", **overrides}
    )
    torch.testing.assert_close(torch.tensor(compiled[0]), torch.tensor(eager[0]), rtol=LOSS_RTOL, atol=0)
    assert eager[0][-1] < eager[0][0]  # it trained
    assert len(compiled[1]) == len(eager[1]) == STEPS
    for got, ref in zip(compiled[1], eager[1]):
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(
                got[name], ref[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}"
            )
    torch.testing.assert_close(torch.tensor(compiled[2]), torch.tensor(eager[2]), rtol=LOSS_RTOL, atol=0)
    return {k: dict(v) for k, v in counters.items()}


def _default_backend(monkeypatch, backend: str) -> None:
    original = torch.compile

    def compile_with(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with)


def test_model_scope_is_one_graph_matching_eager(tiny_data, tmp_path, monkeypatch):
    """Dynamo + AOT autograd (aot_eager): the forward, output projection and loss in one graph."""
    _default_backend(monkeypatch, "aot_eager")
    counters = _model_scope_matches_eager(tiny_data, tmp_path)
    assert counters["aot_autograd"]["ok"] >= 1  # the step's loss was compiled, with its backward graph ...
    assert not counters.get("graph_break")  # ... whole: embedding to cross-entropy in one graph


@pytest.mark.slow
def test_model_scope_inductor_matches_eager(tiny_data, tmp_path):
    """The default backend, Inductor (CPU C++ code; about two minutes here)."""
    counters = _model_scope_matches_eager(tiny_data, tmp_path)
    assert counters["inductor"] and not counters.get("graph_break")


@pytest.mark.slow
def test_model_scope_fused_loss_matches_eager(tiny_data, tmp_path, monkeypatch):
    _default_backend(monkeypatch, "aot_eager")
    _model_scope_matches_eager(tiny_data, tmp_path, **{"train.fused_loss": "on"})


BLOCKS = "use parallel.compile_scope = 'blocks'"


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"parallel.compile": "off"}, "parallel.compile = 'off' compiles nothing; set parallel.compile = 'on'"),
        ({"parallel.pp": 2}, "parallel.pp = 2: the pipeline schedule runs each stage and the loss itself"),
        (
            {"parallel.dp_backend": "deepspeed"},
            "parallel.dp_backend = 'deepspeed': the step calls the DeepSpeed engine",
        ),
        ({"parallel.ep": 2, "model.moe_experts": 4}, "parallel.ep = 2: the experts' all-to-all inside the compiled"),
        (
            {"parallel.activation_checkpointing": "full"},
            "parallel.activation_checkpointing = 'full': torch's checkpoint",
        ),
        (
            {"parallel.activation_checkpointing": "selective"},
            "parallel.activation_checkpointing = 'selective': torch's",
        ),
    ],
)
def test_model_scope_refusals(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_config("small", {"parallel.compile": "on", "parallel.compile_scope": "model", **overrides})
    message = str(e.value)
    assert message.startswith("parallel.compile_scope = 'model'") and says in message, message
    assert ("leave compile_scope = 'blocks'" if "parallel.compile" in overrides else BLOCKS) in message, message
    load_config("small", {"parallel.compile": "on", **overrides})  # the same job with compiled blocks is fine


def test_model_scope_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli_main(["train", "--train.output_dir", str(out), "--parallel.compile_scope", "model", "--parallel.pp", "2"])
        == 2
    )
    assert "compile_scope = 'model' does not work with parallel.pp = 2" in capsys.readouterr().err
    assert not out.exists()


def test_model_scope_under_fsdp2_matches_single_process(tiny_data, single_process_ref, tmp_path):
    """FSDP2 over 2 ranks: its hooks run eagerly (graph breaks around each sharded module), the rest compiled."""
    from parallel_harness import assert_parity, train_layout

    got = train_layout(
        tiny_data,
        tmp_path / "fsdp2",
        2,
        "--parallel.dp_shard",
        "2",
        "--parallel.compile",
        "on",
        "--parallel.compile_scope",
        "model",
        script=RANK_SCRIPT,
    )
    assert_parity(single_process_ref, got)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides, atol",
    [
        ("tp2", ("--parallel.tp", "2", "--parallel.dp_shard", "1"), "tp"),
        ("cp2", ("--parallel.cp", "2", "--parallel.dp_shard", "1"), ""),
    ],
)
def test_model_scope_layouts_match_single_process(name, overrides, atol, tiny_data, single_process_ref, tmp_path):
    from parallel_harness import TP_ATOL, assert_parity, train_layout

    got = train_layout(
        tiny_data,
        tmp_path / name,
        2,
        *overrides,
        "--parallel.compile",
        "on",
        "--parallel.compile_scope",
        "model",
        script=RANK_SCRIPT,
    )
    assert_parity(single_process_ref, got, **({"atol": TP_ATOL} if atol else {}))
