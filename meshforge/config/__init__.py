"""The job config tree: TOML presets, dotted CLI overrides, the run's identity; the one import for all of it.

A job is one :class:`JobConfig` with the sections ``model``, ``parallel``, ``data``,
``optim``, ``train``, ``checkpoint`` and ``logging``. It is built from the dataclass
defaults (which are the small CPU preset), then a TOML preset, then ``--section.key value``
overrides, in that order. Unknown keys and values of the wrong type are errors that name
the key; :func:`validate` checks the relations between fields before any heavy work starts.

The parts live in their own files and are re-exported here (``from meshforge.config import X``):
the section dataclasses and ``CHOICES`` in :mod:`meshforge.config.sections`, :func:`validate`
and :func:`micro_batch_size` in :mod:`meshforge.config.checks`, the objective and UL2 denoiser
parsing in :mod:`meshforge.config.objectives`.

Every field carries a docstring (the string literal under it); ``meshforge train
--help-config`` prints them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .checks import (
    ARCHITECTURE_OPTIONS,
    DEEPSPEED_ONLY,
    FSDP2_ONLY,
    LAYOUT_FIELDS,
    check_ft_groups,
    micro_batch_size,
    validate,
    validate_layout,
    validate_settings,
)
from .objectives import ENCODER_DECODER_OBJECTIVES, UL2_KINDS, Denoiser, mode_token_pieces, parse_denoisers
from .resume import resume_help
from .sections import (
    CHOICES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    section_types,
)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""Where named presets (``--config small``) are looked up."""
PRESET_RELATIVE_KEYS = ("data.path", "data.tokenizer", "checkpoint.init_from", "checkpoint.resume_from")
"""Path keys whose value in a preset file, when it is ``.`` or starts with ``./`` or ``../``, is
relative to the preset file's directory (so a preset can travel with what it names, as the
``model.toml`` of ``meshforge convert import`` does); other relative paths stay relative to
the working directory."""


def preset_relative(value: Any, preset_dir: Path) -> Any:
    """``value`` resolved against ``preset_dir`` if it is a ``.``/``./``/``../`` path, else unchanged."""
    if isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../"))):
        return str(Path(os.path.normpath(preset_dir.absolute() / value)))
    return value


# --------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def describe(cfg: JobConfig | None = None) -> str:
    """Every key with its current value and docstring, for ``--help-config``."""
    cfg = cfg or JobConfig()
    lines = []
    for sec in dataclasses.fields(JobConfig):
        section = getattr(cfg, sec.name)
        docs = field_docs(type(section))
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(section):
            key = f"{sec.name}.{f.name}"
            lines.append(
                f"  {key} = {getattr(section, f.name)!r}\n      {docs.get(f.name, '')}\n      [{resume_help(key)}]"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- building


def _coerce(key: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Return ``value`` as ``typ`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0], from_cli)
    if origin is Literal:  # a choice field: a string here, its value checked against CHOICES by validate()
        typ = str
    if typ is bool:
        if isinstance(value, bool):
            return value
        if (
            from_cli
            and isinstance(value, str)
            and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off")
        ):
            return value.lower() in ("true", "1", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field has one of the types above
        raise ConfigError(f"{key}: unsupported field type {typ}")
    raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(sorted(choices))}")


def _set(cfg: JobConfig, dotted: str, value: Any, from_cli: bool) -> None:
    parts = dotted.split(".")
    sections = section_types()
    if len(parts) != 2:
        raise ConfigError(f"config key '{dotted}' must look like section.key (sections: {', '.join(sections)})")
    sec, name = parts
    if sec not in sections:
        raise _unknown(sec, list(sections))
    section = getattr(cfg, sec)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise _unknown(dotted, list(hints))
    setattr(section, name, _coerce(dotted, value, hints[name], from_cli))


def resolve_preset(name_or_path: str) -> Path:
    """A preset path, or the name of a file in ``configs/`` (with or without ``.toml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (REPO_CONFIGS / name_or_path, REPO_CONFIGS / f"{name_or_path}.toml"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in REPO_CONFIGS.glob("*.toml"))
    raise ConfigError(f"config file '{name_or_path}' not found (presets: {', '.join(known) or 'none'})")


def read_toml_tables(path: Path, kind: str) -> dict[str, dict[str, Any]]:
    """A TOML file whose every top-level key is a ``[kind]`` table; ConfigError naming the file otherwise."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text)") from None
    for key, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key '{key}' must be a [{kind}] table")
    return data


def load_config(preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
    """Defaults, then the TOML preset, then the overrides; then :func:`validate`.

    ``overrides`` is either ``["--model.dim", "256", ...]`` (CLI form) or a dict of
    dotted keys to typed values.
    """
    cfg = JobConfig()
    if preset:
        path = resolve_preset(preset)
        for sec, table in read_toml_tables(path, "section").items():
            for key, value in table.items():
                dotted = f"{sec}.{key}"
                if dotted in PRESET_RELATIVE_KEYS:
                    value = preset_relative(value, path.parent)
                _set(cfg, dotted, value, from_cli=False)
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set(cfg, key, value, from_cli=False)
    elif overrides:
        for key, value in parse_cli_overrides(overrides):
            _set(cfg, key, value, from_cli=True)
    validate(cfg)
    return cfg


def parse_cli_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``[("a.b", "1"), ("c.d", "x")]``."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out.append((key, value))
    return out


def config_from_dict(data: dict[str, dict[str, Any]]) -> JobConfig:
    """Rebuild a config saved with :func:`config_to_dict` (checked like a preset)."""
    cfg = JobConfig()
    for sec, table in data.items():
        for key, value in table.items():
            _set(cfg, f"{sec}.{key}", value, from_cli=False)
    validate(cfg)
    return cfg


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def padded_vocab_size(tokenizer_size: int, multiple_of: int) -> int:
    """The tokenizer's size rounded up to a multiple of ``multiple_of`` (what ``model.vocab_size = 0`` means)."""
    return multiple_of * -(-tokenizer_size // multiple_of)


# --------------------------------------------------------------------------- identity

RUN_IDENTITY_KEYS = (
    "model",
    "data.path",
    "data.seq_len",
    "data.valid_fraction",
    "data.tokenizer",
    "train.seed",
    "train.global_batch_size",
)
"""Keys that make two runs 'the same run' for resuming: changing them in an existing
output dir is refused. Steps, intervals, logging and parallel layout may change."""


def run_identity(cfg: JobConfig) -> dict[str, Any]:
    flat = {}
    full = config_to_dict(cfg)
    for key in RUN_IDENTITY_KEYS:
        if "." in key:
            sec, name = key.split(".")
            flat[key] = full[sec][name]
        else:
            for name, value in full[key].items():
                flat[f"{key}.{name}"] = value
    return flat


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "ARCHITECTURE_OPTIONS",
    "CHOICES",
    "DEEPSPEED_ONLY",
    "ENCODER_DECODER_OBJECTIVES",
    "FSDP2_ONLY",
    "LAYOUT_FIELDS",
    "REPO_CONFIGS",
    "RUN_IDENTITY_KEYS",
    "UL2_KINDS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "Denoiser",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "check_ft_groups",
    "config_from_dict",
    "config_to_dict",
    "describe",
    "field_docs",
    "fingerprint",
    "load_config",
    "micro_batch_size",
    "mode_token_pieces",
    "padded_vocab_size",
    "parse_cli_overrides",
    "parse_denoisers",
    "resolve_preset",
    "run_identity",
    "validate",
    "validate_layout",
    "validate_settings",
]
