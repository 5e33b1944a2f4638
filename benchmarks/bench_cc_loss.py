"""Benchmark: fused label-sparse convex clustering loss, forward+backward, at a THUMOS-like batch.

Candidates (all forward + backward w.r.t. x and attention, float32 unless --dtype):
  fused / library  ccluster.convex_clustering_loss (library_ws32m: with a 32 MiB workspace). On CPU the fused CPU kernel (dL/dx accumulated in the
               forward pass); on CUDA both implementations: "library" (cuBLAS GEMMs + epilogue kernels, the
               default) and "fused" (the hand-written kernels)
  label_aware  the best plain-PyTorch formulation we know: per class, gather the rows of videos with
               that label, addmm-based scores, logsumexp (reference.convex_clustering_loss_by_class)
  dense        all N x C pairs through the materialised reference, then masked
  gemm         one GEMM with as many multiply-adds as the pairs need: [P, m] x [m, n], same precision
A batch is `videos` videos of `T` segments, 1-2 labels per video (10 % with two, as THUMOS14).
Peak memory is also given less the returned gradient of x (an [N, m] tensor every candidate returns).

    python benchmarks/bench_cc_loss.py [--device cpu|cuda] [--dtype float32,tf32,bfloat16] \\
        [--sizes "10,750,20,256,1024;..."] [--deadline 60] [--json out.json]
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

DEFAULT_SIZES = "10,750,20,256,1024;10,750,20,1024,1024;10,750,20,256,2048;10,750,20,1024,2048"
CPU_CASES = ("gemm", "fused", "label_aware", "dense")
CUDA_CASES = ("gemm", "library", "library_ws32m", "fused", "label_aware", "dense")


def make_inputs(videos, T, C, n, m, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = videos * T
    labels = torch.zeros(videos, C, dtype=torch.bool)
    for v in range(videos):
        labels[v, torch.randint(C, (1,), generator=g)] = True
        if v % 10 == 9:  # one video in ten has a second label
            labels[v, torch.randint(C, (1,), generator=g)] = True
    pairs = labels.repeat_interleave(T, 0)
    x = torch.randn(N, m, generator=g)
    att = torch.rand(videos, T, generator=g).softmax(1).reshape(N)
    db = torch.randn(C, n, m, generator=g)
    log_q = torch.full((C, n), -float(torch.tensor(n).log()))
    to = dict(device=device, dtype=dtype)
    return x.to(**to), att.to(**to), pairs.to(device), db.to(**to), log_q.to(**to), 1.0 / m


def build_case(case, videos, T, C, n, m, dtype, device):
    x, att, pairs, db, log_q, alpha = make_inputs(videos, T, C, n, m, dtype, device)
    if case == "gemm":
        P = int(pairs.sum())
        a = torch.randn(P, m, dtype=dtype, device=device)
        y = db[0].t().contiguous()
        return lambda: torch.mm(a, y)
    fn = {"fused": ccluster.convex_clustering_loss, "library": ccluster.convex_clustering_loss,
          "library_ws32m": ccluster.convex_clustering_loss,
          "label_aware": reference.convex_clustering_loss_by_class, "dense": reference.convex_clustering_loss}[case]
    settings = contextlib.nullcontext
    if case in ("library", "fused") and device.startswith("cuda"):
        settings = lambda: common.backend_settings(case)  # noqa: E731
    elif case == "library_ws32m":  # the library path with a 32 MiB workspace instead of 256 MiB
        settings = lambda: ccluster.kernel_settings(backend="library", workspace_bytes=32 << 20)  # noqa: E731
    xg = x.clone().requires_grad_()
    ag = att.clone().requires_grad_()

    def run():
        with settings():
            loss = fn(xg, ag, pairs, db, log_q, alpha)
            loss.backward()
        xg.grad = ag.grad = None
    return run


def main():
    args = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args()
    common.apply_threads(args)
    cuda = args.device.startswith("cuda")
    if args.memory_case:
        dtype = common.DTYPES[args.dtype]
        size = common.parse_sizes(args.sizes)[0]
        print(common.measure_in_process(lambda: build_case(args.memory_case, *size, dtype, args.device),
                                        args.device,
                                        lambda: build_case(args.memory_case, *(2, 4, size[2], 4, 4), dtype, args.device)))
        return
    if not ccluster.has_compiled_ops():
        sys.exit("compiled ops are not loaded: this benchmark would time the reference against itself")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    cases = CUDA_CASES if cuda else CPU_CASES
    ops_ = ("library", "fused") if cuda else ("fused",)
    timed_ops = ("library", "library_ws32m", "fused") if cuda else ("fused",)
    deadline = common.Deadline(args.deadline)
    print(f"convex_clustering_loss fwd+bwd  device={args.device} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}")
    rows = []
    payload = {"op": "convex_clustering_loss", "env": common.environment(args.device), "rounds": args.rounds,
               "rows": rows}
    for prec in common.parse_dtypes(args.dtype):
        for size in common.parse_sizes(args.sizes):
            if deadline.passed():
                print(f"deadline reached: skipping {prec} {size}")
                payload["stopped_at_deadline"] = True
                continue
            with common.precision(prec) as dtype:
                x, att, pairs, db, log_q, alpha = make_inputs(*size, dtype, args.device)
                oracle = float(reference.convex_clustering_loss_by_class(
                    x.double(), att.double(), pairs, db.double(), log_q.double(), alpha))
                err = {"plain": abs(float(reference.convex_clustering_loss_by_class(x, att, pairs, db, log_q, alpha))
                                    - oracle)}
                for b in ops_:
                    with (common.backend_settings(b) if cuda else contextlib.nullcontext()):
                        err[b] = abs(float(ccluster.convex_clustering_loss(x, att, pairs, db, log_q, alpha)) - oracle)
                npairs = int(pairs.sum())
                grad_bytes = x.numel() * x.element_size()
                del x, att, pairs, db, log_q
                fns = {c: build_case(c, *size, dtype, args.device) for c in cases}
                t, mem = common.time_and_measure(__file__, fns, args, ",".join(map(str, size)), prec)

            def speedup(a, other):
                f, o = t[a]["seconds"], t[other]["seconds"]
                return None if isinstance(f, str) or isinstance(o, str) else o / f

            def peak_ratio(a, other, less=0):
                f, o = mem[a], mem[other]
                if not (isinstance(f, int) and isinstance(o, int)) or o - less <= 0:
                    return None
                return max(f - less, 0) / (o - less)
            row = {"precision": prec, "videos": size[0], "T": size[1], "C": size[2], "n": size[3], "m": size[4],
                   "pairs": npairs, "oracle_loss": oracle,
                   **{f"abs_err_{k}": v for k, v in err.items()},
                   **{f"err_ratio_{b}_vs_plain": (err[b] / err["plain"] if err["plain"] > 0 else None) for b in ops_},
                   "x_grad_bytes": grad_bytes,
                   **{f"{c}_s": t[c]["seconds"] for c in cases}, **{f"{c}_ratio": t[c]["ratio"] for c in cases},
                   **{f"{c}_peak_bytes": mem[c] for c in cases}}
            for b in timed_ops:
                row[f"speedup_{b}_vs_label_aware"] = speedup(b, "label_aware")
                row[f"speedup_{b}_vs_dense"] = speedup(b, "dense")
                row[f"peak_{b}_vs_label_aware"] = peak_ratio(b, "label_aware")
                row[f"peak_{b}_vs_label_aware_less_x_grad"] = peak_ratio(b, "label_aware", grad_bytes)
            rows.append(row)
            cells = " | ".join(f"{c} {common.fmt_seconds(t[c]['seconds']).strip()} "
                               f"{common.fmt_ratio(t[c]['ratio']).strip()} {common.fmt_bytes(mem[c]).strip()}"
                               for c in cases)
            errs = ", ".join(f"{k} {v:.2e}" for k, v in err.items())
            ups = ", ".join(f"{b} {common.fmt_ratio(row[f'speedup_{b}_vs_label_aware']).strip()}" for b in ops_)
            print(f"{prec:8s} {','.join(map(str, size))} pairs={npairs}: err [{errs}] | {cells} | "
                  f"speed-up vs label_aware: {ups}", flush=True)
            common.write_json(args.json, payload)  # after every case: an interrupted run keeps it
    print("cells: median time, ratio to the pairs' GEMM (median of per-round ratios), peak extra memory")
    common.write_json(args.json, payload)


if __name__ == "__main__":
    main()
