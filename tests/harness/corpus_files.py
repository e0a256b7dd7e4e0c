"""Small real text files for tests, cut from the built-in corpus (imported by bare name: tests/harness is on
sys.path; a test imports these from here, not from ``conftest``, whose bare name is ambiguous once a room has
its own conftest.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from meshforge.data_pipeline.builtin import BUILTIN_CORPORA


def builtin_docs(n: int, max_chars: int = 1500, skip: int = 0) -> list[str]:
    """The first ``n`` documents of the built-in corpus (after ``skip``), cut to ``max_chars``."""
    out = []
    with gzip.open(BUILTIN_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            out.append(json.loads(line)["text"][:max_chars])
    return out


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


def _corpus_slice(path: Path, start: int, n_docs: int) -> Path:
    with gzip.open(BUILTIN_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        lines = f.readlines()[start : start + n_docs]
    path.write_text("".join(lines))
    return path
