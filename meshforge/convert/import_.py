"""``meshforge convert import --from hf``: a Hugging Face model directory -> a meshforge init checkpoint.

The output directory is a DCP checkpoint of the model weights (``model.*`` entries, as
every training checkpoint has) with ``meta.json`` (step 0 and the full config), the
HF directory's tokenizer when it has one (``tokenizer.json`` with its config files, special
tokens resolved; else a sentencepiece ``tokenizer.model``), and ``model.toml``: a preset
reproducing the architecture, with ``checkpoint.init_from`` and ``data.tokenizer`` relative
to it (``./``), so the directory can be moved. ``meshforge train --config DIR/model.toml
--data.path ...`` (or any preset plus ``--checkpoint.init_from DIR``) starts training from the
imported weights under any layout, with a fresh optimizer at step 0. Without a tokenizer,
``meta.json`` keeps the HF config's bos/eos/pad ids for the export.

Checks before anything is written: ``config.json`` valid JSON naming a known architecture
whose math meshforge reproduces (else the feature is named), every shard of the index
present and whole (``hf_checks.py``), every tensor the architecture needs present with the
shape the config gives it, none left over, the tokenizer within the vocab.
The whole model is held in memory once (DCP writes one state dict).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import JobConfig, ModelConfig, config_to_dict, validate
from ..models import check_config
from ..pretrain import dcp_io
from ..pretrain.checkpoint_files import file_records
from ..tokenizers import Tokenizer, load_tokenizer
from .export import check_output_dir, staged_output
from .families import converter_for_architecture, known_architectures
from .hf_checks import check_safetensors_files, check_shapes, read_config_json
from .hf_tokenizer import check_vocab, tokenizer_of
from .safetensors_io import ConvertError, SafetensorsDir

IGNORED_HF = ("rotary_emb.inv_freq",)
"""HF tensors that are derived, not learned (old checkpoints store them)."""


def read_hf_config(directory: Path, raw: dict | None = None):
    """(the raw ``config.json``, transformers' config of it), after checking the architecture is one we map;
    ``raw``: the ``config.json`` already read (:func:`read_config_json`)."""
    raw = read_config_json(directory) if raw is None else raw
    arch = (raw.get("architectures") or [""])[0]
    known = known_architectures()
    if arch not in known:
        raise ConvertError(
            f"unknown Hugging Face architecture {arch!r} in {Path(directory) / 'config.json'}; "
            f"supported: {', '.join(known)}"
        )
    from transformers import AutoConfig

    try:
        return raw, AutoConfig.from_pretrained(str(directory))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConvertError(f"transformers cannot read {Path(directory) / 'config.json'}: {e}") from None


@dataclass
class HFImport:
    """What :func:`import_checks` found in a Hugging Face directory, checked."""

    family: Any
    """The family's converter module (``convert/families.py``)."""
    model: ModelConfig
    pairs: list
    """(HF name, our name, expert index or None) of every tensor to import."""
    files: SafetensorsDir
    hf_config: Any
    """transformers' config of ``config.json`` (its special token ids go to the export without a tokenizer)."""


def import_checks(directory: Path, raw: dict | None = None, files: SafetensorsDir | None = None) -> HFImport:
    """An HF directory after every check that needs no tensor data: config, files whole, tensors present, none
    unknown, every shape as the config says. ``raw`` and ``files``: its ``config.json`` and safetensors files,
    where the caller has read them already."""
    directory = Path(directory)
    raw, hf = read_hf_config(directory, raw)
    files = SafetensorsDir(directory) if files is None else files
    shapes = check_safetensors_files(files)
    family = converter_for_architecture(hf.architectures[0])
    m, pairs, extra_ok, emb = family.import_plan(hf, set(shapes))
    needed = {hf_name for hf_name, _, _ in pairs}
    absent = [n for n in needed if n not in files]
    if absent:
        raise ConvertError(f"{directory} lacks {len(absent)} tensor(s) its config needs, e.g. {sorted(absent)[0]}")
    unexpected = sorted(k for k in files.keys() if k not in needed and k not in extra_ok and not k.endswith(IGNORED_HF))
    if unexpected:
        raise ConvertError(
            f"{directory} has tensors meshforge's {hf.architectures[0]} mapping does not know, e.g. "
            f"{unexpected[0]}; refusing to drop them"
        )
    rows = shapes[emb][0]
    if rows != m.vocab_size:
        raise ConvertError(f"{emb} has {rows} rows but config.json says vocab_size = {m.vocab_size}")
    check_shapes(directory, hf, raw, m, pairs, shapes)
    return HFImport(family, m, pairs, files, hf)


def hf_to_meshforge(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], HFImport]:
    """The ModelConfig and full meshforge state dict of an HF model directory (checked), and what the checks found."""
    found = import_checks(directory)
    m = found.model
    state = found.family.import_state(found.files, m, found.pairs)
    if m.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return m, state, found


