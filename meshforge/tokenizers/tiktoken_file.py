"""A tiktoken-format BPE file (Meta's original Llama 3 ``tokenizer.model``) behind meshforge's interface.

The file is one ``<base64 token bytes> <rank>`` line per token, ranks 0..n-1 in merge order.
It is turned into a byte-level BPE of the ``tokenizers`` library: the vocabulary is the tokens
(bytes mapped to printable characters as GPT-2 does), and each token of two or more bytes is
the merge of the two parts that BPE with only lower ranks splits it into; text is split by
Llama 3's pre-tokenization pattern. A file of exactly 128,000 ranks is Meta's Llama 3 file:
its 256 special tokens follow at 128,000.. (``<|begin_of_text|>`` BOS and put before every
document, ``<|end_of_text|>`` EOS, ``<|eot_id|>`` ...), as Meta's own tokenizer defines them.
Other files get no special tokens. Copies keep the file itself (:meth:`files`); the export
to Hugging Face writes the converted ``tokenizer.json`` (:meth:`save_hf`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from meshforge.tokenizers.hf_json import HFTokenizer
from meshforge.tokenizers.interface import TokenizerError

LLAMA3_RANKS = 128_000
LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)


def looks_like_tiktoken(data: bytes) -> bool:
    """Whether the first line is ``<base64> <int>`` (a sentencepiece model is a binary proto)."""
    first = data.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """The parts BPE leaves of ``token`` when merging only pairs ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def read_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(
                f"{path} line {n} is not `<base64 token> <rank>`: the tiktoken file is corrupt"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"{path} is not a complete tiktoken BPE file (ranks 0..n-1 with all 256 bytes)")
    return ranks


def tokenizer_json(ranks: dict[bytes, int], specials: list[str]) -> str:
    """The ``tokenizer.json`` of the byte-level BPE equal to the tiktoken ranks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from meshforge.tokenizers.bpe_train import SPLIT_PATTERN

    chars = _byte_chars()
    text = {tok: "".join(chars[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _split(ranks, tok, rank)
            if len(parts) != 2:
                raise TokenizerError(f"tiktoken token of rank {rank} is not the merge of two lower-ranked tokens")
            merges.append((text[parts[0]], text[parts[1]]))
    bpe = Tokenizer(models.BPE({text[t]: r for t, r in ranks.items()}, merges, ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    if specials:  # Llama 3: BOS before every text
        bos = specials[0]
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, len(ranks))]
        )
    return bpe.to_str()


class TiktokenTokenizer(HFTokenizer):
    """A tiktoken BPE file, encoded by the equal ``tokenizers`` BPE."""

    kind = "tiktoken"
    main_file = "tokenizer.model"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path).resolve()
        data = self.path.read_bytes()
        ranks = read_ranks(self.path, data)
        specials = LLAMA3_SPECIALS if len(ranks) == LLAMA3_RANKS else []
        self._json = tokenizer_json(ranks, specials)
        self._tok = RustTokenizer.from_str(self._json)
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self._size = len(ranks) + len(specials)
        self.config = {"bos_token": specials[0], "eos_token": specials[1]} if specials else {}
        self._ids = {
            "bos": LLAMA3_RANKS if specials else None,
            "eos": LLAMA3_RANKS + 1 if specials else None,
            "pad": None,
            "unk": None,
        }
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self._ids[r] for r in ("bos", "eos", "pad", "unk"))
        self.add_bos = bool(specials)  # Meta's Llama 3 puts <|begin_of_text|> before every text

    def files(self) -> dict[str, Path]:
        return {"tokenizer.model": self.path}

    def save(self, directory: str | Path) -> Path:
        return super(HFTokenizer, self).save(directory)

    def save_hf(self, directory: str | Path) -> None:
        """The converted ``tokenizer.json`` and a ``tokenizer_config.json`` (for the Hugging Face export)."""
        directory = Path(directory)
        (directory / "tokenizer.json").write_text(self._json)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: v for k, v in self.special_tokens().items() if v is not None},
            "model_max_length": 10**30,
        }
        tmp = directory / f".tokenizer_config.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, directory / "tokenizer_config.json")
