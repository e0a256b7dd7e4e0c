"""The sentencepiece model as a Hugging Face tokenizer directory, and back.

meshforge tokenizers never normalise text and add no dummy prefix; transformers' Llama
tokenizer (with ``legacy = false``, no prefix space, no BOS/EOS added) reads such a model
and encodes every text to the same ids (tested). The export writes ``tokenizer.model``,
``tokenizer_config.json``, and the ``tokenizer.json`` that transformers builds from them,
so loading needs neither sentencepiece nor a conversion.
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
    """tokenizer.model + tokenizer_config.json + tokenizer.json (built by transformers) in ``out``."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_file)
    piece = tok.id_to_piece
    shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False,
        "add_bos_token": False, "add_eos_token": False,
        "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id),
        "pad_token": piece(tok.pad_id), "model_max_length": 10**30,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf = AutoTokenizer.from_pretrained(str(out))
    hf.save_pretrained(str(out))
    sample = "ROMEO: What light through yonder window breaks?  12 e\u0301\n"
    if hf.encode(sample, add_special_tokens=False) != tok.encode(sample):
        raise ConvertError(f"transformers encodes text differently from the sentencepiece model {tokenizer_file}; "
                           "the tokenizer cannot be exported faithfully")


def sentencepiece_from_hf(directory: Path) -> Path | None:
    """The sentencepiece model of an HF directory, if it has one."""
    p = Path(directory) / "tokenizer.model"
    return p if p.is_file() else None
