"""Runs every CUDA kernel of ccluster once at small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_kernels.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py --quick

Covers both implementations (the library-GEMM path with its epilogue kernels, and the fused kernels),
every op (forward, backward, fused loss with and without dL/dx, fit step), both metrics, float32,
float64, float16 and bfloat16 (the tensor-core path), both plans of the library path (packed, with the
pairs on the device and on the host; dense), empty slots, an empty class, several workspace sizes (one
piece, class groups, slot chunks) and shapes that cross the 64-row / 64-exemplar tiles and the K-slices.
Shapes are small so that racecheck finishes in seconds. Exits non-zero if a result is not finite where
it should be (every output but the class without exemplars, which is -inf by design); prints one line
per configuration.
--quick runs only the configurations whose kernels use shared memory in distinct ways (the fused kernels
in float32 and bfloat16, the library path's column reductions), for racecheck, which is slow.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import ccluster
from ccluster import ops


def inputs(N, C, n, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, m, generator=g) / math.sqrt(m)).to("cuda", dtype)
    db = (torch.randn(C, n, m, generator=g) / math.sqrt(m)).to("cuda", dtype)
    log_q = torch.log_softmax(torch.randn(C, n, generator=g), -1)
    log_q[:, -1] = -math.inf
    if C >= 3:
        log_q[1] = -math.inf
    pairs = torch.rand(N, C, generator=g) < 0.5
    pairs[0] = True
    return x, db, log_q.to("cuda", dtype), pairs.to("cuda")


def run_all(backend, dtype, metric, ws, plan, N=70, C=3, n=70, m=33):
    """Every op with and without pairs; the pairs on the device and (packed plan) on the host. Returns
    whether every result that must be finite is (the class without exemplars gives -inf by design)."""
    x, db, log_q, pairs = inputs(N, C, n, m, dtype)
    w = torch.rand(N, C, device="cuda", dtype=dtype) * pairs
    results = []
    with ccluster.kernel_settings(backend=backend, workspace_bytes=ws, plan=plan):
        for p in (None, pairs, pairs.cpu()):
            out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, metric, p)
            grads = torch.ops.ccluster.exemplar_logsumexp_backward(torch.ones_like(out), x, db, log_q, out, 1.0,
                                                                   metric, p, [True, True, True])
            results.append(out[:, [0, 2]] if p is None else out[pairs][(pairs & torch.isfinite(log_q).any(1))[pairs]])
            results.extend(grads)
            loss = torch.ops.ccluster.cc_loss(x, w, pairs if p is None else p, db, log_q, 1.0, metric, True)
            torch.ops.ccluster.cc_loss(x, w, pairs if p is None else p, db, log_q, 1.0, metric, False)
            results += [loss[0], loss[2]]
        z, eta = torch.ops.ccluster.fit_step(x, db, log_q, w, 1.0, metric)
        ccluster.fit_step(x, db, log_q, w, 1.0, metric, pairs=pairs.cpu())
        results.append(z[:, [0, 2]])  # class 1 has no exemplar: -inf on its weighted pairs
    torch.cuda.synchronize()
    return all(bool(torch.isfinite(t).all()) for t in results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset, for racecheck")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not ops.has_compiled_ops():
        sys.exit("sanitize_kernels: needs CUDA and the compiled ccluster ops")
    ok = True
    configs = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        configs.append(("fused", dtype, "sqeuclidean", 1 << 30, "auto"))
        configs.append(("library", dtype, "sqeuclidean", 1 << 30, "packed"))
        configs.append(("library", dtype, "sqeuclidean", 1 << 30, "dense"))
    configs += [("fused", torch.float32, "euclidean", 1 << 30, "auto"),
                ("library", torch.float32, "euclidean", 6000, "packed"),
                ("library", torch.float32, "sqeuclidean", 300, "packed"),
                ("library", torch.float32, "euclidean", 300, "dense"),
                ("library", torch.bfloat16, "euclidean", 3000, "dense")]
    if args.quick:
        configs = [("fused", torch.float32, "sqeuclidean", 1 << 30, "auto"),
                   ("fused", torch.bfloat16, "euclidean", 1 << 30, "auto"),
                   ("library", torch.float32, "euclidean", 300, "packed"),
                   ("library", torch.float64, "sqeuclidean", 6000, "dense")]
    for cfg in configs:
        good = run_all(*cfg)
        ok = ok and good
        print(f"sanitize_kernels: backend={cfg[0]:8s} dtype={str(cfg[1]):15s} metric={cfg[2]:11s} "
              f"workspace={cfg[3]:>10d} plan={cfg[4]:6s} finite={good}", flush=True)
    # centring (library path) and a few units more than fit one block of the fused kernels
    with ccluster.kernel_settings(backend="library", centring="on", workspace_bytes=5000):
        x, db, log_q, pairs = inputs(90, 3, 80, 20, torch.float32, seed=1)
        out = ccluster.exemplar_logsumexp(x.requires_grad_(), db, log_q, 1.0, "sqeuclidean", pairs)
        out.sum().backward()
    torch.cuda.synchronize()
    print("sanitize_kernels: done" if ok else "sanitize_kernels: NON-FINITE RESULTS", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
