"""The GPU targets of ccluster, checked against the JSON of the CUDA benchmarks (benchmarks/gpu_check.sh).

    python benchmarks/gpu_targets.py --cc bench_cc_loss.json --lse bench_lse.json [--json targets.json]

Targets, per measured row (a row that the benchmark did not reach is a miss: nothing is assumed):
  * L_cc forward+backward (ccluster.convex_clustering_loss, the faster of its two ways of being called:
    pairs on the GPU, and pairs on the CPU as the data loader has them) at least 1.5x faster than the best
    pure-PyTorch formulation (the faster of label-aware and dense) in the same precision, for float32
    (TF32 off), TF32 and bfloat16; at least 2x in bfloat16;
  * ... at most 10 % of that formulation's peak memory, both less the returned [N, m] gradient of x that
    every candidate holds;
  * exemplar_logsumexp forward at least 70 % of the throughput of one cuBLAS GEMM of the same product in
    the same precision;
  * TF32 and bfloat16 errors against float64 (the loss and dL/dx, dL/ddb, dL/dlog_q) at most 2x PyTorch's
    own in the same precision (plus 8 ulps of the value's scale, the test suite's floor).
Prints one line per check and exits 1 naming every miss.
"""
from __future__ import annotations

import argparse
import json
import sys

PRECISIONS = ("float32", "tf32", "bfloat16")
EPS32 = 2.0 ** -23  # the outputs compared are float32 (bfloat16 inputs give float32 gradients' rounding)


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def check_cc(rows, results, misses):
    seen = set()
    for r in rows:
        prec = r["precision"]
        if prec not in PRECISIONS:
            continue
        seen.add(prec)
        name = f"cc_loss {prec} {r['videos']}x{r['T']} C={r['C']} n={r['n']} m={r['m']}"
        ours = {c: _num(r.get(f"{c}_s")) for c in ("library", "library_host")}
        ours = {c: v for c, v in ours.items() if v is not None}
        base = {c: _num(r.get(f"{c}_s")) for c in ("label_aware", "dense")}
        base = {c: v for c, v in base.items() if v is not None}
        if not ours or not base:
            misses.append(f"{name}: not measured (ours {sorted(ours)}, PyTorch {sorted(base)})")
            continue
        best_ours = min(ours, key=ours.get)
        best_base = min(base, key=base.get)
        speedup = base[best_base] / ours[best_ours]
        need = 2.0 if prec == "bfloat16" else 1.5
        ok = speedup >= need
        results.append({"check": "cc_speed", "row": name, "ours": best_ours, "pytorch": best_base,
                        "speedup": speedup, "target": need, "ok": ok})
        print(f"{'ok  ' if ok else 'MISS'} {name}: {best_ours} {speedup:.2f}x faster than {best_base} "
              f"(target {need}x)")
        if not ok:
            misses.append(f"{name}: {best_ours} is {speedup:.2f}x the speed of {best_base}, target {need}x")
        grad = r.get("x_grad_bytes", 0)
        pm, pb = _num(r.get(f"{best_ours}_peak_bytes")), _num(r.get(f"{best_base}_peak_bytes"))
        if pm is None or pb is None or pb - grad <= 0:
            misses.append(f"{name}: peak memory not measured")
        else:
            frac = max(pm - grad, 0) / (pb - grad)
            ok = frac <= 0.10
            results.append({"check": "cc_memory", "row": name, "fraction": frac, "target": 0.10, "ok": ok})
            print(f"{'ok  ' if ok else 'MISS'} {name}: peak memory {100 * frac:.1f} % of {best_base}'s "
                  f"(less dL/dx; target <= 10 %)")
            if not ok:
                misses.append(f"{name}: peak memory {100 * frac:.1f} % of {best_base}'s, target <= 10 %")
        if prec in ("tf32", "bfloat16"):
            for what, e in (r.get("errors") or {}).items():
                plain, got, scale = _num(e.get("plain")), _num(e.get("ours")), _num(e.get("scale")) or 0.0
                if plain is None or got is None:
                    misses.append(f"{name}: error of {what} not measured")
                    continue
                ok = got <= 2 * plain + 8 * EPS32 * scale
                results.append({"check": "cc_error", "row": name, "of": what, "ours": got, "plain": plain,
                                "ok": ok})
                print(f"{'ok  ' if ok else 'MISS'} {name}: error of {what} {got:.3g} vs PyTorch's {plain:.3g} "
                      f"(target <= 2x)")
                if not ok:
                    misses.append(f"{name}: error of {what} {got:.3g} > 2 x PyTorch's {plain:.3g}")
    for prec in PRECISIONS:
        if prec not in seen:
            misses.append(f"cc_loss {prec}: no row measured")


def check_lse(rows, results, misses):
    seen = set()
    for r in rows:
        prec = r["precision"]
        if prec not in PRECISIONS:
            continue
        seen.add(prec)
        name = f"exemplar_logsumexp {prec} N={r['N']} C={r['C']} n={r['n']} m={r['m']}"
        thr = _num(r.get("library_fwd_throughput_vs_gemm"))
        if thr is None:
            misses.append(f"{name}: forward throughput not measured")
            continue
        ok = thr >= 0.70
        results.append({"check": "lse_forward", "row": name, "throughput_vs_gemm": thr, "target": 0.70, "ok": ok})
        print(f"{'ok  ' if ok else 'MISS'} {name}: forward at {100 * thr:.0f} % of one cuBLAS GEMM (target >= 70 %)")
        if not ok:
            misses.append(f"{name}: forward at {100 * thr:.0f} % of one cuBLAS GEMM, target >= 70 %")
        if prec in ("tf32", "bfloat16"):
            ratio = _num(r.get("err_ratio_library_vs_plain"))
            if ratio is not None and ratio > 2:
                misses.append(f"{name}: value error {ratio:.2f}x PyTorch's, target <= 2x")
    for prec in PRECISIONS:
        if prec not in seen:
            misses.append(f"exemplar_logsumexp {prec}: no row measured")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", required=True, help="bench_cc_loss.py --json output")
    p.add_argument("--lse", required=True, help="bench_exemplar_logsumexp.py --json output")
    p.add_argument("--json", default=None, help="write the checks and misses here")
    args = p.parse_args()
    results, misses = [], []
    for path, check in ((args.cc, check_cc), (args.lse, check_lse)):
        try:
            with open(path) as f:
                rows = json.load(f)["rows"]
        except (OSError, ValueError, KeyError) as exc:
            misses.append(f"{path}: no benchmark results ({type(exc).__name__}: {exc})")
            continue
        check(rows, results, misses)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checks": results, "misses": misses}, f, indent=2)
    if misses:
        print(f"gpu_targets: {len(misses)} miss(es):")
        for m in misses:
            print(f"  - {m}")
        sys.exit(1)
    print("gpu_targets: every target met")


if __name__ == "__main__":
    main()
