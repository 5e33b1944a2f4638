"""Benchmark: fused exemplar_logsumexp vs the pure-PyTorch reference vs the GEMM floor.

For each (N, C, n, m): fused forward, fused forward+backward (w.r.t. x), reference forward, reference
forward+backward, and one torch.mm of the same N x (C*n) x m product (the floor any formulation pays).
Times are medians over alternating rounds, ratios are to the GEMM measured in the same rounds; peak extra
memory is measured in a fresh subprocess per case.

    python benchmarks/bench_exemplar_logsumexp.py [--device cpu] [--dtype float32] \\
        [--sizes "2048,20,256,512;4096,20,512,2048;8192,20,1024,1024"] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ccluster  # noqa: E402
from ccluster import reference  # noqa: E402

DEFAULT_SIZES = "2048,20,256,512;4096,20,512,2048;8192,20,1024,1024"
CASES = ("gemm", "fused_fwd", "fused_fwd_bwd", "ref_fwd", "ref_fwd_bwd")


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
    fn = ccluster.exemplar_logsumexp if case.startswith("fused") else reference.exemplar_logsumexp
    if case.endswith("fwd"):
        def run():
            with torch.no_grad():
                return fn(x, db, log_q, alpha)
        return run
    xg = x.clone().requires_grad_()

    def run_bwd():
        out = fn(xg, db, log_q, alpha)
        out.backward(torch.ones_like(out))
        xg.grad = None
    return run_bwd


def main():
    args = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args()
    dtype = common.DTYPES[args.dtype]
    common.apply_threads(args)
    if args.memory_case:
        N, C, n, m = common.parse_sizes(args.sizes)[0]
        print(common.measure_in_process(lambda: build_case(args.memory_case, N, C, n, m, dtype, args.device),
                                        args.device,
                                        lambda: build_case(args.memory_case, 8, C, 4, 4, dtype, args.device)))
        return
    if not ccluster.has_compiled_ops():
        sys.exit("compiled ops are not loaded: this benchmark would time the reference against itself")
    print(f"exemplar_logsumexp  device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    header = f"{'N,C,n,m':>20} | {'max rel err':>11} | " + " | ".join(f"{c:>22}" for c in CASES)
    print(header)
    print("-" * len(header))
    rows = []
    for N, C, n, m in common.parse_sizes(args.sizes):
        # correctness first: fused vs reference on this very shape
        x, db, log_q, alpha = make_inputs(N, C, n, m, dtype, args.device)
        with torch.no_grad():
            a = ccluster.exemplar_logsumexp(x, db, log_q, alpha).double()
            b = reference.exemplar_logsumexp(x.double(), db.double(), log_q.double(), alpha)
        err = float(((a - b).abs() / b.abs().clamp_min(1)).max())
        del x, db, log_q, a, b
        cases = {c: build_case(c, N, C, n, m, dtype, args.device) for c in CASES}
        t = common.time_alternating(cases, args.rounds, "gemm", args.device)
        del cases
        mem = {c: None for c in CASES}
        if not args.no_memory:
            size_arg = ["--threads", str(torch.get_num_threads()), "--sizes", f"{N},{C},{n},{m}", "--dtype", args.dtype, "--device", args.device]
            mem = {c: common.measure_subprocess(__file__, c, size_arg) for c in CASES}
        row = {"N": N, "C": C, "n": n, "m": m, "max_rel_err_vs_float64": err,
               **{f"{c}_s": t[c]["seconds"] for c in CASES}, **{f"{c}_ratio": t[c]["ratio"] for c in CASES},
               **{f"{c}_peak_bytes": mem[c] for c in CASES}}
        rows.append(row)
        cells = [f"{common.fmt_seconds(t[c]['seconds'])} {common.fmt_ratio(t[c]['ratio'])} "
                 f"{common.fmt_bytes(mem[c])}" for c in CASES]
        print(f"{f'{N},{C},{n},{m}':>20} | {err:11.2e} | " + " | ".join(f"{s:>22}" for s in cells))
    print("cells: median time, ratio to the GEMM (median of per-round ratios), peak extra memory")
    common.write_json(args.json, {"op": "exemplar_logsumexp", "dtype": args.dtype,
                                  "env": common.environment(args.device), "rounds": args.rounds,
                                  "rows": rows})


if __name__ == "__main__":
    main()
