"""Config loading: presets, overrides, unknown keys, wrong types, cross-field checks."""

import dataclasses
from pathlib import Path

import pytest

from meshforge.config import (
    ConfigError,
    JobConfig,
    describe,
    field_docs,
    load_config,
    micro_batch_size,
    parse_cli_overrides,
)
from meshforge.parallel.job_checks import check_job
from meshforge.parallel.mesh import resolve_degrees


def test_small_preset_equals_defaults():
    assert load_config("small") == JobConfig()
    assert load_config("configs/small.toml") == JobConfig()


def test_cli_overrides_are_typed():
    cfg = load_config(
        "small", ["--model.n_layers", "3", "--optim.lr=1e-3", "--model.qk_norm", "true", "--train.output_dir", "/tmp/x"]
    )
    assert cfg.model.n_layers == 3 and cfg.optim.lr == 1e-3 and cfg.model.qk_norm is True
    assert cfg.train.output_dir == "/tmp/x"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer'.*did you mean 'n_layers'"):
        load_config(None, ["--model.n_layer", "3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["--modle.dim", "3"])


def test_unknown_key_in_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(str(p))


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"model.n_layers: expected int, got 'four'"):
        load_config(None, ["--model.n_layers", "four"])
    with pytest.raises(ConfigError, match=r"model.qk_norm: expected bool"):
        load_config(None, ["--model.qk_norm", "maybe"])


def test_wrong_type_in_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[model]\ndim = "wide"\n')
    with pytest.raises(ConfigError, match=r"model.dim: expected int, got 'wide'"):
        load_config(str(p))


def test_seq_len_beyond_positions():
    with pytest.raises(ConfigError, match=r"data.seq_len \(2048\) is beyond the model's positions"):
        load_config(None, ["--data.seq_len", "2048", "--model.max_seq_len", "1024"])


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.n_heads", "5"], "must divide by model.n_heads"),
        (["--model.n_kv_heads", "4"], "must divide by model.n_kv_heads"),
        (["--train.micro_batch_size", "5"], "must divide by train.micro_batch_size"),
        (["--optim.schedule", "linear"], "optim.schedule = 'linear' is not one of"),
        (["--train.steps", "0"], "train.steps must be positive"),
        (["--parallel.dp_shard", "0"], "parallel.dp_shard must be"),
    ],
)
def test_invalid_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_missing_preset():
    with pytest.raises(ConfigError, match="config file 'nope' not found"):
        load_config("nope")


def test_override_syntax():
    assert parse_cli_overrides(["--a.b", "1", "--c.d=x"]) == [("a.b", "1"), ("c.d", "x")]
    with pytest.raises(ConfigError, match="has no value"):
        parse_cli_overrides(["--a.b"])


def test_every_field_has_a_docstring():
    for sec in dataclasses.fields(JobConfig):
        cls = type(getattr(JobConfig(), sec.name))
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"
    assert "model.dim = 192" in describe()


def test_mesh_degrees():
    cfg = load_config(None, {"parallel.tp": 2})
    d = resolve_degrees(cfg.parallel, 8)
    assert (d.dp_shard, d.dp) == (4, 4)
    with pytest.raises(ConfigError, match=r"world size 6 does not divide by pp\*dp_replicate\*cp\*tp = 1\*1\*1\*4"):
        resolve_degrees(load_config(None, {"parallel.tp": 4}).parallel, 6)
    with pytest.raises(ConfigError, match=r"= 4 but the world size is 2"):
        resolve_degrees(load_config(None, {"parallel.dp_shard": 4}).parallel, 2)


PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_run_on_any_rank_count_dividing_the_global_batch(preset):
    """`torchrun --nproc-per-node N -m meshforge train --config <preset>`: the job checks pass for
    every N (a multiple of the preset's own model-parallel degrees) whose data-parallel degree
    divides the global batch (and the micro batch times it, when the preset sets a micro batch)."""
    cfg = load_config(preset)
    t, p = cfg.train, cfg.parallel
    assert t.micro_batch_size < t.global_batch_size, "a preset's micro batch equal to its global batch breaks N > 1"
    for mult in (1, 2, 3, 4, 8, 16):
        n = p.pp * p.tp * p.dp_replicate * p.cp * p.ep * mult
        d = resolve_degrees(p, n)
        if t.global_batch_size % (max(t.micro_batch_size, 1) * d.dp):
            with pytest.raises(ConfigError, match=f"train.global_batch_size \\({t.global_batch_size}\\)"):
                check_job(cfg, d)
            continue
        check_job(cfg, d)
        micro = micro_batch_size(t, d.dp)
        assert micro == (t.micro_batch_size or t.global_batch_size // d.dp)


def test_micro_batch_size_zero_is_the_local_batch():
    assert JobConfig().train.micro_batch_size == 0
    t = load_config(None, {"train.global_batch_size": 16}).train
    assert [micro_batch_size(t, dp) for dp in (1, 2, 4, 16)] == [16, 8, 4, 1]
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size \(16\) does not divide by the data-parallel "
        r"degree \(3\)",
    ):
        micro_batch_size(t, 3)
    t = load_config(None, {"train.global_batch_size": 16, "train.micro_batch_size": 4}).train
    assert [micro_batch_size(t, dp) for dp in (1, 2, 4)] == [4, 4, 4]  # positive: today's meaning
    with pytest.raises(
        ConfigError,
        match=r"must divide by train.micro_batch_size \* data-parallel degree "
        r"\(4 \* 8 = 32\)",
    ):
        micro_batch_size(t, 8)
    with pytest.raises(ConfigError, match="train.micro_batch_size must be >= 0, got -1"):
        load_config(None, {"train.micro_batch_size": -1})


def test_every_choice_field_is_checked_against_its_literal_type():
    """CHOICES is read from the ``Literal`` fields: each default is allowed, any other string is refused by name."""
    import dataclasses
    import typing

    from meshforge.config import CHOICES
    from meshforge.config.sections import section_types

    literal_fields = {
        f"{sec}.{f.name}"
        for sec, cls in section_types().items()
        for f in dataclasses.fields(cls)
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is typing.Literal
    }
    assert set(CHOICES) == literal_fields and "train.fused_loss" in CHOICES
    defaults = JobConfig()
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        assert getattr(getattr(defaults, sec), name) in allowed, key
        with pytest.raises(ConfigError, match=rf"^{key} = 'bogus' is not one of {', '.join(allowed)}$"):
            load_config(None, {key: "bogus"})


def test_preset_paths_starting_with_dot_are_relative_to_the_preset(tmp_path, monkeypatch):
    from meshforge.config import load_config

    preset = tmp_path / "presets" / "job.toml"
    preset.parent.mkdir()
    preset.write_text(
        '[data]\npath = "data/web"\ntokenizer = "../tok/a.model"\n[checkpoint]\ninit_from = "."\n'
        'resume_from = "./ck/step_00000010"\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(preset))
    assert cfg.data.path == "data/web"  # not ./-relative: the working directory's, as before
    assert cfg.data.tokenizer == str(tmp_path / "tok" / "a.model")
    assert cfg.checkpoint.init_from == str(tmp_path / "presets")
    assert cfg.checkpoint.resume_from == str(tmp_path / "presets" / "ck" / "step_00000010")
    over = load_config(str(preset), ["--data.tokenizer", "./b.model"])
    assert over.data.tokenizer == "./b.model"  # the command line is the working directory's