def job_config_for(m: ModelConfig, init_dir: Path, tokenizer: Path | None) -> JobConfig:
    cfg = JobConfig(model=m)
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_seq_len)
    if tokenizer is not None:
        cfg.data.tokenizer = str(tokenizer)
    cfg.checkpoint.init_from = str(init_dir)
    validate(cfg)
    check_config(cfg)
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def _within(path: str, home: Path | None) -> str:
    """``path`` as the preset in ``home`` should name it: ``./...`` (relative to the preset file, see
    ``config.PRESET_RELATIVE_KEYS``) when it lies inside ``home``, so the directory can be moved."""
    if home is None:
        return path
    try:
        rel = Path(path).absolute().relative_to(home.absolute())
    except ValueError:
        return path
    return "." if rel == Path(".") else f"./{rel.as_posix()}"


def preset_toml(cfg: JobConfig, home: Path | None = None) -> str:
    """A preset with the whole model section and what ties the run to the imported weights; paths
    inside ``home`` (the directory the preset is written to) relative to it."""
    lines = ["# Written by `meshforge convert import`: the architecture of the imported model.", "", "[model]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in asdict(cfg.model).items()]
    lines += ["", "[data]", f"seq_len = {cfg.data.seq_len}"]
    if cfg.data.tokenizer:
        lines.append(f"tokenizer = {_toml_value(_within(cfg.data.tokenizer, home))}")
    lines += ["", "[checkpoint]", f"init_from = {_toml_value(_within(cfg.checkpoint.init_from, home))}", ""]
    return "\n".join(lines)


def write_init_checkpoint(
    output: Path,
    cfg: JobConfig,
    state: dict[str, torch.Tensor],
    extra_meta: dict,
    tokenizer: Tokenizer | Path | None = None,
) -> Path:
    """A step-0 DCP checkpoint of ``state`` plus meta.json, model.toml and the tokenizer (its files), atomically."""
    output = Path(output)
    check_output_dir(output)
    with staged_output(output) as tmp:
        dcp_io.save({"model": {k: v.contiguous() for k, v in state.items()}}, tmp, alone=True)
        if tokenizer is not None:
            (tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)).save(tmp)
        (tmp / "model.toml").write_text(preset_toml(cfg, output))
        meta = {
            "step": 0,
            "config": config_to_dict(cfg),
            "world_size": 1,
            **extra_meta,
            "files": file_records(tmp),
        }  # checked by train, generate and export, as a training checkpoint's
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return output


def import_hf(hf_dir: str | Path, output: str | Path, log=print) -> Path:
    hf_dir, output = Path(hf_dir), Path(output)
    check_output_dir(output)
    m, state, found = hf_to_meshforge(hf_dir)
    tok = tokenizer_of(hf_dir)
    if tok is not None:
        check_vocab(tok, m.vocab_size)
    final_dir = output.resolve()  # model.toml names it, and the tokenizer in it, relative to itself
    cfg = job_config_for(m, final_dir, final_dir / tok.main_file if tok is not None else None)
    # the HF config's special ids go to the export when there is no tokenizer
    ids = {k: getattr(found.hf_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    write_init_checkpoint(output, cfg, state, {"source": {"hf_dir": str(hf_dir.resolve())}, "hf_token_ids": ids}, tok)
    n_params = sum(t.numel() for k, t in state.items() if not (m.tie_embeddings and k == "output.weight"))
    log(
        f"imported {hf_dir} ({n_params:,} parameters) to {output}; train from it with "
        f"`meshforge train --config {output}/model.toml --data.path ...`"
        + ("" if tok else " (the HF dir has no tokenizer.json or tokenizer.model: pass --data.tokenizer)")
    )
    return output
