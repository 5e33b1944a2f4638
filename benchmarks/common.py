"""Shared timing and memory helpers for the benchmarks.

Timing: the machines we run on are noisy (a VM that flips between a fast and a slow state), so every
candidate of one configuration is timed *alternately* in the same process, round after round, and we
report the median time of each and the median of the per-round ratios to the GEMM floor. On CUDA each
call is timed with CUDA events after a warm-up call, ``--reps`` calls per candidate and round (the
median is over all of them: rounds x reps >= 20 by default).

Memory: on CPU, peak extra memory is measured in a fresh subprocess per case: the rise of the
process's high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident size after
the inputs were built. On CUDA it is measured in the benchmark's own process (the caching allocator
counts live tensors exactly): torch.cuda.max_memory_allocated over the memory held before the call.

Precisions: ``--dtype`` takes a comma-separated list of float32, tf32 (float32 inputs with
torch.backends.cuda.matmul.allow_tf32 on, for the op, the baselines and the GEMM floor alike), float64,
float16 and bfloat16. ``--deadline`` stops starting new cases after that many seconds, and ``--json``
is rewritten after every case, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

# A checkout's own ccluster (with its compiled extension) when the project is not installed: every
# benchmark imports this module before ccluster.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

import torch
from torch.utils import benchmark as tbench

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "tf32": torch.float32}


def parse_dtypes(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    for d in names:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: unknown precision {d!r}; choose from {sorted(DTYPES)}")
    return names


@contextlib.contextmanager
def precision(name: str):
    """float32 matmuls in TF32 inside (name "tf32"), exact float32 otherwise."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    try:
        yield DTYPES[name]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


