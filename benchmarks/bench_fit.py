"""Benchmark: fitting Q, one iteration and time to tolerance.

Per iteration (float32 unless --dtype):
  fused   ccluster.fit_step: logz and eta from the same GEMM tiles, label-sparse (on CUDA also "library",
          the cuBLAS GEMMs + epilogue kernels that are the CUDA default; "fused" is then the hand-written
          CUDA kernels)
  torch   the same update in plain PyTorch, label-aware: per class, gather the weighted rows, addmm-based
          scores, logsumexp for logz and for eta (recomputed every iteration, as the fused op does)
  cached  the cached-kernel path of fit_representativeness: the [rows_c, n] matrices are built once,
          then an iteration is two log-sum-exp passes (no GEMM); chosen automatically when they fit
  gemm    one GEMM with as many multiply-adds as the pairs need: [P, m] x [m, n]
Then fit_representativeness to tol with the fused path (cache=False), the cached path (cache=True), and the
cached path with SQUAREM acceleration (accelerate=True).
The training set is `videos` videos of `T` segments, 1-2 labels each, attention-like weights.

    python benchmarks/bench_fit.py [--device cpu|cuda] [--dtype float32,tf32] [--sizes "200,100,20,512,1024"] \\
        [--tol 1e-4] [--no-tol] [--deadline 60] [--json out.json]
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ccluster  # noqa: E402
from ccluster import fit as fit_module  # noqa: E402
from ccluster import reference  # noqa: E402

DEFAULT_SIZES = "200,100,20,512,1024"
CPU_CASES = ("gemm", "fused", "torch", "cached")
CUDA_CASES = ("gemm", "library", "fused", "torch", "cached")


def make_inputs(videos, T, C, n, m, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(videos, C, dtype=torch.bool)
    for v in range(videos):
        labels[v, torch.randint(C, (1,), generator=g)] = True
        if v % 10 == 9:
            labels[v, torch.randint(C, (1,), generator=g)] = True
    # features clustered around a few centres per class so that Q has structure to find
    centres = torch.randn(C, 8, m, generator=g)
    vid_class = labels.float().argmax(1)
    pick = torch.randint(8, (videos, T), generator=g)
    x = centres[vid_class[:, None], pick] + 0.5 * torch.randn(videos, T, m, generator=g)
    x = x.reshape(videos * T, m)
    att = torch.rand(videos, T, generator=g).softmax(1).reshape(-1, 1)
    weight = att * labels.repeat_interleave(T, 0)
    db = x[torch.randperm(videos * T, generator=g)[: C * n]].reshape(C, n, m)
    log_q = torch.full((C, n), -float(torch.tensor(n).log()))
    to = dict(device=device, dtype=dtype)
    return x.to(**to), db.to(**to), weight.to(**to), log_q.to(**to), 1.0 / m


def torch_step(x, db, log_q, weight, alpha):
    """The update in plain PyTorch, label-aware: per class, only the rows with weight."""
    logz = torch.zeros_like(weight)
    log_eta = torch.full_like(log_q, float("-inf"))
    for c in range(db.shape[0]):
        rows = (weight[:, c] > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        t = reference.scores(x[rows], db[c:c + 1], torch.zeros_like(log_q[c:c + 1]), alpha)[:, 0]
        z = torch.logsumexp(t + log_q[c], 1)
        logz[rows, c] = z
        log_eta[c] = torch.logsumexp(t + (weight[rows, c].log() - z)[:, None], 0)
    return logz, log_eta


def build_case(case, videos, T, C, n, m, dtype, device):
    x, db, weight, log_q, alpha = make_inputs(videos, T, C, n, m, dtype, device)
    if case == "gemm":
        a = torch.randn(int((weight > 0).sum()), m, dtype=dtype, device=device)
        y = db[0].t().contiguous()
        return lambda: torch.mm(a, y)
    if case in ("fused", "library"):
        if not device.startswith("cuda"):
            return lambda: ccluster.fit_step(x, db, log_q, weight, alpha)

        def run():
            with common.backend_settings(case):
                return ccluster.fit_step(x, db, log_q, weight, alpha)
        return run
    if case == "torch":
        return lambda: torch_step(x, db, log_q, weight, alpha)
    kernels = fit_module._cached_kernels(x, db, weight, alpha, "sqeuclidean")
    active = torch.ones(C, dtype=torch.bool, device=device)
    return lambda: fit_module._cached_step(kernels, log_q, weight, active)


def main():
    p = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--no-tol", action="store_true", help="skip the fits to tolerance")
    args = p.parse_args()
    common.apply_threads(args)
    cuda = args.device.startswith("cuda")
    if args.memory_case:
        dtype = common.DTYPES[args.dtype]
        size = common.parse_sizes(args.sizes)[0]
        print(common.measure_in_process(lambda: build_case(args.memory_case, *size, dtype, args.device),
                                        args.device,
                                        lambda: build_case(args.memory_case, *(size[2], 4, size[2], 4, 4), dtype, args.device)))
        return
    if not ccluster.has_compiled_ops():
        sys.exit("compiled ops are not loaded: this benchmark would time the reference against itself")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    cases = CUDA_CASES if cuda else CPU_CASES
    ops_ = ("library", "fused") if cuda else ("fused",)
    deadline = common.Deadline(args.deadline)
    print(f"fit Q  device={args.device} threads={torch.get_num_threads()} rounds={args.rounds} tol={args.tol:g}")
    rows = []
    payload = {"op": "fit", "tol": args.tol, "env": common.environment(args.device), "rounds": args.rounds,
               "rows": rows}
    for prec in common.parse_dtypes(args.dtype):
        for size in common.parse_sizes(args.sizes):
            if deadline.passed():
                print(f"deadline reached: skipping {prec} {size}")
                payload["stopped_at_deadline"] = True
                continue
            with common.precision(prec) as dtype:
                x, db, weight, log_q, alpha = make_inputs(*size, dtype, args.device)
                npairs = int((weight > 0).sum())
                b = torch_step(x.double(), db.double(), log_q.double(), weight.double(), alpha)
                err = {}
                for name in ops_:
                    with (common.backend_settings(name) if cuda else contextlib.nullcontext()):
                        a = ccluster.fit_step(x, db, log_q, weight, alpha)
                    err[name] = max(float((u.double() - v).nan_to_num(posinf=0, neginf=0).abs().max())
                                    for u, v in zip(a, b))
                fns = {c: build_case(c, *size, dtype, args.device) for c in cases}
                t, mem = common.time_and_measure(__file__, fns, args, ",".join(map(str, size)), prec)
                print(f"{prec} size videos,T,C,n,m = {size}, pairs = {npairs}, max abs err vs float64 = "
                      + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
                print("  one iteration: " + " | ".join(
                    f"{c} {common.fmt_seconds(t[c]['seconds']).strip()} {common.fmt_ratio(t[c]['ratio']).strip()} "
                    f"{common.fmt_bytes(mem[c]).strip()}" for c in cases), flush=True)
                to_tol = {}
                if not args.no_tol:
                    for name, cache, accelerate in (("fused", False, False), ("cached", True, False),
                                                    ("cached+squarem", True, True)):
                        start = time.perf_counter()
                        res = ccluster.fit_representativeness(x, db, weight, alpha, tol=args.tol,
                                                              max_iter=args.max_iter, cache=cache,
                                                              accelerate=accelerate)
                        common.sync(args.device)
                        to_tol[name] = {"seconds": time.perf_counter() - start, "max_iter": int(res.n_iter.max()),
                                        "converged": int(res.converged.sum()), "max_gap": float(res.gap.max())}
                        print(f"  to tol, {name:14s}: {to_tol[name]['seconds']:.2f} s, {to_tol[name]['max_iter']} "
                              f"iterations, {to_tol[name]['converged']}/{size[2]} classes converged, max gap "
                              f"{to_tol[name]['max_gap']:.1e}")
            est = None
            if "fused" in to_tol and not isinstance(t["torch"]["seconds"], str):
                est = t["torch"]["seconds"] * to_tol["fused"]["max_iter"]
                print(f"  to tol, torch (estimated: plain iterations x its time per iteration): {est:.2f} s")
            rows.append({"precision": prec, "videos": size[0], "T": size[1], "C": size[2], "n": size[3],
                         "m": size[4], "pairs": npairs, **{f"max_abs_err_{k}": v for k, v in err.items()},
                         **{f"{c}_s": t[c]["seconds"] for c in cases}, **{f"{c}_ratio": t[c]["ratio"] for c in cases},
                         **{f"{c}_peak_bytes": mem[c] for c in cases},
                         "to_tol": to_tol, "torch_to_tol_estimated_s": est})
            common.write_json(args.json, payload)  # after every case: an interrupted run keeps it
    print("per iteration: median time, ratio to the pairs' GEMM (median of per-round ratios), peak extra memory")
    common.write_json(args.json, payload)


if __name__ == "__main__":
    main()
