"""Benchmark: exemplar_logsumexp vs the pure-PyTorch reference vs the GEMM floor.

For each (N, C, n, m) and precision: the op's forward and forward+backward (w.r.t. x), the reference
(the best pure-PyTorch formulation: one addmm with log q - alpha |y|^2 folded in, then logsumexp)
forward and forward+backward, and one torch.mm of the same N x (C*n) x m product in the same precision
(the floor any formulation pays; cuBLAS on CUDA). On CPU the op is the fused CPU kernel; on CUDA both
implementations are timed: "library" (cuBLAS GEMMs + epilogue kernels, the default) and "fused" (the
hand-written kernels). Times are medians over alternating rounds, ratios are to the GEMM measured in the
same rounds. Peak extra memory: a fresh subprocess per case on CPU, torch.cuda.max_memory_allocated on
CUDA. Errors are against the float64 oracle on the same (rounded) inputs, next to plain PyTorch's error
in the same precision (the tests' rule: at most about 2x).

    python benchmarks/bench_exemplar_logsumexp.py [--device cpu|cuda] [--dtype float32,tf32,bfloat16] \\
        [--sizes "2048,20,256,512;4096,20,512,2048;8192,20,1024,1024"] [--deadline 60] [--json out.json]
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ccluster  # noqa: E402
from ccluster import reference  # noqa: E402

DEFAULT_SIZES = "2048,20,256,512;4096,20,512,2048;8192,20,1024,1024"
CPU_CASES = ("gemm", "fused_fwd", "fused_fwd_bwd", "ref_fwd", "ref_fwd_bwd")
CUDA_CASES = ("gemm", "library_fwd", "library_fwd_bwd", "fused_fwd", "fused_fwd_bwd", "ref_fwd", "ref_fwd_bwd")
ERROR_ROWS = 2048  # rows of the float64 error check


def make_inputs(N, C, n, m, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, m, generator=g).to(device=device, dtype=dtype)
    db = torch.randn(C, n, m, generator=g).to(device=device, dtype=dtype)
    log_q = torch.full((C, n), -float(torch.tensor(n).log()), dtype=dtype, device=device)
    alpha = 1.0 / m  # alpha * d is O(1) for unit-variance features
    return x, db, log_q, alpha


def build_case(case, N, C, n, m, dtype, device):
    x, db, log_q, alpha = make_inputs(N, C, n, m, dtype, device)
    y = db.reshape(C * n, m)
    if case == "gemm":
        return lambda: torch.mm(x, y.t())
    backend = case.split("_")[0]
    fn = reference.exemplar_logsumexp if backend == "ref" else ccluster.exemplar_logsumexp
    settings = (lambda: common.backend_settings(backend)) if backend in ("library", "fused") and \
        device.startswith("cuda") else contextlib.nullcontext
    if not case.endswith("bwd"):
        def run():
            with torch.no_grad(), settings():
                return fn(x, db, log_q, alpha)
        return run
    xg = x.clone().requires_grad_()

    def run_bwd():
        with settings():
            out = fn(xg, db, log_q, alpha)
            out.backward(torch.ones_like(out))
        xg.grad = None
    return run_bwd


def errors(N, C, n, m, dtype, device, backends):
    """Max |error| of each implementation and of plain PyTorch in dtype, against float64 (first rows)."""
    x, db, log_q, alpha = make_inputs(N, C, n, m, dtype, device)
    x = x[:ERROR_ROWS]
    with torch.no_grad():
        oracle = reference.exemplar_logsumexp(x.double(), db.double(), log_q.double(), alpha)
        out = {"plain": float((reference.exemplar_logsumexp(x, db, log_q, alpha).double() - oracle).abs().max())}
        for b in backends:
            with (common.backend_settings(b) if device.startswith("cuda") else contextlib.nullcontext()):
                out[b] = float((ccluster.exemplar_logsumexp(x, db, log_q, alpha).double() - oracle).abs().max())
    return out


def main():
    p = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    p.add_argument("--cases", default=None, help="comma-separated subset of the candidates (gemm is always timed)")
    args = p.parse_args()
    common.apply_threads(args)
    cuda = args.device.startswith("cuda")
    if args.memory_case:
        dtype = common.DTYPES[args.dtype]
        N, C, n, m = common.parse_sizes(args.sizes)[0]
        print(common.measure_in_process(lambda: build_case(args.memory_case, N, C, n, m, dtype, args.device),
                                        args.device,
                                        lambda: build_case(args.memory_case, 8, C, 4, 4, dtype, args.device)))
        return
    if not ccluster.has_compiled_ops():
        sys.exit("compiled ops are not loaded: this benchmark would time the reference against itself")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    cases = CUDA_CASES if cuda else CPU_CASES
    if args.cases:
        wanted = set(args.cases.split(",")) | {"gemm"}
        unknown = wanted - set(cases)
        if unknown:
            sys.exit(f"--cases: unknown candidates {sorted(unknown)}; choose from {cases}")
        cases = tuple(c for c in cases if c in wanted)
    backends = tuple(b for b in (("library", "fused") if cuda else ("fused",)) if f"{b}_fwd" in cases)
    deadline = common.Deadline(args.deadline)
    print(f"exemplar_logsumexp  device={args.device} threads={torch.get_num_threads()} rounds={args.rounds}")
    rows = []
    payload = {"op": "exemplar_logsumexp", "env": common.environment(args.device), "rounds": args.rounds,
               "rows": rows}
    # every precision of a size before the next size: a deadline cuts the largest sizes, not a precision
    for N, C, n, m in common.parse_sizes(args.sizes):
        for prec in common.parse_dtypes(args.dtype):
            if deadline.passed():
                print(f"deadline reached: skipping {prec} {N},{C},{n},{m}")
                payload["stopped_at_deadline"] = True
                continue
            with common.precision(prec) as dtype:
                err = errors(N, C, n, m, dtype, args.device, backends)
                fns = {c: build_case(c, N, C, n, m, dtype, args.device) for c in cases}
                t, mem = common.time_and_measure(__file__, fns, args, f"{N},{C},{n},{m}", prec)
            row = {"precision": prec, "N": N, "C": C, "n": n, "m": m,
                   **{f"max_abs_err_{k}": v for k, v in err.items()},
                   **{f"err_ratio_{b}_vs_plain": (err[b] / err["plain"] if err["plain"] > 0 else None)
                      for b in backends},
                   **{f"{c}_s": t[c]["seconds"] for c in cases}, **{f"{c}_ratio": t[c]["ratio"] for c in cases},
                   **{f"{c}_peak_bytes": mem[c] for c in cases}}
            def secs(c):
                v = t.get(c, {}).get("seconds")
                return v if isinstance(v, float) else None
            for b in backends:
                fwd, fb, ref_fb, gemm = secs(f"{b}_fwd"), secs(f"{b}_fwd_bwd"), secs("ref_fwd_bwd"), secs("gemm")
                if fwd and gemm:
                    row[f"{b}_fwd_throughput_vs_gemm"] = gemm / fwd
                if fb and ref_fb:
                    row[f"{b}_fwd_bwd_speedup_vs_ref"] = ref_fb / fb
                pm, pr = mem.get(f"{b}_fwd_bwd"), mem.get("ref_fwd_bwd")
                if isinstance(pm, int) and isinstance(pr, int) and pr > 0:
                    row[f"{b}_fwd_bwd_peak_vs_ref"] = pm / pr
            rows.append(row)
            cells = " | ".join(f"{c} {common.fmt_seconds(t[c]['seconds']).strip()} "
                               f"{common.fmt_ratio(t[c]['ratio']).strip()} {common.fmt_bytes(mem[c]).strip()}"
                               for c in cases)
            errs = ", ".join(f"{k} {v:.2e}" for k, v in err.items())
            print(f"{prec:8s} {N},{C},{n},{m}: err vs float64 [{errs}] | {cells}", flush=True)
            common.write_json(args.json, payload)  # after every case: an interrupted run keeps it
    print("cells: median time, ratio to the GEMM (median of per-round ratios), peak extra memory")
    common.write_json(args.json, payload)


if __name__ == "__main__":
    main()
