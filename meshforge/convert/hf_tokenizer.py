"""The sentencepiece model as a Hugging Face tokenizer directory, and back.

meshforge tokenizers never normalise text and add no dummy prefix. The export writes the
sentencepiece model, ``tokenizer_config.json``, and a ``tokenizer.json`` that encodes every
text to the same ids as sentencepiece (checked on a sample at export, tested on more), so
loading needs neither sentencepiece nor a conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..tokenizers import load_tokenizer
from .safetensors_io import ConvertError


def token_ids(tokenizer_file: Path | None) -> dict[str, int]:
    """bos/eos/pad ids for the HF config (meshforge's fixed scheme when there is no tokenizer)."""
    if tokenizer_file is None:
        return {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    tok = load_tokenizer(tokenizer_file)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def check_vocab(tokenizer_file: Path, vocab_size: int) -> None:
    n = load_tokenizer(tokenizer_file).vocab_size
    if n > vocab_size:
        raise ConvertError(f"tokenizer {tokenizer_file} has {n} pieces but the model's vocab_size is {vocab_size}: "
                           "the checkpoint and its tokenizer do not belong together")


def write_hf_tokenizer(tokenizer_file: Path, out: Path, seq2seq: bool = False) -> None:
    """The tokenizer files transformers loads (``AutoTokenizer``) in ``out``, checked to encode like ours.

    BPE models go through transformers' Llama tokenizer (``legacy = false``, no prefix space,
    no BOS/EOS added). Unigram models (the T5 preset) through its T5 tokenizer, whose
    ``tokenizer.json`` is then corrected to what sentencepiece does here: no whitespace
    collapsing, no dummy prefix, byte fallback, meshforge's unk id.
    """
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_file)
    piece = tok.id_to_piece
    unigram = _is_unigram(tokenizer_file)
    specials = {"eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id)}
    if unigram:  # transformers' T5 tokenizer rebuilds T5's own pipeline on load: ship a plain tokenizer.json
        shutil.copyfile(tokenizer_file, out / "spiece.model")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "legacy": False, **specials}))
        AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
        _fix_unigram_json(out / "tokenizer.json", tok.unk_id, keep_eos=seq2seq)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    else:
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False,
                  "add_bos_token": False, "add_eos_token": False, "bos_token": piece(tok.bos_id), **specials}
    config["model_max_length"] = 10**30
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not unigram:
        AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
    hf = AutoTokenizer.from_pretrained(str(out))
    for sample in ("ROMEO: What light through  yonder window breaks?\n\n 12 e\u0301\t\U0001F600", " lead"):
        if hf.encode(sample, add_special_tokens=False) != tok.encode(sample):
            raise ConvertError(f"transformers encodes text differently from the sentencepiece model {tokenizer_file}; "
                               "the tokenizer cannot be exported faithfully")


def _is_unigram(tokenizer_file: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(tokenizer_file).read_bytes())
    return m.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM


def _fix_unigram_json(path: Path, unk_id: int, keep_eos: bool) -> None:
    spec = json.loads(path.read_text())
    spec["model"].update(byte_fallback=True, unk_id=unk_id)
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"String": "\u2581"}, "behavior": "MergedWithNext",
                             "invert": False}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    if not keep_eos:
        spec["post_processor"] = None
    path.write_text(json.dumps(spec, ensure_ascii=False))


def sentencepiece_from_hf(directory: Path) -> Path | None:
    """The sentencepiece model of an HF directory, if it has one."""
    p = Path(directory) / "tokenizer.model"
    return p if p.is_file() else None
