"""Tokenization throughput: `data prepare` end to end against the bare library call, per backend.

    python bench/bench_tokenize.py [--copies 4] [--workers 1 2] [--record]

Input: the built-in corpus (Shakespeare, 1209 docs) written as --copies .jsonl files
(slices). Backends, both with a 2048-token vocabulary trained on that corpus:

- sentencepiece: the built-in BPE (``ensure_builtin``); bare call ``SentencePieceProcessor.encode``
  of all documents with ``num_threads`` = n;
- tokenizers: a byte-level BPE ``tokenizer.json`` (``meshforge tokenizer train --model-type
  byte-bpe``); bare call ``Tokenizer.encode_batch_fast`` of all documents (one thread:
  ``TOKENIZERS_PARALLELISM=false``; n threads: ``RAYON_NUM_THREADS=n``).

For each worker count n: the bare call on n threads (documents already in memory) and
``prepare_data(workers=n)`` (reading the jsonl, tokenizing, appending EOS, writing and
hashing the shards), tokens/s each, per core, and prepare / bare. Best of --repeats, the two
run alternately; outputs
are checked byte-identical across worker counts. tiktoken's GPT-2 encoding is measured on the
same text when tiktoken can load it without the network (its wheel does not ship the
encoding files: they are downloaded on first use, which this project never does).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(repeats: int, *fns) -> list[float]:
    """Best time of each function over ``repeats`` rounds, run alternately (load drifts hit all alike)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bare_call(kind: str, path: Path, docs: list[str], threads: int):
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        return lambda: sp.encode(docs, out_type=int, num_threads=threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda: tok.encode_batch_fast(docs, add_special_tokens=False)


def tiktoken_rate(docs: list[str], repeats: int) -> str:
    try:
        import tiktoken
    except ImportError:
        return "not installed"
    try:
        enc = tiktoken.get_encoding("gpt2")  # reads TIKTOKEN_CACHE_DIR; would download otherwise
    except Exception as exc:  # no network here: report and skip
        return f"GPT-2 encoding not available offline ({type(exc).__name__})"
    n = sum(len(x) for x in enc.encode_ordinary_batch(docs, num_threads=1))
    return (
        f"{n / best_of(repeats, lambda: enc.encode_ordinary_batch(docs, num_threads=1)) / 1e6:.2f}M tokens/s (1 thread)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import numpy as np

    from meshforge.data_pipeline import ensure_builtin, prepare_data
    from meshforge.data_pipeline.builtin import BUILTIN_CORPORA
    from meshforge.tokenizers.bpe_train import train_byte_bpe

    raw = gzip.decompress(BUILTIN_CORPORA["shakespeare"].read_bytes())
    docs = [json.loads(line)["text"] for line in raw.decode().splitlines() if line.strip()] * args.copies
    mb = len(raw) * args.copies / 1e6
    rows = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k in range(args.copies):
            (root / f"in_{k:03d}.jsonl").write_bytes(raw)
        tokenizers = {
            "sentencepiece": ensure_builtin("shakespeare", root / "cache", 2048, progress=False) / "tokenizer.model",
            "tokenizers": train_byte_bpe(docs[: len(docs) // args.copies], root / "bpe", 2048),
        }
        for kind, path in tokenizers.items():
            outputs = {}
            for w in args.workers:
                os.environ["TOKENIZERS_PARALLELISM"] = "true" if w > 1 else "false"
                os.environ["RAYON_NUM_THREADS"] = str(w)
                bare = bare_call(kind, path, docs, w)
                outs = []

                def prepare():
                    out = root / f"out_{kind}_{w}_{len(outs)}"
                    outs.append(
                        (out, prepare_data([str(root / "in_*.jsonl")], str(path), str(out), workers=w, progress=False))
                    )

                bare_s, prep_s = interleaved(args.repeats, bare, prepare)  # the same load for both
                out, m = outs[-1]
                outputs[w] = {p.name: p.read_bytes() for p in out.glob("shard_*")}
                for o, _ in outs:
                    shutil.rmtree(o)
                tokens = m["num_tokens"] - m["num_documents"]  # without the appended EOS
                rows.append((kind, w, m["num_documents"], tokens, bare_s, prep_s))
            assert all(o == outputs[args.workers[0]] for o in outputs.values()), (
                f"{kind}: outputs differ between workers"
            )
        os.environ.pop("RAYON_NUM_THREADS", None)
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        tk = tiktoken_rate(docs, args.repeats)
    import sentencepiece
    import tokenizers as hf_tokenizers
    import torch

    lines = [
        f"### {time.strftime('%Y-%m-%d')} — `python bench/bench_tokenize.py --copies {args.copies} --record`",
        "",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, sentencepiece {sentencepiece.__version__}, "
        f"tokenizers {hf_tokenizers.__version__}; load average before the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        "",
        f"input: {args.copies} x built-in corpus as .jsonl ({mb:.1f} MB of text, {args.copies} slices); tokenizers: "
        f"sentencepiece BPE 2048 (built-in), byte-level BPE 2048 (tokenizers); best of {args.repeats}; outputs "
        "byte-identical across worker counts. bare = the library's own batch call on n threads, documents in memory; "
        "prepare = `prepare_data(workers=n)` from the files to hashed shards.",
        "",
        "| backend | n | docs | tokens | bare tokens/s | bare per core | prepare tokens/s | prepare per core | prepare / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {k} | {w} | {d} | {t} | {t / b / 1e6:.2f}M | {t / b / w / 1e6:.2f}M | {t / p / 1e6:.2f}M | "
        f"{t / p / w / 1e6:.2f}M | {b / p:.2f}x |"
        for k, w, d, t, b, p in rows
    ]
    lines += ["", f"tiktoken (GPT-2 encoding, same text): {tk}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write("\n## Tokenization (data prepare), both backends\n\n" + text)


if __name__ == "__main__":
    main()
