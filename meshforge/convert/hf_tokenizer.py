"""A checkpoint's tokenizer as a Hugging Face tokenizer directory.

A Hugging Face ``tokenizer.json`` (and a sentencepiece model imported with its HF config
files) goes back as it came, with its config files and the special-token ids of the
tokenizer. A sentencepiece model meshforge trained (no normalisation, no dummy prefix) is
converted: the export writes the model, ``tokenizer_config.json`` and a ``tokenizer.json``
that encodes every text to the same ids as sentencepiece (checked at export on
:data:`SAMPLES`, tested on more), so loading needs neither sentencepiece nor a conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..tokenizers import TOKENIZER_FILES, Tokenizer, load_tokenizer
from .safetensors_io import ConvertError


def tokenizer_of(directory: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint, init or HF directory holds (``tokenizer.json`` first), or None."""
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(directory)


def token_ids(tok: Tokenizer | None, imported: dict | None = None) -> dict[str, int | None]:
    """bos/eos/pad ids for the HF config: the tokenizer's own (None where it has none); without a
    tokenizer, those ``convert import`` read from the source's config (``imported``), else meshforge's
    fixed scheme (2, 3, 0)."""
    if tok is None:
        return dict(imported) if imported else {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    if tok.vocab_size > vocab_size:
        raise ConvertError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is {vocab_size}: "
            "the checkpoint and its tokenizer do not belong together"
        )


SAMPLES = (
    "ROMEO: What light through  yonder window breaks?\n\n 12 e\u0301\t\U0001f600",
    " lead",
    "Ünïcödé 日本語 🦜🚀    \n\n\t\t  3.14159 1234567 x",
)
"""Texts an exported tokenizer must encode as ours does: unicode, emoji, whitespace runs, digits."""


def write_tokenizer(tok: Tokenizer, out: Path, seq2seq: bool = False) -> None:
    """The tokenizer files transformers loads in ``out``, checked to encode like ``tok``.

    A Hugging Face tokenizer (or a sentencepiece model that came with its HF config files,
    e.g. an imported Llama 2) is written back as it came (:meth:`Tokenizer.save`); a
    sentencepiece model meshforge trained is converted (:func:`write_hf_tokenizer`), a
    tiktoken file written as its equal ``tokenizer.json``.
    """
    if tok.kind == "sentencepiece" and set(tok.files()) == {"tokenizer.model"}:
        write_hf_tokenizer(tok, out, seq2seq)
        return
    if tok.kind == "tiktoken":
        tok.save_hf(out)  # the equal tokenizer.json: transformers does not read tiktoken files
    else:
        tok.save(out)
    if tok.kind == "sentencepiece":  # written back as it came with its HF files: loaded, not compared
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(out))
    else:
        _check_encodes_alike(out, tok, "the tokenizer")


def _check_encodes_alike(out: Path, tok: Tokenizer, what: str) -> None:
    """transformers' tokenizer of ``out`` must encode :data:`SAMPLES` as ``tok`` does (``what``: ``tok`` in words)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    for sample in SAMPLES:
        if hf.encode(sample, add_special_tokens=False) != tok.encode(sample):
            raise ConvertError(
                f"transformers encodes text differently from {what} {tok.path}; "
                "the tokenizer cannot be exported faithfully"
            )


def write_hf_tokenizer(tok: Tokenizer, out: Path, seq2seq: bool = False) -> None:
    """The tokenizer files transformers loads (``AutoTokenizer``) in ``out`` for the sentencepiece model ``tok``,
    checked to encode like it.

    BPE models go through transformers' Llama tokenizer (``legacy = false``, no prefix space,
    no BOS/EOS added); a model with sentencepiece's dummy prefix (Llama 2's) then gets its
    ``tokenizer.json`` normaliser and decoder set to sentencepiece's. Unigram models (the T5 preset) through its T5 tokenizer, whose
    ``tokenizer.json`` is then corrected to what sentencepiece does here: no whitespace
    collapsing, no dummy prefix, byte fallback, meshforge's unk id.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    tokenizer_file = tok.path
    proto = pb.ModelProto()
    proto.ParseFromString(Path(tokenizer_file).read_bytes())
    unigram = proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    specials = _specials(tok, ("eos", "unk", "pad"))
    if unigram:  # transformers' T5 tokenizer rebuilds T5's own pipeline on load: ship a plain tokenizer.json
        shutil.copyfile(tokenizer_file, out / "spiece.model")
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "legacy": False, **specials})
        )
        AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
        _fix_unigram_json(out / "tokenizer.json", tok.unk_id, keep_eos=seq2seq)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    else:
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_prefix_space": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **_specials(tok, ("bos",)),
            **specials,
        }
    config["model_max_length"] = 10**30
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not unigram:
        AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
        if (
            proto.normalizer_spec.add_dummy_prefix
        ):  # Llama 2's models put a space before every text, as sentencepiece does
            _fix_dummy_prefix_json(out / "tokenizer.json")
            config["tokenizer_class"] = "PreTrainedTokenizerFast"  # load tokenizer.json as it is
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _check_encodes_alike(out, tok, "the sentencepiece model")


def _specials(tok: Tokenizer, roles: tuple[str, ...]) -> dict[str, str]:
    """``{"eos_token": piece, ...}`` for the roles the model has (a Llama 2 model has no pad: -1)."""
    ids = {role: getattr(tok, f"{role}_id") for role in roles}
    return {f"{role}_token": tok.id_to_piece(i) for role, i in ids.items() if i is not None}


def _fix_dummy_prefix_json(path: Path) -> None:
    """sentencepiece's dummy prefix: "▁" before the text always (HF's Metaspace skips it before a space)."""
    spec = json.loads(path.read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    spec["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"String": "\u2581"},
        "behavior": "MergedWithNext",
        "invert": False,
    }
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    path.write_text(json.dumps(spec, ensure_ascii=False))


def _fix_unigram_json(path: Path, unk_id: int, keep_eos: bool) -> None:
    spec = json.loads(path.read_text())
    spec["model"].update(byte_fallback=True, unk_id=unk_id)
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    spec["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"String": "\u2581"},
        "behavior": "MergedWithNext",
        "invert": False,
    }
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    if not keep_eos:
        spec["post_processor"] = None
    path.write_text(json.dumps(spec, ensure_ascii=False))
