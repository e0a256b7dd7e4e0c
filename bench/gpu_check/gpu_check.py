"""The prepared GPU check's driver: run the cases of ``gpu_check_lib.CASES``, each under its own
time cap, within one total budget, and write every figure to ``OUT``.

The driver never computes on the device itself. It prepares the built-in corpus once, then
runs the cases in worker processes (``--worker``): on a GPU the correctness cases share one
worker and every speed case gets a fresh one (its own CUDA memory, compile caches and
out-of-memory fallout); with ``--dry`` one worker runs them all (one import of torch). A worker
marks each case's start in the scratch dir and writes its result there; the driver kills the
worker's whole process group when a case passes its cap (or the budget ends), records
``timeout`` and starts a new worker for the cases after it, so one hang costs its cap only. A
worker that dies (a crash, a CUDA fault) costs the case it was in. Cases whose config option
(``train.float8``, ``train.fused_kernels``) this build lacks, or whose Python package is not
installed, are ``skipped`` with the reason before any process starts.

Outputs, rewritten after every case (so a killed run keeps what it measured):
``OUT/gpu_check.json``, ``OUT/gpu_check.md`` (a section for bench/RESULTS.md),
``OUT/gpu_check.log`` (the workers' output). ``--record-from OUT/gpu_check.json`` appends the
section to bench/RESULTS.md on any machine.

Run: ``bash bench/gpu_check/gpu_check.sh [--dry] [--out DIR] [--only a,b] [--budget 450]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # its cases; bench/
from gpu_check_lib import BY_NAME, CASES, DEFAULT, Ctx, Skip  # noqa: E402

BUDGET_S = 450.0
DRY_BUDGET_S = 240.0
MIN_START_S = 20.0
"""A case does not start with less than this left of the budget."""
POLL_S = 0.2


# --------------------------------------------------------------------------- pre-checks


def option_available(dotted: str) -> bool:
    """Whether this build's config has the key ``section.name``."""
    import typing

    from meshforge.config.sections import section_types

    sec, _, name = dotted.partition(".")
    types_ = section_types()
    return sec in types_ and name in typing.get_type_hints(types_[sec])


def pre_skip(name: str) -> str | None:
    """Why ``name`` cannot run in this build (before any process starts), or None."""
    case = BY_NAME[name]
    if case.option and not option_available(case.option[0]):
        return f"option not available in this build (no config key {case.option[0]})"
    missing = [m for m in case.needs if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"needs the Python package(s) {', '.join(missing)}, not installed here "
            "(carry the wheels: README.md, 'GPU check')"
        )
    return None


# --------------------------------------------------------------------------- the worker


