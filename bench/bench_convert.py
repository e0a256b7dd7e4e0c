"""Export time and peak memory of `meshforge convert export --to hf` on the CPU.

A checkpoint of the given preset (random weights, fp32, written as DCP by one process --
the layout does not change what the export reads) is made once in a child process; then
``meshforge convert export`` runs in a fresh child whose peak RSS (``ru_maxrss`` of the
child) and wall time are measured, for each ``--max-shard-mb`` asked. The bound the export
must stay well under is 2 x one shard + the largest tensor; the streaming writer needs
about the largest tensor twice (read + cast) above the interpreter's baseline, which the
same export of a tiny checkpoint measures.

Run: ``python bench/bench_convert.py --record`` (llama-1b shapes: 1.14B params, 4.6 GB of fp32
weights; ~6 GB of RAM to write the checkpoint). ``--preset small`` for a quick check.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, loadavg, record  # noqa: E402

SECTION = "## Checkpoint conversion (export to Hugging Face, CPU)"

MAKE = """
import sys, torch
from meshforge.config import load_config
from meshforge.models import build_model
from meshforge.convert.import_ import write_init_checkpoint
cfg = load_config(sys.argv[1], {"model.qk_norm": False})
torch.manual_seed(0)
model = build_model(cfg.model)
write_init_checkpoint(sys.argv[2], cfg, dict(model.state_dict()), {})
"""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_checkpoint(preset: str, path: Path) -> None:
    subprocess.run([sys.executable, "-c", MAKE, preset, str(path)], check=True, cwd=REPO)


def timed_export(ckpt: Path, out: Path, shard_mb: int, dtype: str) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one export in a fresh child process."""
    code = (
        "import resource, sys, time; from meshforge.convert.export import export_hf; t = time.perf_counter(); "
        "export_hf(sys.argv[1], sys.argv[2], dtype=sys.argv[4], max_shard_mb=int(sys.argv[3]), log=lambda *_: None); "
        "print(time.perf_counter() - t); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(out), str(shard_mb), dtype],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall, rss_kb = res.stdout.split()[-2:]
    return float(wall), int(rss_kb) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--shard-mb", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    load_start = loadavg()
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        root = Path(tmp)
        make_checkpoint("tiny-test", root / "tiny")
        _, base_rss = timed_export(root / "tiny", root / "tiny_hf", 4096, args.dtype)
        start = time.perf_counter()
        make_checkpoint(args.preset, root / "ckpt")
        made_s = time.perf_counter() - start
        from meshforge.convert.dcp_reader import CheckpointReader

        reader = CheckpointReader(root / "ckpt")
        params = sum(
            math.prod(reader.shape(k))
            for k in reader.entries
            if k != "output.weight" or not reader.config.model.tie_embeddings
        )
        largest = max(math.prod(reader.shape(k)) * 4 for k in reader.entries) / 2**30
        disk = _dir_bytes(root / "ckpt") / 2**30
        rows = []
        for mb in args.shard_mb:
            out = root / f"hf_{mb}"
            wall, rss = timed_export(root / "ckpt", out, mb, args.dtype)
            n_shards = len(list(out.glob("*.safetensors")))
            bound = 2 * mb / 1024 + largest
            rows.append(
                f"| {mb} | {n_shards} | {_dir_bytes(out) / 2**30:.2f} | {wall:.1f} | {rss:.2f} | "
                f"{rss - base_rss:.2f} | {bound:.2f} |"
            )
            print(rows[-1], flush=True)
    lines = [
        f"checkpoint: preset {args.preset} ({params / 1e9:.2f}B params, fp32 DCP, one process) {disk:.2f} GiB on disk, "
        f"largest tensor {largest:.3f} GiB (fp32); written in {made_s:.0f} s; export to {args.dtype}",
        f"baseline: the same export of the tiny-test checkpoint peaks at {base_rss:.2f} GiB RSS (interpreter, torch, "
        "transformers); load average at start / end: " + f"{load_start} / {loadavg()}",
        "",
        "| max shard MiB | shards | HF dir GiB | export s | peak RSS GiB | above baseline GiB | 2 x shard + largest GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)


if __name__ == "__main__":
    main()
