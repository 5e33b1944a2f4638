"""Benchmark: fused label-sparse convex clustering loss, forward+backward, at a THUMOS-like batch.

Candidates (all forward + backward w.r.t. x and attention, float32 unless --dtype):
  fused        ccluster.convex_clustering_loss (one pass over the pairs, dL/dx accumulated in it)
  label_aware  the best plain-PyTorch formulation we know: per class, gather the rows of videos with
               that label, addmm-based scores, logsumexp (reference.convex_clustering_loss_by_class)
  dense        all N x C pairs through the materialised reference, then masked
  gemm         one GEMM with as many multiply-adds as the pairs need: [P, m] x [m, n]
A batch is `videos` videos of `T` segments, 1-2 labels per video (10 % with two, as THUMOS14).

    python benchmarks/bench_cc_loss.py [--sizes "10,750,20,256,1024;..."] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ccluster  # noqa: E402
from ccluster import reference  # noqa: E402

DEFAULT_SIZES = "10,750,20,256,1024;10,750,20,1024,1024;10,750,20,256,2048;10,750,20,1024,2048"
CASES = ("gemm", "fused", "label_aware", "dense")


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
    fn = {"fused": ccluster.convex_clustering_loss, "label_aware": reference.convex_clustering_loss_by_class,
          "dense": reference.convex_clustering_loss}[case]
    xg = x.clone().requires_grad_()
    ag = att.clone().requires_grad_()

    def run():
        loss = fn(xg, ag, pairs, db, log_q, alpha)
        loss.backward()
        xg.grad = ag.grad = None
    return run


def main():
    args = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args()
    dtype = common.DTYPES[args.dtype]
    common.apply_threads(args)
    if args.memory_case:
        size = common.parse_sizes(args.sizes)[0]
        print(common.measure_in_process(lambda: build_case(args.memory_case, *size, dtype, args.device),
                                        args.device,
                                        lambda: build_case(args.memory_case, *(2, 4, size[2], 4, 4), dtype, args.device)))
        return
    if not ccluster.has_compiled_ops():
        sys.exit("compiled ops are not loaded: this benchmark would time the reference against itself")
    print(f"convex_clustering_loss fwd+bwd  device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    header = f"{'videos,T,C,n,m':>20} | {'pairs':>6} | {'rel err':>8} | " + \
        " | ".join(f"{c:>22}" for c in CASES) + " | speed-up vs label_aware, dense"
    print(header)
    print("-" * len(header))
    rows = []
    for size in common.parse_sizes(args.sizes):
        x, att, pairs, db, log_q, alpha = make_inputs(*size, dtype, args.device)
        a = float(ccluster.convex_clustering_loss(x, att, pairs, db, log_q, alpha))
        b = float(reference.convex_clustering_loss_by_class(x.double(), att.double(), pairs, db.double(),
                                                            log_q.double(), alpha))
        err = abs(a - b) / max(abs(b), 1e-30)
        npairs = int(pairs.sum())
        del x, att, pairs, db, log_q
        cases = {c: build_case(c, *size, dtype, args.device) for c in CASES}
        t = common.time_alternating(cases, args.rounds, "gemm", args.device)
        del cases
        mem = {c: None for c in CASES}
        if not args.no_memory:
            size_arg = ["--threads", str(torch.get_num_threads()), "--sizes", ",".join(map(str, size)), "--dtype", args.dtype, "--device", args.device]
            mem = {c: common.measure_subprocess(__file__, c, size_arg) for c in CASES}

        def speedup(other):
            f, o = t["fused"]["seconds"], t[other]["seconds"]
            return None if isinstance(f, str) or isinstance(o, str) else o / f
        row = {"videos": size[0], "T": size[1], "C": size[2], "n": size[3], "m": size[4], "pairs": npairs,
               "rel_err_vs_float64": err, "speedup_vs_label_aware": speedup("label_aware"),
               "speedup_vs_dense": speedup("dense"),
               **{f"{c}_s": t[c]["seconds"] for c in CASES}, **{f"{c}_ratio": t[c]["ratio"] for c in CASES},
               **{f"{c}_peak_bytes": mem[c] for c in CASES}}
        rows.append(row)
        cells = [f"{common.fmt_seconds(t[c]['seconds'])} {common.fmt_ratio(t[c]['ratio'])} "
                 f"{common.fmt_bytes(mem[c])}" for c in CASES]
        print(f"{','.join(map(str, size)):>20} | {npairs:6d} | {err:8.1e} | " + " | ".join(f"{s:>22}" for s in cells)
              + f" | {common.fmt_ratio(row['speedup_vs_label_aware'])}, {common.fmt_ratio(row['speedup_vs_dense'])}")
    print("cells: median time, ratio to the pairs' GEMM (median of per-round ratios), peak extra memory")
    common.write_json(args.json, {"op": "convex_clustering_loss", "dtype": args.dtype,
                                  "env": common.environment(args.device), "rounds": args.rounds,
                                  "rows": rows})


if __name__ == "__main__":
    main()