class Deadline:
    """Stops a benchmark from starting new cases once `seconds` have passed (None: never)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def backend_settings(name: str):
    """ccluster.kernel_settings for a candidate: "library" or "fused" (CUDA), "auto" otherwise."""
    import ccluster
    return ccluster.kernel_settings(backend=name)


def base_parser(description: str, default_sizes: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated precisions: float32, tf32, float64, float16, bfloat16")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no new case starts (the JSON keeps what was measured)")
    p.add_argument("--sizes", default=default_sizes, help="semicolon-separated comma tuples")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--reps", type=int, default=None,
                   help="CUDA: event-timed calls per candidate and round (default: enough for 20 calls in all)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", default=None, help="write the table here")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: subprocess mode
    return p


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in s.split(",")) for s in text.split(";") if s.strip()]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_cuda(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn, by CUDA events on the current stream."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def time_alternating(cases: dict[str, Callable[[], object]], rounds: int, floor: str,
                     device: str, reps: int | None = None) -> dict[str, dict]:
    """Times every case once per round (CUDA: `reps` event-timed calls after a warm-up call), alternating;
    returns median seconds, median ratio to `floor` (per round: median of the round's calls) and the
    number of timed calls. A case that runs out of memory is reported as ``"OOM"`` instead of a time."""
    cuda = device.startswith("cuda")
    reps = reps or (max(1, -(-20 // rounds)) if cuda else 1)
    times: dict[str, list[float]] = {k: [] for k in cases}
    per_round: dict[str, list[float]] = {k: [] for k in cases}
    failed: dict[str, str] = {}
    for r in range(rounds):
        for name, fn in cases.items():
            if name in failed:
                continue
            try:
                if cuda:
                    if r == 0:
                        fn()  # warm-up: cuBLAS handles, allocator pools, lazy initialisation
                    ts = _time_cuda(fn, reps)
                else:
                    ts = [tbench.Timer(stmt="fn()", globals={"fn": fn}).timeit(1).mean]
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                if "out of memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
                    raise
                failed[name] = "OOM"
                if cuda:
                    torch.cuda.empty_cache()
                sync(device)
                continue
            times[name] += ts
            per_round[name].append(statistics.median(ts))
    out = {}
    for name in cases:
        if name in failed:
            out[name] = {"seconds": "OOM", "ratio": "OOM", "calls": 0}
            continue
        ratios = [t / f for t, f in zip(per_round[name], per_round[floor])] if floor not in failed else []
        out[name] = {"seconds": statistics.median(times[name]),
                     "ratio": statistics.median(ratios) if ratios else None, "calls": len(times[name])}
    return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_in_process(build: Callable[[], Callable[[], object]], device: str,
                       warmup: Callable[[], Callable[[], object]] | None = None) -> int:
    """Peak extra bytes of one call of the function that `build()` returns (inputs excluded).

    `warmup` builds the same case at a tiny size; it runs first so that one-time costs (lazy imports,
    library initialisation on the first backward) are not counted.
    """
    if warmup is not None:
        warmup()()
    fn = build()
    if device.startswith("cuda"):
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    fn()
    return max(0, _rss_kb("VmHWM") - base) * 1024


def measure_cuda(fn: Callable[[], object]) -> int | str:
    """Peak extra CUDA memory of one call of fn, in this process (after a warm-up call)."""
    try:
        fn()
        sync("cuda")
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync("cuda")
        return torch.cuda.max_memory_allocated() - base
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def measure_subprocess(script: str, case: str, argv: list[str]) -> int | str:
    """Runs `script --memory-case case <argv>` in a fresh interpreter; returns bytes or "OOM"/"error"."""
    cmd = [sys.executable, script, "--memory-case", case, *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode != 0:
        text = (res.stderr + res.stdout).strip()
        if "out of memory" in text.lower():
            return "OOM"
        return "error: " + (text.splitlines()[-1] if text else "unknown")
    return int(res.stdout.strip().splitlines()[-1])


def time_and_measure(script: str, fns: dict[str, Callable[[], object]], args, size_text: str,
                     prec: str) -> tuple[dict, dict]:
    """Times the cases ``fns`` alternately (:func:`time_alternating`, ratios to ``"gemm"``), then
    measures each one's peak memory: in this process on CUDA, in a fresh interpreter running
    ``script --memory-case`` on the CPU (a process's peak RSS cannot be reset between cases).
    Empties ``fns`` before the CPU measurement so that its tensors are freed. Returns (times, memory)."""
    cuda = args.device.startswith("cuda")
    times = time_alternating(fns, args.rounds, "gemm", args.device, getattr(args, "reps", None))
    mem = {c: None for c in fns}
    if cuda and not args.no_memory:
        mem = {c: measure_cuda(fn) for c, fn in fns.items()}
    cases = list(fns)
    fns.clear()
    if not cuda and not args.no_memory:
        argv = ["--threads", str(torch.get_num_threads()), "--sizes", size_text, "--dtype", prec,
                "--device", args.device]
        mem = {c: measure_subprocess(script, c, argv) for c in cases}
    return times, mem


def plan_estimates(N: int, C: int, n: int, m: int, prec: str, pairs=None, gemms: int = 2) -> dict:
    """The library path's cost model (ccluster.settings.estimate_plans) for this workload, on this machine
    kind's CPU and on a GPU (CUDA rates: published H100-class figures), with the pair mask on the host
    (the packed plan needs no synchronisation) and, on the GPU, on the device (only the dense plan is
    free of one)."""
    from ccluster import settings
    dtype = "float32" if prec == "tf32" else prec
    out = {}
    for where, kw in (("cpu", dict(device="cpu")), ("cuda_host_pairs", dict(device="cuda")),
                      ("cuda_device_pairs", dict(device="cuda", mask_on_device=pairs is not None))):
        p = pairs if where != "cuda_device_pairs" else None
        est = settings.estimate_plans(N, C, n, m, dtype=dtype, tf32=prec == "tf32", pairs=p, gemms=gemms, **kw)
        out[where] = est
    return out


def fmt_plans(est: dict) -> str:
    cells = []
    for where, e in est.items():
        cells.append(f"{where}: {e['plan']} (dense {e['dense']['seconds'] * 1e3:.2f} ms est, packed "
                     f"{e['packed']['seconds'] * 1e3:.2f} ms est)")
    return "; ".join(cells)


def fmt_seconds(v) -> str:
    return v if isinstance(v, str) else f"{v * 1e3:9.1f}ms"


def fmt_ratio(v) -> str:
    return "   -" if v is None else (v if isinstance(v, str) else f"{v:5.2f}x")


def fmt_bytes(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v / 2**20:8.1f}MB"


def write_json(path: str | None, payload: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                           if ln.startswith("model name")), "unknown")
    return env
