"""Built-in corpora: prepared (tokenizer + shards) on first use into a cache dir.

``ensure_builtin("shakespeare", cache_dir, vocab_size)`` trains a BPE tokenizer (byte
fallback, digit splitting) on the corpus and prepares shards into
``<cache_dir>/builtin/<name>-v<vocab>-<hash>/``, where the hash covers the corpus bytes and
every setting; later calls return that dir at once. Building is atomic (temp dir + rename)
and serialized between processes by ``fcntl.flock`` on a lock file in ``cache_dir``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.layout import MANIFEST
from meshforge.data_pipeline.prepare import prepare_data
from meshforge.file_hash import file_sha256
from meshforge.tokenizers import train_tokenizer

_CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"
BUILTIN_CORPORA = {"shakespeare": _CORPUS_DIR / "shakespeare.jsonl.gz"}
BUILTIN_PREFIX = "builtin:"
_RECIPE_VERSION = 2
BUILTIN_SENTINELS = 32
"""``<extra_id_0..31>``: the built-in tokenizer carries T5 sentinels so encoder-decoders train on it too."""


def _tokenizer_settings(vocab_size: int) -> dict:
    return {
        "recipe": _RECIPE_VERSION,
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "byte_fallback": True,
        "split_digits": True,
        "input_sentence_size": 300_000,
        "character_coverage": 0.9995,
        "num_threads": 2,
        "append_eos": True,
        "special_tokens": [f"<extra_id_{i}>" for i in range(BUILTIN_SENTINELS)],
    }


def resolve_cache_dir(cfg_value: str = "") -> Path:
    """``cfg_value`` if set, else ``$MESHFORGE_CACHE``, else ``~/.cache/meshforge``."""
    if cfg_value:
        return Path(cfg_value).expanduser()
    env = os.environ.get("MESHFORGE_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meshforge"


def builtin_dir(name: str, cache_dir: str | Path, vocab_size: int) -> Path:
    """Where ``ensure_builtin`` puts (or has put) a built-in corpus."""
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown builtin corpus {name!r}: known corpora are {', '.join(sorted(BUILTIN_CORPORA))}")
    corpus = BUILTIN_CORPORA[name]
    key = json.dumps({"corpus": file_sha256(corpus), **_tokenizer_settings(vocab_size)}, sort_keys=True)
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "builtin" / f"{name}-v{vocab_size}-{short}"


def ensure_builtin(name: str, cache_dir: str | Path, vocab_size: int, progress: bool = True) -> Path:
    """Prepared data dir of built-in corpus ``name`` (built on first use)."""
    out = builtin_dir(name, cache_dir, vocab_size)
    if (out / MANIFEST).is_file():
        return out
    settings = _tokenizer_settings(vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(cache_dir) / f".builtin-{name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (out / MANIFEST).is_file():  # another process built it while we waited
                return out
            if out.exists():  # a dir without manifest is debris of a crash; rebuild
                shutil.rmtree(out)
            work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tok-", dir=out.parent))
            try:
                model = train_tokenizer(
                    [BUILTIN_CORPORA[name]],
                    work / "tokenizer",
                    vocab_size=vocab_size,
                    model_type=settings["model_type"],
                    byte_fallback=settings["byte_fallback"],
                    split_digits=settings["split_digits"],
                    input_sentence_size=settings["input_sentence_size"],
                    character_coverage=settings["character_coverage"],
                    num_threads=settings["num_threads"],
                    special_tokens=settings["special_tokens"],
                )
                # one process prepares it (under the lock), whatever launcher variables say about ranks
                prepare_data(
                    [str(BUILTIN_CORPORA[name])],
                    str(model),
                    str(out),
                    workers=1,
                    append_eos=settings["append_eos"],
                    progress=progress,
                    node_rank=0,
                    num_nodes=1,
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def resolve_data_path(path: str, cache_dir: str = "", builtin_vocab_size: int = 2048, progress: bool = True) -> Path:
    """A data dir for ``data.path``: ``builtin:<name>`` is prepared on first use, anything else as is."""
    if path.startswith(BUILTIN_PREFIX):
        return ensure_builtin(path[len(BUILTIN_PREFIX) :], resolve_cache_dir(cache_dir), builtin_vocab_size, progress)
    return Path(path)
