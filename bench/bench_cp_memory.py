"""Per-rank activation memory of one attention layer under context parallelism (CPU, gloo).

For each sequence length and cp degree, ``cp`` fresh processes each run one forward + backward
of one decoder ``Attention`` layer (projections, RoPE, QK-norm, GQA, the attention core) on
their zigzag share of a batch-1 sequence: cp = 1 is the plain layer (PyTorch's fused CPU SDPA),
cp > 1 the ring (or ``--method alltoall``) core. Per rank it reports

- saved activations: the bytes autograd keeps for backward (distinct storages other than the
  weights and the layer's input, counted with ``saved_tensors_hooks``): exact, independent of the machine's load;
- peak RSS increase: the process's peak resident memory during forward + backward (VmHWM,
  reset just before) minus its resident memory just before, with glibc's mmap threshold fixed
  at 128 KiB so that freed tensors leave the resident set (what the allocator actually touched, transients included);
- the wall time of forward + backward (the machine may be shared: times are indicative only).

Both memory figures should fall ~1/cp. Prints a table; ``--record`` appends it to
bench/RESULTS.md under ``## Context parallel memory``.
Run: ``python bench/bench_cp_memory.py --record``
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import loadavg, record  # noqa: E402

from meshforge.models.layers import Attention, rope_tables  # noqa: E402
from meshforge.parallel.context_parallel import ContextParallelCore  # noqa: E402
from meshforge.parallel.ring_attention import zigzag_positions, zigzag_split  # noqa: E402

SECTION = "## Context parallel memory"


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Linux: start VmHWM (the peak resident set) afresh from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(rank: int, cp: int, port: int, seqlen: int, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if cp > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
    layer = Attention(args.dim, args.heads, args.kv_heads, qk_norm=True, norm_eps=1e-5)
    layer.q_norm.reset_parameters()
    layer.k_norm.reset_parameters()
    if cp > 1:
        layer.core = ContextParallelCore(dist.group.WORLD, args.method)
    cos, sin = rope_tables(args.dim // args.heads, seqlen, 10000.0)
    x = torch.randn(1, seqlen, args.dim)
    if cp > 1:
        pos = zigzag_positions(seqlen, rank, cp)
        x, cos, sin = zigzag_split(x, rank, cp), cos[pos], sin[pos]
    x = x.clone().requires_grad_()
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # activations only: not the weights, not the layer's input
            storages[s.data_ptr()] = s.nbytes()
        return t

    if cp > 1:
        dist.barrier()
    _reset_peak_rss()
    before = _rss_bytes()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, cos, sin)
    out.square().mean().backward()
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    saved = sum(storages.values())
    Path(out_dir, f"{rank}.txt").write_text(f"{saved} {max(0, peak - before)} {seconds}")
    if cp > 1:
        dist.destroy_process_group()


def measure(seqlen: int, cp: int, args) -> tuple[float, float, float]:
    """(max over ranks of saved MiB, of peak RSS increase MiB, of seconds)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(cp, port, seqlen, args, d), nprocs=cp, join=True, start_method="spawn")
        rows = [tuple(float(v) for v in Path(d, f"{r}.txt").read_text().split()) for r in range(cp)]
    return max(r[0] for r in rows) / 2**20, max(r[1] for r in rows) / 2**20, max(r[2] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--method", choices=["ring", "alltoall"], default="ring")
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    # glibc: allocate every block over 128 KiB with mmap and unmap it on free, so the workers'
    # resident memory follows live tensors (otherwise freed heap memory stays resident and the
    # peak depends on the allocator's history more than on the layer)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    load_start = loadavg()
    lines = [
        f"one Attention layer: dim {args.dim}, {args.heads} heads, {args.kv_heads} KV heads, QK-norm, fp32, "
        f"batch 1; cp > 1: `{args.method}` core; 1 torch thread per rank; per-rank maxima over the ranks; "
        f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}",
        "",
        "| seq | cp | saved activations MiB | vs cp 1 | peak RSS increase MiB | vs cp 1 | fwd+bwd s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seqlen in args.seq:
        base = None
        for cp in args.cp:
            saved, peak, seconds = measure(seqlen, cp, args)
            base = base or (saved, peak)
            lines.append(
                f"| {seqlen} | {cp} | {saved:.1f} | {saved / base[0]:.2f} | {peak:.1f} | "
                f"{peak / base[1]:.2f} | {seconds:.2f} |"
            )
            print(lines[-1], flush=True)
    lines.append("")
    lines.append(
        f"load average at start / end: {load_start} / {loadavg()} (times indicative only; memory is not "
        "affected by load)"
    )
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)


if __name__ == "__main__":
    main()