def _result(name: str, status: str, wall: float, **more) -> dict:
    case = BY_NAME[name]
    return {"name": name, "kind": case.kind, "what": case.what, "status": status, "wall_s": round(wall, 2), **more}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _dry_compile_backend(backend: str) -> None:
    """--dry: torch.compile (per block, or the model scope's loss) goes through TorchDynamo (graph
    capture, guards) but not Inductor, whose C++ builds would take minutes on a small CPU machine."""
    import torch

    original = torch.nn.Module.compile
    original_fn = torch.compile

    def compile_with(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(self, *args, **kwargs)

    def compile_fn_with(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original_fn(*args, **kwargs)

    torch.nn.Module.compile = compile_with
    torch.compile = compile_fn_with


def run_worker(names: list[str], scratch: Path, cache: str, dry: bool, deadline: float) -> int:
    import gc

    if dry and any(BY_NAME[n].kind != "selftest" for n in names):
        import torch

        _dry_compile_backend("eager")
        torch.set_num_threads(1)  # a small shared CPU: two threads per op can cost 20x under load
    ctx = Ctx(dry=dry, scratch=scratch, cache=cache)
    for name in names:
        case = BY_NAME[name]
        left = deadline - time.time()
        if left < (MIN_START_S if not dry else 2.0):
            _write_json(
                scratch / f"{name}.json",
                _result(name, "skipped", 0.0, reason=f"the time budget was spent ({left:.0f} s left)"),
            )
            continue
        _write_json(scratch / f"{name}.start", time.time())  # atomically: the driver polls it
        print(f"=== {name}: {case.what}", flush=True)
        t0 = time.perf_counter()
        module, fn = case.func.split(":")
        try:
            out = getattr(importlib.import_module(module), fn)(ctx)
            checks = out.get("checks", [])
            status = "ok" if all(c["pass"] for c in checks) else "failed"
            res = _result(
                name,
                status,
                time.perf_counter() - t0,
                figures=out.get("figures", {}),
                checks=checks,
                **({"note": out["note"]} if out.get("note") else {}),
            )
        except Skip as e:
            res = _result(name, "skipped", time.perf_counter() - t0, reason=str(e))
        except Exception as e:  # noqa: BLE001 - the report carries it; the next case still runs
            traceback.print_exc()
            res = _result(name, "error", time.perf_counter() - t0, reason=f"{type(e).__name__}: {str(e)[:400]}")
        _write_json(scratch / f"{name}.json", res)
        print(f"=== {name}: {res['status']} in {res['wall_s']:.1f} s", flush=True)
        gc.collect()
        torch = sys.modules.get("torch")  # imported by the cases, not by the selftests
        if torch is not None:
            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 0


# --------------------------------------------------------------------------- the driver


def _started(scratch: Path, name: str) -> float | None:
    """When the worker started case ``name`` (its marker), or None."""
    try:
        return float(json.loads((scratch / f"{name}.start").read_text()))
    except (OSError, ValueError):
        return None


def worker_groups(names: list[str], dry: bool) -> list[list[str]]:
    """The cases each worker process runs: --dry, all in one; on a GPU, the correctness cases in
    one, every other case in its own (fresh CUDA memory and compile state for each measurement)."""
    if dry:
        return [names]
    first = [n for n in names if BY_NAME[n].kind == "correctness"]
    return ([first] if first else []) + [[n] for n in names if n not in first]


class Driver:
    def __init__(self, args, out: Path, scratch: Path, cache: str):
        self.args, self.out, self.scratch, self.cache = args, out, scratch, cache
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.results: dict[str, dict] = {}
        self.log = scratch / "workers.log"
        from gpu_check_report import machine_info

        self.machine = machine_info()

    def cap(self, name: str) -> float:
        c = BY_NAME[name]
        return c.dry_cap_s if self.args.dry else c.cap_s

    def done(self, res: dict) -> None:
        self.results[res["name"]] = res
        _write_json(self.scratch / f"{res['name']}.json", res)
        figs = res.get("figures", {})
        key = next((f"{k}={figs[k]:.4g}" for k in ("tokens_per_s", "ratio", "max_rel_err") if k in figs), "")
        print(
            f"{res['name']:>18}  {res['status']:<8} {res['wall_s']:7.1f} s  {key}  {res.get('reason', '')}", flush=True
        )
        self.write()

    def write(self) -> None:
        from gpu_check_report import markdown

        report = {
            "command": self.args.command,
            "dry": self.args.dry,
            "budget_s": self.args.budget,
            "wall_s": round(time.time() - self.t0, 1),
            "machine": self.machine,
            "cases": [self.results[n] for n in self.args.only if n in self.results],
        }
        _write_json(self.out / "gpu_check.json", report)
        (self.out / "gpu_check.md").write_text("\n".join(markdown(report)) + "\n")
        if self.log.exists():
            data = self.log.read_bytes()
            (self.out / "gpu_check.log").write_bytes(data[-8 * 2**20 :])

    def run_group(self, names: list[str]) -> None:
        remaining = list(names)
        while remaining:
            if self.deadline - time.time() < (MIN_START_S if not self.args.dry else 2.0):
                for n in remaining:
                    self.done(_result(n, "skipped", 0.0, reason=f"the {self.args.budget:.0f} s budget was spent"))
                return
            remaining = self._one_worker(remaining)

    def _one_worker(self, names: list[str]) -> list[str]:
        """Run ``names`` in one worker until they finish or one times out/crashes; return those not run."""
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--cases",
            ",".join(names),
            "--scratch",
            str(self.scratch),
            "--cache",
            self.cache,
            "--deadline",
            str(self.deadline),
            *(["--dry"] if self.args.dry else []),
        ]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        seen = set()
        while True:
            exited = proc.poll() is not None
            for n in names:  # results written so far
                if n not in seen and (self.scratch / f"{n}.json").is_file():
                    seen.add(n)
                    self.done(json.loads((self.scratch / f"{n}.json").read_text()))
            current = next((n for n in names if n not in seen), None)
            if current is None:
                proc.wait()
                return []
            began = _started(self.scratch, current)
            now = time.time()
            over_cap = began is not None and now - began > self.cap(current)
            if exited or over_cap or now > self.deadline:
                if not exited:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:  # it exited just now
                        pass
                    proc.wait()
                if (self.scratch / f"{current}.json").is_file():  # it finished just now
                    self.done(json.loads((self.scratch / f"{current}.json").read_text()))
                    return names[names.index(current) + 1 :]
                wall = now - began if began is not None else 0.0
                if exited:
                    tail = self._log_tail()
                    res = _result(
                        current,
                        "error",
                        wall,
                        reason=f"the worker exited (status {proc.returncode}) during this case: {tail}",
                    )
                elif over_cap:
                    res = _result(current, "timeout", wall, reason=f"killed at its {self.cap(current):.0f} s cap")
                else:
                    res = _result(current, "timeout", wall, reason=f"killed: the {self.args.budget:.0f} s budget ended")
                self.done(res)
                return names[names.index(current) + 1 :]
            time.sleep(POLL_S)

    def _log_tail(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "(no output)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, every case (under a minute)")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all): " + ", ".join(DEFAULT))
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for all cases (default {BUDGET_S:.0f}; --dry {DRY_BUDGET_S:.0f})",
    )
    ap.add_argument(
        "--record-from",
        type=Path,
        default=None,
        help="append the section of this gpu_check.json to bench/RESULTS.md and exit",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default="", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry:  # Triton kernels on the CPU run in its interpreter, chosen when triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.worker:
        return run_worker(args.cases.split(","), args.scratch, args.cache, args.dry, args.deadline)
    if args.record_from:
        from gpu_check_report import record_from

        print(f"appended to {record_from(args.record_from)}")
        return 0
    names = [n for n in args.only.split(",") if n] or DEFAULT
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(c.name for c in CASES)}")
    args.only = names
    args.budget = args.budget or (DRY_BUDGET_S if args.dry else BUDGET_S)
    args.command = "bash bench/gpu_check/gpu_check.sh " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry for the CPU plumbing check", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        from meshforge.data_pipeline.builtin import ensure_builtin, resolve_cache_dir

        cache = str(resolve_cache_dir(""))  # $MESHFORGE_CACHE or ~/.cache/meshforge: reused by a rerun
        ensure_builtin("shakespeare", cache, 2048, progress=False)  # once, before any case
        os.environ["MESHFORGE_CACHE"] = cache
        driver = Driver(args, out, scratch, cache)
        runnable = []
        for n in names:
            why = pre_skip(n)
            if why:
                driver.done(_result(n, "skipped", 0.0, reason=why))
            else:
                runnable.append(n)
        for group in worker_groups(runnable, args.dry):
            driver.run_group(group)
        driver.write()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bad = [r["name"] for r in driver.results.values() if r["status"] in ("failed", "error", "timeout")]
    print(
        f"gpu_check: {len(driver.results)} cases in {time.time() - driver.t0:.0f} s; "
        f"{'not ok: ' + ', '.join(bad) if bad else 'no failures'}; results in {out}/gpu_check.json and .md"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
