"""Benchmark: fused label-sparse convex clustering loss, forward+backward, at a THUMOS-like batch.

Candidates (all forward + backward w.r.t. x and attention, float32 unless --dtype):
  fused          ccluster.convex_clustering_loss with the fused kernels (the CPU default; on CUDA the
                 hand-written kernels, backend "fused")
  library        the library-GEMM path as the ops choose its plan (the CUDA default) with the pairs on
                 x's device: on a GPU that is the dense plan (no synchronisation)
  library_host   the same with the pair mask on the CPU (the data loader's labels): the cost model may
                 take the packed plan, laid out on the host without a synchronisation (CUDA only)
  library_dense, library_packed   the library path with each plan forced (packed: host pairs)
  library_ws32m  the library path with a 32 MiB workspace instead of 256 MiB (CUDA only)
  label_aware    the best plain-PyTorch formulation we know: per class, gather the rows of videos with
                 that label, addmm-based scores, logsumexp (reference.convex_clustering_loss_by_class)
  dense          all N x C pairs through the materialised reference, then masked
  gemm           one GEMM with as many multiply-adds as the pairs need: [P, m] x [m, n], same precision;
                 the fused loss costs two such GEMMs (the two-GEMM floor is 2x its time)
A batch is `videos` videos of `T` segments, 1-2 labels per video (10 % with two, as THUMOS14).
Peak memory is also given less the returned gradient of x (an [N, m] tensor every candidate returns).
Errors: the loss and its gradients (x, db, log_q) against float64 on the first videos, for the default
implementation and for plain PyTorch in the same precision. Plans: the cost model's choice and estimates
for this size, on this CPU and on a GPU (ccluster.settings.estimate_plans).

    python benchmarks/bench_cc_loss.py [--device cpu|cuda] [--dtype float32,tf32,bfloat16] \\
        [--sizes "10,750,20,256,1024;..."] [--cases fused,label_aware,gemm] [--deadline 60] [--json out.json]
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
CPU_CASES = ("gemm", "fused", "library_packed", "library_dense", "label_aware", "dense")
CUDA_CASES = ("gemm", "library", "library_host", "library_dense", "library_packed", "library_ws32m", "fused",
              "label_aware", "dense")
ERROR_VIDEOS = 4  # videos of the float64 error check


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


SETTINGS = {"fused": dict(backend="fused"), "library": dict(backend="library"),
            "library_host": dict(backend="library"), "library_dense": dict(backend="library", plan="dense"),
            "library_packed": dict(backend="library", plan="packed"),
            "library_ws32m": dict(backend="library", workspace_bytes=32 << 20)}


def settings_of(case, device):
    """(a fresh context manager with the candidate's kernel settings, whether its pairs live on the CPU)."""
    host = case == "library_host" or (case == "library_packed" and device.startswith("cuda"))
    kw = SETTINGS.get(case)
    return (ccluster.kernel_settings(**kw) if kw else contextlib.nullcontext()), host


def build_case(case, videos, T, C, n, m, dtype, device):
    x, att, pairs, db, log_q, alpha = make_inputs(videos, T, C, n, m, dtype, device)
    if case == "gemm":
        P = int(pairs.sum())
        a = torch.randn(P, m, dtype=dtype, device=device)
        y = db[0].t().contiguous()
        return lambda: torch.mm(a, y)
    fn = {"label_aware": reference.convex_clustering_loss_by_class,
          "dense": reference.convex_clustering_loss}.get(case, ccluster.convex_clustering_loss)
    if settings_of(case, device)[1]:
        pairs = pairs.cpu()
    xg = x.clone().requires_grad_()
    ag = att.clone().requires_grad_()

    def run():
        with settings_of(case, device)[0]:
            loss = fn(xg, ag, pairs, db, log_q, alpha)
            loss.backward()
        xg.grad = ag.grad = None
    return run


def errors(size, dtype, device, default_case):
    """Max |error| against float64 of the loss and of dL/dx, dL/ddb, dL/dlog_q on the first videos: the
    default implementation and plain PyTorch (label-aware) in the same precision."""
    videos, T, C, n, m = size
    x, att, pairs, db, log_q, alpha = make_inputs(min(videos, ERROR_VIDEOS), T, C, n, m, dtype, device)

    def run(fn, cast, ctx):
        ins = [t.detach().to(cast).requires_grad_() for t in (x, db, log_q)]
        with ctx:
            loss = fn(ins[0], att.to(cast), pairs, ins[1], ins[2], alpha)
            grads = torch.autograd.grad(loss, ins)
        return [loss.detach().double(), *(g.double() for g in grads)]

    oracle = run(reference.convex_clustering_loss_by_class, torch.float64, contextlib.nullcontext())
    plain = run(reference.convex_clustering_loss_by_class, dtype, contextlib.nullcontext())
    ours = run(ccluster.convex_clustering_loss, dtype, settings_of(default_case, device)[0])
    out = {}
    for name, o, p, f in zip(("value", "grad_x", "grad_db", "grad_log_q"), oracle, plain, ours):
        ep, ef = float((p - o).abs().max()), float((f - o).abs().max())
        out[name] = {"plain": ep, "ours": ef, "ratio": ef / ep if ep > 0 else None, "scale": float(o.abs().max())}
    return out


def main():
    p = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    p.add_argument("--cases", default=None, help="comma-separated subset of the candidates (gemm is always timed)")
    args = p.parse_args()
    common.apply_threads(args)
    cuda = args.device.startswith("cuda")
    if args.memory_case:
        dtype = common.DTYPES[args.dtype]
        size = common.parse_sizes(args.sizes)[0]
        with common.precision(args.dtype):
            print(common.measure_in_process(lambda: build_case(args.memory_case, *size, dtype, args.device),
                                            args.device,
                                            lambda: build_case(args.memory_case, *(2, 4, size[2], 4, 4), dtype,
                                                               args.device)))
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
    default_case = "library" if cuda else "fused"
    ours = [c for c in cases if c in ("fused", "library", "library_host", "library_dense", "library_packed",
                                      "library_ws32m")]
    deadline = common.Deadline(args.deadline)
    print(f"convex_clustering_loss fwd+bwd  device={args.device} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}")
    rows = []
    payload = {"op": "convex_clustering_loss", "env": common.environment(args.device), "rounds": args.rounds,
               "rows": rows}
    # every precision of a size before the next size: a deadline cuts the largest sizes, not a precision
    for size in common.parse_sizes(args.sizes):
        for prec in common.parse_dtypes(args.dtype):
            if deadline.passed():
                print(f"deadline reached: skipping {prec} {size}")
                payload["stopped_at_deadline"] = True
                continue
            with common.precision(prec) as dtype:
                err = errors(size, dtype, args.device, default_case)
                _, _, pairs, _, _, _ = make_inputs(*size, dtype, "cpu")
                npairs = int(pairs.sum())
                plans = common.plan_estimates(size[0] * size[1], *size[2:], prec, pairs)
                x_numel = size[0] * size[1] * size[4]
                grad_bytes = x_numel * dtype.itemsize
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
                   "pairs": npairs, "errors": err, "plans": plans, "x_grad_bytes": grad_bytes,
                   **{f"{c}_s": t[c]["seconds"] for c in cases}, **{f"{c}_ratio": t[c]["ratio"] for c in cases},
                   **{f"{c}_calls": t[c]["calls"] for c in cases},
                   **{f"{c}_peak_bytes": mem[c] for c in cases}}
            for b in ours:
                row[f"{b}_vs_two_gemm_floor"] = (t[b]["ratio"] / 2) if isinstance(t[b]["ratio"], float) else None
                for base in ("label_aware", "dense"):
                    if base in cases:
                        row[f"speedup_{b}_vs_{base}"] = speedup(b, base)
                        row[f"peak_{b}_vs_{base}"] = peak_ratio(b, base)
                        row[f"peak_{b}_vs_{base}_less_x_grad"] = peak_ratio(b, base, grad_bytes)
            rows.append(row)
            cells = " | ".join(f"{c} {common.fmt_seconds(t[c]['seconds']).strip()} "
                               f"{common.fmt_ratio(t[c]['ratio']).strip()} {common.fmt_bytes(mem[c]).strip()}"
                               for c in cases)
            errs = ", ".join(f"{k} {v['ours']:.2e}/{v['plain']:.2e}" for k, v in err.items())
            ups = ", ".join(f"{b} {common.fmt_ratio(row.get(f'speedup_{b}_vs_label_aware')).strip()}" for b in ours)
            print(f"{prec:8s} {','.join(map(str, size))} pairs={npairs}: err ours/plain [{errs}] | {cells} | "
                  f"speed-up vs label_aware: {ups}", flush=True)
            print(f"         plans: {common.fmt_plans(plans)}", flush=True)
            common.write_json(args.json, payload)  # after every case: an interrupted run keeps it
    print("cells: median time, ratio to the pairs' GEMM (median of per-round ratios; the fused loss's floor "
          "is two such GEMMs), peak extra memory")
    common.write_json(args.json, payload)


if __name__ == "__main__":
    main()
