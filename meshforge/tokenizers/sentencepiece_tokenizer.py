"""Train and load sentencepiece tokenizers; meshforge trains them with one fixed id scheme.

Id scheme (every tokenizer meshforge trains): ``pad=0, unk=1, bos=2, eos=3``, then the
user-defined symbols (``special_tokens`` followed by ``<reserved_0>``, ``<reserved_1>``, ...),
then the 256 byte pieces when ``byte_fallback`` is on, then the learned pieces.

Text is not normalized (``identity`` rule), whitespace is kept as is and no dummy prefix is
added, so ``decode(encode(text)) == text`` for any text when byte fallback is on.
Training reads sentences from an iterator and writes the model into memory, so the model
bytes do not depend on temporary file names: the same input and settings give the same
file (and the same :attr:`Tokenizer.fingerprint`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from meshforge.errors import DataError
from meshforge.text_inputs import file_documents, no_skips
from meshforge.tokenizers.interface import Tokenizer, TokenizerError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
T5_SENTINELS = 100
PRESETS = {
    "llama": {"model_type": "bpe", "byte_fallback": True, "split_digits": True, "sentinels": 0},
    "t5": {"model_type": "unigram", "byte_fallback": True, "split_digits": False, "sentinels": T5_SENTINELS},
}
"""Named recipes. ``llama``: BPE, byte fallback, digits split, whitespace kept as is (as
LLaMA's tokenizer). ``t5``: unigram with ``<extra_id_0>`` .. ``<extra_id_99>`` sentinels
(user-defined symbols right after the four fixed ids, so ``<extra_id_i>`` is id ``4 + i``;
T5 itself puts them at the top of the vocab) and byte fallback. Whitespace and text are never
normalised (every meshforge tokenizer), so ``decode(encode(t)) == t``."""
_TRAIN_SEED = 1234
_MIN_LEARNED_PIECES = 8


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else int(i)


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model behind meshforge's tokenizer interface (an absent special id is None)."""

    kind = "sentencepiece"
    main_file = "tokenizer.model"

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise TokenizerError(
                f"tokenizer model {self.path} does not exist: pass the path of a sentencepiece .model file"
            )
        data = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on bad bytes
            raise TokenizerError(
                f"{self.path} is not a sentencepiece model ({exc}): pass a .model file written by sentencepiece"
            ) from None
        if self._sp.get_piece_size() <= 0:
            raise TokenizerError(f"{self.path} is not a sentencepiece model (empty vocabulary): retrain it")
        self.fingerprint = hashlib.sha256(data).hexdigest()

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int | None:
        return _id_or_none(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _id_or_none(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _id_or_none(self._sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        return _id_or_none(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS), using ``num_threads`` sentencepiece threads."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))


def iter_texts(path: Path, text_field: str = "text", skipped: dict | None = None) -> Iterator[str]:
    """Documents of one input file: a whole .txt file, or the ``text_field`` of each JSON line.

    Read by the data pipeline's readers (:func:`meshforge.text_inputs.file_documents`): records
    that give no document are counted in ``skipped`` by kind, as ``meshforge data prepare``
    counts them; a truncated or corrupt file is a :class:`TokenizerError`.
    """
    skipped = no_skips() if skipped is None else skipped
    try:
        yield from file_documents(path, text_field, skipped)
    except DataError as exc:
        raise TokenizerError(str(exc)) from None


def check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    if not inputs:
        raise TokenizerError("no tokenizer training inputs given: pass .txt, .jsonl or .jsonl.gz files")
    paths = []
    for p in inputs:
        path = Path(p)
        if not path.is_file():
            raise TokenizerError(f"tokenizer training input {path} does not exist: check the path")
        if not (path.name.endswith(".txt") or path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
            raise TokenizerError(f"tokenizer training input {path} is not .txt, .jsonl or .jsonl.gz: convert it first")
        paths.append(path)
    return paths


def _lines(paths: list[Path], text_field: str, skipped: dict) -> Iterator[str]:
    for path in paths:
        for text in iter_texts(path, text_field, skipped):
            yield from (line for line in text.split("\n") if line.strip())


def _sentences(
    paths: list[Path], text_field: str, sample: int = 0, skipped: dict | None = None
) -> tuple[list[str], int]:
    """(training lines, lines seen): non-empty lines of all documents (sentencepiece trains on lines).

    Records that give no document are counted in ``skipped`` by kind (see :func:`iter_texts`).

    With ``sample`` > 0 and more lines than that, a seeded reservoir sample of ``sample`` lines
    in shuffled order: memory stays bounded by ``sample`` however large the corpus is.
    """
    if sample <= 0:
        out = list(_lines(paths, text_field, skipped))
        return out, len(out)
    import random

    rng = random.Random(_TRAIN_SEED)
    out, seen = [], 0
    for line in _lines(paths, text_field, skipped):
        seen += 1
        if len(out) < sample:
            out.append(line)
        else:
            j = rng.randrange(seen)
            if j < sample:
                out[j] = line
    if seen > sample:
        rng.shuffle(out)
    return out, seen


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str | None = None,
    byte_fallback: bool | None = None,
    split_digits: bool | None = None,
    special_tokens: Sequence[str] = (),
    n_reserved: int = 0,
    input_sentence_size: int = 0,
    character_coverage: float = 0.9995,
    num_threads: int = 2,
    text_field: str = "text",
    preset: str | None = None,
) -> Path:
    """Train a sentencepiece model on text files and write ``<model_prefix>.model`` atomically.

    ``inputs`` are .txt (one document per file) or .jsonl/.jsonl.gz files (``text_field`` of
    each line). ``special_tokens`` and ``n_reserved`` reserved tokens (``<reserved_i>``) become
    user-defined symbols right after the four fixed ids. ``input_sentence_size`` > 0 trains on
    a seeded sample of that many lines (reservoir sampling, then shuffled). ``preset`` (see
    :data:`PRESETS`) sets ``model_type``, ``byte_fallback``, ``split_digits`` and sentinels;
    arguments given explicitly win. Without a preset the defaults are the ``llama`` recipe.
    Returns the path of the written model file.
    """
    if preset is not None and preset not in PRESETS:
        raise TokenizerError(f"tokenizer preset {preset!r} is unknown: use one of {', '.join(PRESETS)}")
    recipe = PRESETS[preset or "llama"]
    model_type = recipe["model_type"] if model_type is None else model_type
    byte_fallback = recipe["byte_fallback"] if byte_fallback is None else byte_fallback
    split_digits = recipe["split_digits"] if split_digits is None else split_digits
    special_tokens = [f"<extra_id_{i}>" for i in range(recipe["sentinels"])] + [
        t for t in special_tokens if not (recipe["sentinels"] and t.startswith("<extra_id_"))
    ]
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type {model_type!r} is not supported: use one of {', '.join(MODEL_TYPES)}")
    if n_reserved < 0:
        raise TokenizerError(f"n_reserved must be >= 0, got {n_reserved}")
    user_symbols = list(special_tokens) + [f"<reserved_{i}>" for i in range(n_reserved)]
    if len(set(user_symbols)) != len(user_symbols):
        raise TokenizerError(f"special tokens must be unique, got {user_symbols}: remove the duplicates")
    fixed = 4 + len(user_symbols) + (256 if byte_fallback else 0)
    if vocab_size < fixed + _MIN_LEARNED_PIECES:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: the fixed pieces (4 control, {len(user_symbols)} special, "
            f"{256 if byte_fallback else 0} bytes) need {fixed}; use at least {fixed + _MIN_LEARNED_PIECES}"
        )
    paths = check_inputs(inputs)
    skipped = no_skips()
    sentences, _ = _sentences(paths, text_field, input_sentence_size, skipped)
    if not sentences:
        raise TokenizerError(
            f"tokenizer training inputs {[str(p) for p in paths]} hold no text (skipped records: "
            f"{skipped}): check text_field={text_field!r}"
        )

    out_path = Path(f"{model_prefix}.model")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(_TRAIN_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            split_digits=split_digits,
            user_defined_symbols=user_symbols,
            input_sentence_size=0,  # sampled above, reproducibly and in bounded memory
            shuffle_input_sentence=False,
            character_coverage=character_coverage,
            num_threads=num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            max_sentence_length=16384,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        if "smaller than required_chars" in reason:
            advice = "use a larger vocab_size or a lower character_coverage"
        else:
            advice = "use a smaller vocab_size or more text"
        raise TokenizerError(
            f"sentencepiece could not train a {vocab_size}-piece {model_type} model on {len(sentences)} lines "
            f"({reason}): {advice}"
        ) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_path
