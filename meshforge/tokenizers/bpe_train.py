"""Train a byte-level BPE ``tokenizer.json`` (Hugging Face ``tokenizers``), GPT-2 / Llama-3 style.

Text is split by Llama 3's pre-tokenization pattern (contractions, letter runs, numbers of at
most three digits, punctuation runs, whitespace runs), each piece mapped to bytes as GPT-2
does; the 256 byte symbols are always in the vocabulary, so there is no unknown token and
``decode(encode(t)) == t`` for any text. Special tokens take the first ids:
``<|begin_of_text|>`` (BOS), ``<|end_of_text|>`` (EOS), ``<|pad|>`` (pad), then the user's.
No BOS is added on encode; data preparation appends EOS to every document. The files written,
``tokenizer.json`` and ``tokenizer_config.json``, load in transformers (``AutoTokenizer``) and
in meshforge (:func:`meshforge.tokenizers.load_tokenizer`). Same input and settings, same bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

from meshforge.tokenizers.interface import TokenizerError

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3's (tiktoken cl100k-style) pre-tokenization regex."""
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def train_byte_bpe(
    documents,
    output_dir: str | Path,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    n_reserved: int = 0,
    min_frequency: int = 2,
) -> Path:
    """Train on an iterable of documents; writes ``output_dir/tokenizer.json`` (+ config), returns its path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [BOS, EOS, PAD] + list(special_tokens) + [f"<reserved_{i}>" for i in range(n_reserved)]
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"special tokens must be unique, got {specials}: remove the duplicates")
    smallest = len(specials) + 256 + 8
    if vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE with {len(specials)} special "
            f"tokens and 256 bytes: use at least {smallest}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def counted():
        for doc in documents:
            seen[0] += 1
            yield doc

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise TokenizerError("the tokenizer training inputs hold no text: check the files and --text-field")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "tokenizer.json", tok.to_str(pretty=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 10**30,
    }
    _atomic_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out / "tokenizer.json"


def train_byte_bpe_files(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    n_reserved: int = 0,
    text_field: str = "text",
) -> Path:
    """:func:`train_byte_bpe` on the documents of .txt / .jsonl(.gz) files (read as sentencepiece training reads them)."""
    from meshforge.text_inputs import no_skips
    from meshforge.tokenizers.sentencepiece_tokenizer import check_inputs, iter_texts

    paths = check_inputs(inputs)
    skipped = no_skips()
    docs = (text for p in paths for text in iter_texts(p, text_field, skipped))
    return train_byte_bpe(docs, output_dir, vocab_size, special_tokens, n_reserved)
