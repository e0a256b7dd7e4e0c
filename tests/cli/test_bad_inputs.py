"""Every bad input of issue #25, table-driven: one line (``meshforge: error: ...``), exit 2, no
traceback, no advice naming Python internals, and nothing left behind. A new case is one line of
``CASES``: an id, a function of the fixtures giving the command line, a fragment of the message,
and the paths (under the case's own tmp dir) that must not exist afterwards."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from meshforge.convert.export import export_hf
from meshforge.pretrain.checkpoint import list_checkpoints
from meshforge.pretrain.trainer import Trainer

PYTHON_WORDS = ("=True", "=False", "Traceback", "Error:", "kwarg", "argument '", "NoneType", "errno")


@pytest.fixture(scope="module")
def made(tiny_data, tmp_path_factory):
    """A trained checkpoint (weights + optimizer state), its Hugging Face export, a prepared data dir."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    Trainer(
        load_config(
            "tiny-test",
            {
                "data.path": str(tiny_data),
                "train.output_dir": str(run),
                "train.steps": 2,
                "train.eval_interval": 0,
                "train.sample_prompt": "",
                "checkpoint.interval": 2,
                "train.progress": False,
            },
        )
    ).run()
    hf = root / "hf"
    export_hf(run, hf, log=lambda *_: None)
    return SimpleNamespace(
        run=run,
        ckpt=list_checkpoints(run / "checkpoints")[-1],
        hf=hf,
        data=tiny_data,
        tok=tiny_data / "tokenizer.model",
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cut(path: Path, keep: float = 0.5) -> Path:
    """Truncate ``path`` to ``keep`` of its size."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def ckpt_with(m, t, how: str) -> Path:
    """A copy of the run whose checkpoint has its largest .distcp file cut (``model``: in the middle, where the
    weights are; ``optim``: only its last bytes, the optimizer state's) or garbled."""
    run = _copy(m.run, t / "run")
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    victim = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if how == "model":
        _cut(victim, 0.3)
    else:  # the last bytes: DCP writes the optimizer's tensors after the model's
        victim.write_bytes(victim.read_bytes()[:-64])
    return run


def hf_with(m, t, how: str) -> Path:
    hf = _copy(m.hf, t / "hf")
    weights = sorted(hf.glob("*.safetensors"))[0]
    if how == "truncated":
        _cut(weights, 0.5)
    elif how == "garbage":
        weights.write_bytes(b"\x00\x01garbage" * 50)
    elif how == "config":
        (hf / "config.json").write_text("{ not json")
    elif how == "shapes":  # a config whose shapes disagree with the tensors
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    return hf


def fake_archive(t, name: str, data: bytes) -> Path:
    path = t / name
    path.write_bytes(data)
    return path


def tampered_data(m, t) -> Path:
    """A data dir whose shards changed after the manifest (same size; ids beyond the vocabulary)."""
    data = _copy(m.data, t / "data")
    for bin_file in sorted(data.glob("*.bin")):
        tokens = np.memmap(bin_file, dtype=np.uint16, mode="r+")
        tokens[::97] = 700
        tokens.flush()
    return data


def prepare(m, t, *inputs: Path | str, extra=()) -> list[str]:
    return [
        "data",
        "prepare",
        "--input",
        *map(str, inputs),
        "--tokenizer",
        str(m.tok),
        "--output",
        str(t / "out"),
        *extra,
    ]


def generate(m, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", str(m.run), "--prompt", "ROMEO:", *extra]


GZ = gzip.compress(b'{"text": "hello world"}\n' * 200)
TRAIN = (
    "--config",
    "tiny-test",
    "--train.steps",
    "4",
    "--train.eval_interval",
    "0",
    "--train.sample_prompt",
    "",
    "--train.progress",
    "false",
)

CASES = [
    # id, argv from (fixtures m, case tmp dir t), message fragment, paths under t that must not exist afterwards
    (
        "export-truncated-distcp",
        lambda m, t: ["convert", "export", "--checkpoint", str(ckpt_with(m, t, "model")), "--output", str(t / "o")],
        "(truncated)",
        ["o"],
    ),
    (
        "export-cut-optimizer",
        lambda m, t: ["convert", "export", "--checkpoint", str(ckpt_with(m, t, "optim")), "--output", str(t / "o")],
        "(truncated)",
        ["o"],
    ),
    (
        "import-truncated",
        lambda m, t: ["convert", "import", str(hf_with(m, t, "truncated")), "--output", str(t / "o")],
        "is truncated",
        ["o"],
    ),
    (
        "import-garbage",
        lambda m, t: ["convert", "import", str(hf_with(m, t, "garbage")), "--output", str(t / "o")],
        "is not a safetensors file",
        ["o"],
    ),
    (
        "import-config-not-json",
        lambda m, t: ["convert", "import", str(hf_with(m, t, "config")), "--output", str(t / "o")],
        "config.json is not valid JSON",
        ["o"],
    ),
    (
        "import-shapes-disagree",
        lambda m, t: ["convert", "import", str(hf_with(m, t, "shapes")), "--output", str(t / "o")],
        "but config.json makes it",
        ["o"],
    ),
    ("inspect-truncated", lambda m, t: ["convert", "inspect", str(hf_with(m, t, "truncated"))], "is truncated", []),
    (
        "inspect-garbage",
        lambda m, t: ["convert", "inspect", str(hf_with(m, t, "garbage"))],
        "is not a safetensors file",
        [],
    ),
    (
        "inspect-config-not-json",
        lambda m, t: ["convert", "inspect", str(hf_with(m, t, "config"))],
        "config.json is not valid JSON",
        [],
    ),
    (
        "scaling-fit-binary",
        lambda m, t: ["scaling", "fit", str(fake_archive(t, "r.csv", bytes(range(256)) * 4))],
        "is not a CSV text file",
        [],
    ),
    (
        "scaling-budgets-negative",
        lambda m, t: ["scaling", "plan", "--budgets=-1e15", "--output", str(t / "s")],
        "--budgets",
        ["s"],
    ),
    (
        "scaling-budgets-nan",
        lambda m, t: ["scaling", "plan", "--budgets=nan", "--output", str(t / "s")],
        "--budgets",
        ["s"],
    ),
    (
        "scaling-budgets-inf",
        lambda m, t: ["scaling", "plan", "--budgets=inf", "--output", str(t / "s")],
        "--budgets",
        ["s"],
    ),
    (
        "prepare-fake-gz",
        lambda m, t: prepare(m, t, fake_archive(t, "a.jsonl.gz", b"not gzip at all" * 20)),
        "a.jsonl.gz",
        ["out"],
    ),
    (
        "prepare-truncated-gz",
        lambda m, t: prepare(m, t, fake_archive(t, "a.jsonl.gz", GZ[: len(GZ) // 2])),
        "a.jsonl.gz",
        ["out"],
    ),
    (
        "prepare-fake-zst",
        lambda m, t: prepare(m, t, fake_archive(t, "a.jsonl.zst", b"not zstd at all" * 20)),
        "a.jsonl.zst",
        ["out"],
    ),
    ("prepare-directory-input", lambda m, t: prepare(m, t, m.data), "is a directory", ["out"]),
    (
        "prepare-docs-per-shard-negative",
        lambda m, t: prepare(m, t, fake_archive(t, "a.jsonl.gz", GZ), extra=("--docs-per-shard", "-1")),
        "--docs-per-shard",
        ["out"],
    ),
    ("generate-max-new-tokens-negative", lambda m, t: generate(m, "--max-new-tokens", "-1"), "--max-new-tokens", []),
    ("generate-max-new-tokens-too-many", lambda m, t: generate(m, "--max-new-tokens", "100000"), "max_seq_len", []),
    ("generate-top-k-negative", lambda m, t: generate(m, "--top-k", "-5"), "--top-k", []),
    ("generate-temperature-negative", lambda m, t: generate(m, "--temperature", "-1"), "--temperature", []),
    ("generate-temperature-nan", lambda m, t: generate(m, "--temperature", "nan"), "--temperature", []),
    ("generate-device-tpu", lambda m, t: generate(m, "--device", "tpu"), "--device", []),
    (
        "train-shard-changed-after-manifest",
        lambda m, t: ["train", *TRAIN, "--data.path", str(tampered_data(m, t)), "--train.output_dir", str(t / "run")],
        "(document 0 of it, token 0) holds token id 700, beyond the model's vocabulary",
        [],
    ),
]
if not torch.cuda.is_available():
    CASES.append(("generate-device-cuda-without-gpu", lambda m, t: generate(m, "--device", "cuda"), "no CUDA GPU", []))


@pytest.mark.parametrize("make, says, absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(make, says, absent, made, tmp_path, capsys):
    argv = make(made, tmp_path)
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = "\n".join(line for line in capsys.readouterr().err.split("\n") if "\r" not in line)  # not a progress bar
    assert err.startswith("meshforge: error: ") and err.count("\n") == 1, f"expected one line: {err!r}"
    assert says in err, err
    assert not any(w in err for w in PYTHON_WORDS), err
    for name in absent:
        assert not (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("**/*.tmp*")), list(tmp_path.glob("**/*.tmp*"))


def test_a_failed_prepare_leaves_nothing_and_the_rerun_is_not_refused(made, tmp_path, capsys):
    bad = fake_archive(tmp_path, "a.jsonl.gz", b"not gzip at all" * 20)
    assert cli_main(prepare(made, tmp_path, bad)) == 2
    bad.write_bytes(GZ)
    capsys.readouterr()
    assert cli_main(prepare(made, tmp_path, bad)) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").is_file()
