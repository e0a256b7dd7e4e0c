"""The ``meshforge`` command: subcommands only; the work lives in the package's rooms."""

from __future__ import annotations

import argparse
import re
import sys

from .config import describe, load_config
from .errors import MeshforgeError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose own errors (a bad value, a missing or unknown argument) are one
    ``meshforge: error:`` line and exit status 2, as every other bad input, instead of its usage block.
    Every subcommand's parser is one (``add_subparsers`` makes them of its parser's class)."""

    def error(self, message: str):
        flag = re.match(r"argument (-[^\s/:]+).*: expected one argument$", message)
        hint = f" (give it one; a value that starts with '-' is written {flag.group(1)}=VALUE)" if flag else ""
        raise UsageError(f"{message}{hint}; see `{self.prog} --help`")


def _where() -> str:
    """``rank R of N`` in a multi-process job (from the launcher's variables), else ``this process``."""
    import os

    for rank_var, size_var in (
        ("RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ):
        rank, size = os.environ.get(rank_var, ""), os.environ.get(size_var, "")
        if rank.strip().isdigit() and size.strip().isdigit() and int(size) > 1:
            return f"rank {int(rank)} of {int(size)}"
    return "this process"


OPTIONAL_PACKAGES = {
    "transformers": "convert",
    "safetensors": "convert",
    "scipy": "scaling",
    "matplotlib": "scaling",
    "threadpoolctl": "scaling",
    "zstandard": "data",
    "pyarrow": "data",
    "datasets": "data",
    "mpi4py": "mpi",
    "torchao": "gpu",
    "liger_kernel": "gpu",
}
"""Import name -> the pyproject extra that installs it (the quick start installs none of them)."""


def _command(args: argparse.Namespace) -> str:
    """The subcommand's words, e.g. ``convert inspect``."""
    return " ".join(
        filter(
            None,
            (
                getattr(args, k, None)
                for k in ("command", "convert_command", "scaling_command", "data_command", "tokenizer_command")
            ),
        )
    )


def _extra_for(error: BaseException) -> str | None:
    if isinstance(error, ModuleNotFoundError) and error.name:
        return OPTIONAL_PACKAGES.get(error.name.split(".")[0])
    return None


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .models import check_config  # torch: imported by the commands that need it, not by `meshforge --help`

    if args.help_config:
        print(describe(check_config(load_config(args.config, rest))))
        return 0
    try:
        cfg = check_config(load_config(args.config, rest))
    except MeshforgeError as e:  # every rank of a job reads the same bad config: print it once
        from .launch.setup import share_early_failure

        share_early_failure(e)
        raise
    from .plan.planner import predict_run_memory
    from .pretrain.trainer import train

    result = train(cfg, memory_plan=predict_run_memory)
    if result.preempted:
        from .pretrain.faults import EXIT_PREEMPTED

        return EXIT_PREEMPTED  # a job script requeues on this status; the rerun resumes
    return 0


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from .pretrain.generate import generate_from_checkpoint

    print(
        generate_from_checkpoint(
            args.checkpoint, args.prompt, args.max_new_tokens, args.top_k, args.temperature, args.seed, args.device
        )
    )
    return 0


def cmd_tokenizer_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .tokenizers import TokenizerError, train_tokenizer

    if args.model_type == "byte-bpe":
        from .tokenizers.bpe_train import train_byte_bpe_files

        if not args.output:
            raise TokenizerError("--model-type byte-bpe writes a Hugging Face tokenizer directory: pass --output DIR")
        path = train_byte_bpe_files(
            args.input,
            args.output,
            args.vocab_size,
            special_tokens=args.special_tokens,
            n_reserved=args.reserved,
            text_field=args.text_field,
        )
        print(f"wrote {path}")
        return 0
    if not args.model_prefix:
        raise TokenizerError("a sentencepiece tokenizer is written to PREFIX.model: pass --model-prefix PREFIX")
    path = train_tokenizer(
        args.input,
        args.model_prefix,
        args.vocab_size,
        model_type=args.model_type,
        byte_fallback=False if args.no_byte_fallback else None,
        split_digits=False if args.no_split_digits else None,
        special_tokens=args.special_tokens,
        n_reserved=args.reserved,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.threads,
        text_field=args.text_field,
        preset=args.preset,
    )
    print(f"wrote {path}")
    return 0


def cmd_data_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    from .data_pipeline.builtin import resolve_cache_dir
    from .data_pipeline.node_rank import default_node_rank
    from .data_pipeline.prepare import prepare_data
    from .data_pipeline.remote import is_url
    from .data_pipeline.remote_upload import prepare_to_url

    env_rank, env_nodes = default_node_rank() if args.node_rank is None or args.num_nodes is None else (0, 1)
    node_rank = env_rank if args.node_rank is None else args.node_rank
    num_nodes = env_nodes if args.num_nodes is None else args.num_nodes
    settings = dict(
        inputs=args.input,
        tokenizer_path=args.tokenizer,
        workers=args.workers,
        text_field=args.text_field,
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
        hf_streaming=args.hf_streaming,
        hf_rows_per_slice=args.hf_rows_per_slice,
        docs_per_shard=args.docs_per_shard,
        overwrite=args.overwrite,
        add_bos=args.bos,
        append_eos=args.eos,
    )
    if is_url(args.output):  # staged under the cache dir, uploaded as shards finish, manifest last
        manifest = prepare_to_url(
            args.output,
            resolve_cache_dir(args.cache_dir),
            prepare_data,
            num_nodes=num_nodes,
            node_rank=node_rank,
            **settings,
        )
    else:
        manifest = prepare_data(
            output_dir=args.output, node_rank=node_rank, num_nodes=num_nodes, merge=not args.no_merge, **settings
        )
    if manifest.get("format") == "meshforge-node-partial-v1" and is_url(args.output):
        print(
            f"node {node_rank} of {num_nodes}: {len(manifest['slices'])} slices, {manifest['num_documents']} documents, "
            f"{manifest['num_tokens']} tokens uploaded to {args.output}; node 0 writes the manifest once every node's "
            "slices are up"
        )
    elif manifest.get("format") == "meshforge-node-partial-v1":
        print(
            f"node {node_rank} of {num_nodes}: {len(manifest['slices'])} slices, {manifest['num_documents']} documents, "
            f"{manifest['num_tokens']} tokens in {args.output}; run `meshforge data merge-manifest {args.output}` "
            f"once every node is done"
        )
    else:
        print(
            f"wrote {len(manifest['shards'])} shards, {manifest['num_documents']} documents, "
            f"{manifest['num_tokens']} tokens to {args.output} (skipped records: {manifest['skipped_records']})"
        )
    return 0


def cmd_data_merge(args: argparse.Namespace, rest: list[str]) -> int:
    from .data_pipeline.manifest import merge_manifest

    manifest = merge_manifest(args.dir, verify=args.verify)
    print(
        f"wrote {args.dir}/manifest.json: {len(manifest['shards'])} shards, {manifest['num_documents']} documents, "
        f"{manifest['num_tokens']} tokens"
    )
    return 0


def cmd_convert_export(args: argparse.Namespace, rest: list[str]) -> int:
    from .convert.export import export_hf

    export_hf(args.checkpoint, args.output, step=args.step, dtype=args.dtype, max_shard_mb=args.max_shard_mb)
    return 0


def cmd_convert_import(args: argparse.Namespace, rest: list[str]) -> int:
    from .convert.import_ import import_hf

    import_hf(args.hf_dir, args.output)
    return 0


def cmd_convert_inspect(args: argparse.Namespace, rest: list[str]) -> int:
    from .convert.inspect import inspect_path

    print(inspect_path(args.path))
    return 0


def cmd_convert_grow(args: argparse.Namespace, rest: list[str]) -> int:
    from .convert.grow import grow_checkpoint

    grow_checkpoint(args.checkpoint, args.output, args.depth_factor, step=args.step)
    return 0


def cmd_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from .plan.cli import run_plan

    return run_plan(args, rest)


def cmd_launch(args: argparse.Namespace, rest: list[str]) -> int:
    from .launch.launcher import run_launch

    return run_launch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshforge", description="Pretrain transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model; extra --section.key value pairs override the config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="meshforge train [-h] [--config PRESET] [--help-config] [--section.key VALUE ...]",
        description="Train a model: the built-in small preset, or --config.\n\n"
        "Any config key can be set on the command line as --section.key value (or\n"
        "--section.key=value), applied after the preset, e.g.\n"
        "  --train.steps 1000 --optim.lr 3e-4 --parallel.tp 2\n"
        "--help-config lists every key, its value and what it means.",
        epilog="example:\n  meshforge train --config small --train.steps 1000 --optim.schedule wsd "
        "--train.output_dir runs/exp1",
    )
    p.add_argument("--config", default=None, help="TOML preset: a path or a name in configs/ (default: built-in small)")
    p.add_argument("--help-config", action="store_true", help="print every config key with its value and meaning")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or an output dir (its newest checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a sentencepiece model or a byte-level BPE tokenizer.json")
    p.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl or .jsonl.gz files")
    p.add_argument(
        "--model-prefix",
        default=None,
        help="sentencepiece: writes PREFIX.model (atomically; the vocabulary is inside it)",
    )
    p.add_argument("--output", default=None, help="byte-bpe: the directory for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument(
        "--preset",
        choices=("llama", "t5"),
        default=None,
        help="llama: BPE, byte fallback, digits split; t5: unigram + 100 <extra_id_i> sentinels",
    )
    p.add_argument(
        "--model-type",
        choices=("bpe", "unigram", "byte-bpe"),
        default=None,
        help="default: the preset's (bpe); byte-bpe: a Hugging Face byte-level BPE (GPT-2 / Llama 3 style, no unknown token)",
    )
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--no-split-digits", action="store_true")
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra user-defined symbols")
    p.add_argument("--reserved", type=int, default=0, help="number of <reserved_i> tokens to add")
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="train on a seeded, shuffled sample of this many lines (0: all); bounds memory on large corpora",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize text into Megatron-format indexed shards")
    p.add_argument(
        "--input",
        nargs="*",
        default=[],
        help="files or globs: .txt (one document per file), .jsonl, .jsonl.gz, .jsonl.zst, .parquet",
    )
    p.add_argument(
        "--hf-dataset",
        default=None,
        help="a local Hugging Face dataset (save_to_disk dir, or data files with --hf-streaming)",
    )
    p.add_argument("--hf-split", default="train")
    p.add_argument(
        "--hf-streaming", action="store_true", help="read --hf-dataset with load_dataset(dir, streaming=True)"
    )
    p.add_argument(
        "--hf-rows-per-slice", type=int, default=0, help="cut a saved HF dataset into slices of this many rows"
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="a sentencepiece .model, a Hugging Face tokenizer.json, a tiktoken BPE file, or an HF directory "
        "holding one",
    )
    p.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start every document with BOS (default: the tokenizer's convention)",
    )
    p.add_argument(
        "--eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end every document with EOS (default: when the tokenizer has one)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="output data dir (must not hold a manifest yet), or a URL "
        "(s3://bucket/prefix, ...): staged under --cache-dir, shards uploaded as they finish, manifest last",
    )
    p.add_argument(
        "--cache-dir",
        default="",
        help="staging dir root for a URL --output (default: $MESHFORGE_CACHE or ~/.cache/meshforge)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--text-field", default="text")
    p.add_argument("--docs-per-shard", type=int, default=0, help="0: one shard per input slice")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dir")
    p.add_argument("--node-rank", type=int, default=None, help="this node (default: $RANK, or MPI rank, or 0)")
    p.add_argument(
        "--num-nodes", type=int, default=None, help="nodes sharing the work (default: $WORLD_SIZE, MPI size, or 1)"
    )
    p.add_argument("--no-merge", action="store_true", help="never write manifest.json here; use merge-manifest")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("merge-manifest", help="write manifest.json once every node of a prepare is done")
    p.add_argument("dir", help="the output dir of `meshforge data prepare`")
    p.add_argument("--verify", action="store_true", help="re-hash every shard against its recorded sha256")
    p.set_defaults(func=cmd_data_merge)

    conv = sub.add_parser("convert", help="checkpoint conversion: Hugging Face export/import, inspect, grow")
    conv = conv.add_subparsers(dest="convert_command", required=True)
    p = conv.add_parser("export", help="a checkpoint (any layout) -> a Hugging Face model directory")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or an output dir (its newest, or --step)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step under the output dir")
    p.add_argument("--to", choices=("hf",), default="hf")
    p.add_argument("--output", required=True, help="new (or empty) directory to write")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-shard-mb", type=int, default=4096, help="largest safetensors shard, in MiB")
    p.set_defaults(func=cmd_convert_export)
    p = conv.add_parser("import", help="a Hugging Face model directory -> a meshforge init checkpoint + preset")
    p.add_argument("--from", dest="source", choices=("hf",), default="hf")
    p.add_argument("hf_dir", help="the Hugging Face model directory (config.json + safetensors)")
    p.add_argument(
        "--output", required=True, help="new (or empty) directory; train from it with --checkpoint.init_from"
    )
    p.set_defaults(func=cmd_convert_import)
    p = conv.add_parser("inspect", help="architecture, parameters, dtype, step, layout of a checkpoint or HF dir")
    p.add_argument("path")
    p.set_defaults(func=cmd_convert_inspect)
    p = conv.add_parser("grow", help="a deeper model from a trained one by stacking its layers (G_stack)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--depth-factor", type=int, required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_convert_grow)

    from .plan.cli import add_plan_arguments

    p = sub.add_parser(
        "plan",
        help="rank parallel layouts for a cluster by predicted step time and memory; "
        "extra --section.key value pairs override the config",
    )
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    from .launch.launcher import add_launch_arguments

    p = sub.add_parser(
        "launch",
        help="start a job with torchrun, SLURM (--slurm) or mpiexec (--mpi): "
        "meshforge launch --nodes N --gpus-per-node G [--slurm|--mpi] -- train ...",
    )
    add_launch_arguments(p)
    p.set_defaults(func=cmd_launch)

    from .scaling.commands import add_scaling_parser

    add_scaling_parser(sub)  # meshforge scaling plan|run|fit|plot
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.func not in (cmd_train, cmd_plan):
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}; see `meshforge {_command(args)} --help`")
    except UsageError as e:
        print(f"meshforge: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    try:
        return args.func(args, rest)
    except MeshforgeError as e:  # bad input or a failed job: one line, no traceback
        if not getattr(e, "reported_elsewhere", False):  # in a multi-rank job, rank 0 may speak for all
            print(f"meshforge: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    except Exception as e:
        extra = _extra_for(e)
        if extra:  # an optional package this command needs: say which extra brings it
            print(
                f"meshforge: error: `meshforge {_command(args)}` needs {e.name}, which is not installed: "
                f'pip install -e ".[{extra}]" (in the meshforge checkout)',
                file=sys.stderr,
                flush=True,
            )
            return 2
        # a bug: keep the traceback, but say where it happened
        print(
            f"meshforge: internal error on {_where()} (a bug in meshforge; its traceback follows)",
            file=sys.stderr,
            flush=True,
        )
        raise


if __name__ == "__main__":
    sys.exit(main())
