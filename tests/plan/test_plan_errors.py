"""meshforge plan on bad input, as a new user meets it: impossible clusters, unknown devices, malformed device
tables, token counts and sequence lengths that do not divide, a model that fits no layout -- each one line on
stderr, exit 2, no traceback."""

from __future__ import annotations

import json

import pytest

from meshforge.cli import main
from meshforge.config import ConfigError
from meshforge.plan.devices import load_devices


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--gpus", "12", "--gpus-per-node", "8"],
            "--gpus 12 is not a whole number of nodes of 8 GPUs (--gpus-per-node); use 8 or 16 GPUs",
        ),
        (["--gpus", "0"], "--gpus must be a positive number of GPUs, got 0"),
        (["--gpus", "-8"], "--gpus must be a positive number of GPUs, got -8"),
        (["--gpus", "8", "--gpus-per-node", "0"], "--gpus-per-node must be a positive number of GPUs, got 0"),
        (["--gpus", "8", "--gpus-per-node", "-8"], "--gpus-per-node must be a positive number of GPUs, got -8"),
        (["--gpus", "8", "--gpu", "h100-40gb"], "unknown device 'h100-40gb' for --gpu (did you mean 'h100-80gb'?"),
        (["--gpus", "8", "--gpu", "H100"], "did you mean 'h100-80gb'? known: a100-80gb, b200, cpu, h100-80gb, h200"),
        (["--gpus", "8", "--global-batch-tokens", "4Q"], "is not a token count"),
        (["--gpus", "8", "--global-batch-tokens=-4M"], "--global-batch-tokens '-4M' is not a token count"),
        (["--gpus", "8", "--global-batch-tokens", "0"], "--global-batch-tokens 0 is less than one 4096-token sequence"),
        (
            ["--gpus", "8", "--global-batch-tokens", "5000"],
            "5000 is not a whole number of 4096-token sequences (data.seq_len "
            "or --seq-len); use a multiple of 4096, e.g. 4096 or 8192",
        ),
        (
            ["--gpus", "8", "--seq-len", "1000", "--global-batch-tokens", "1K"],
            "--global-batch-tokens 1K (1024 tokens) is not a whole number of 1000-token sequences",
        ),
        (["--gpus", "8", "--seq-len", "0"], "--seq-len must be positive, got 0"),
        (["--gpus", "8", "--seq-len", "-4096"], "--seq-len must be positive, got -4096"),
        (
            ["--gpus", "8", "--dry-run", "--seq-len", "1000", "--parallel.cp", "8", "--parallel.dp_shard", "1"],
            "data.seq_len = 1000 does not divide into 2*cp = 16 zigzag chunks (parallel.cp = 8); use a multiple of 16",
        ),
        (["--gpus", "8", "--dry-run", "--rank", "-1"], "--rank -1 is outside the world of 8 ranks"),
        (["--gpus", "8", "--top", "-3"], "--top must be positive, got -3"),
        (["--gpus", "8", "--efficiency", "-0.5"], "--efficiency must be in (0, 1], got -0.5"),
        (["--gpus", "7", "--gpus-per-node", "7", "--model.n_layers", "4"], "no layout of 7 GPUs"),
    ],
)
def test_plan_bad_input_one_line(capsys, argv, message):
    assert main(["plan", "--config", "llama-1b", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_plan_part_of_one_node_is_a_cluster(capsys):
    """--gpus below --gpus-per-node is a part of one node (e.g. 3 GPUs of an 8-GPU machine): planned, on NVLink;
    beyond one node only whole nodes are (the test above)."""
    assert main(["plan", "--config", "small", "--gpus", "3", "--gpus-per-node", "8", "--json", "--top", "50"]) == 0
    rows = json.loads(capsys.readouterr().out)["layouts"]
    assert rows and all(c["link"] == "nvlink" for r in rows for c in r["collectives"])


def test_plan_model_too_large_says_how_many(capsys):
    assert main(["plan", "--config", "llama-70b", "--gpus", "8", "--global-batch-tokens", "1M"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit 8 H100-80GB" in err and "needs at least" in err and "\n" not in err


def test_user_device_table(tmp_path):
    extra = tmp_path / "dev.toml"
    extra.write_text(
        '[h100-80gb]\nhbm_bytes = 1000\n[mi300x]\nname = "MI300X"\npeak_bf16_flops = 1307e12\n'
        "peak_fp8_flops = 2615e12\nhbm_bytes = 205_000_000_000\nnvlink_bw = 448e9\ninternode_bw = 50e9\n"
        "nvlink_latency = 5e-6\ninternode_latency = 10e-6\n"
    )
    devs = load_devices(extra)
    assert devs["h100-80gb"].hbm_bytes == 1000 and devs["h100-80gb"].peak_bf16_flops == 989e12
    assert devs["mi300x"].name == "MI300X"
    bad = tmp_path / "bad.toml"
    bad.write_text('[x]\nname = "X"\npeak_bf16_flops = 1\n')
    with pytest.raises(ConfigError, match="missing"):
        load_devices(bad)
    assert devs["mi300x"].cores == 0 and devs["mi300x"].comm_overlap  # optional keys: GPU behaviour
    bad.write_text('[cpu]\ncomm_overlap = "no"\n')
    with pytest.raises(ConfigError, match="comm_overlap must be true or false"):
        load_devices(bad)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[h100-80gb\nhbm_bytes = 1\n", "not valid TOML: "),
        ('name = "X"\n', "top-level key 'name' must be a [device] table"),
        (
            "[h100-80gb]\nhbm_bytes = 'lots'\n",
            "device 'h100-80gb' (in {path}): hbm_bytes must be a finite number, got 'lots'",
        ),
        ("[h100-80gb]\nhbm_bytes = nan\n", "hbm_bytes must be a finite number, got nan"),
        ("[h100-80gb]\nnvlink_bw = inf\n", "nvlink_bw must be a finite number, got inf"),
        ("[h100-80gb]\nhbm_bytes = true\n", "hbm_bytes must be a finite number, got True"),
        ("[h100-80gb]\nhbm_bytes = 0\n", "hbm_bytes must be positive, got 0"),
        ("[h100-80gb]\nnvlink_latency = -1e-6\n", "nvlink_latency must be 0 or positive, got -1e-06"),
        ("[h100-80gb]\npeak_fp8_flops = -1\n", "peak_fp8_flops must be 0 or positive"),
        ("[h100-80gb]\ncores = 2.5\n", "cores must be a whole number, got 2.5"),
        ("[h100-80gb]\nname = 5\n", "name must be a non-empty string, got 5"),
        ("[h100-80gb]\nnvlink_gbps = 5\n", "unknown keys nvlink_gbps (known: name, peak_bf16_flops"),
        ("[x]\nname = 'X'\n", "device 'x' (in {path}): missing peak_bf16_flops"),
        (b"\xff\xfe[h100-80gb]", "not a TOML file (not UTF-8 text)"),
    ],
)
def test_malformed_device_table_one_line(capsys, tmp_path, text, message):
    """A --devices file with a syntax error, a wrong type, a non-finite or negative number, an unknown key, or
    bytes that are not text: one line naming the device, the key and the file; exit 2, no traceback."""
    path = tmp_path / "devs.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["plan", "--config", "small", "--gpus", "8", "--devices", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(path=path) in err and str(path) in err and "\n" not in err and "Traceback" not in err
    assert main(["plan", "--config", "small", "--gpus", "8", "--devices", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err
