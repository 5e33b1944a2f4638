"""Benchmark: the exemplar losses of ccluster.exemplar_losses (our extension), forward+backward.

One row per (size, loss); a batch is `videos` videos of `T` segments, 1-2 labels per video (one video in
ten has two, as THUMOS14), all segments valid. Every candidate is timed forward + backward w.r.t. the
features and the attention, float32 unless --dtype:

  loss = contrastive   ClassContrastiveLoss (attention weights), K = C classes
         background    ClassContrastiveLoss(background=True), K = C + 1 classes
         prior         AttentionPriorLoss (KL to the tempered softmax of max log z; target detached)
         cc            ConvexClusteringLoss, the poster's L_cc, for scale
  fused      the ccluster module (exemplar_logsumexp / cc_loss kernels, no [N, K*n] matrix)
  reference  the best plain PyTorch we know, materialised: for contrastive/background the dense
             reference (one addmm over all K*n exemplars, logsumexp, log-softmax); for prior the
             per-video reference (each video against its labelled classes only); for cc the per-class
             label-aware loss
  gemm       the floor: one GEMM with the multiply-adds the forward needs: [N, m] x [m, K*n] for the
             contrastive forms, [P, m] x [m, n] over the P labelled (segment, class) pairs otherwise

    python benchmarks/bench_exemplar_losses.py [--sizes "10,750,20,256,1024"] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import ccluster  # noqa: E402
from ccluster import reference  # noqa: E402

DEFAULT_SIZES = "10,750,20,256,1024"
LOSSES = ("contrastive", "background", "prior", "cc")
CASES = ("gemm", "fused", "reference")
TAU_PRIOR = 1.0


def make_inputs(videos, T, C, n, m, dtype, device, background=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(videos, C, dtype=torch.bool)
    for v in range(videos):
        labels[v, torch.randint(C, (1,), generator=g)] = True
        if v % 10 == 9:
            labels[v, torch.randint(C, (1,), generator=g)] = True
    feats = torch.randn(videos, T, m, generator=g)
    att = torch.rand(videos, T, generator=g)
    K = C + background
    db = torch.randn(K, n, m, generator=g)
    log_q = torch.full((K, n), -float(torch.tensor(n).log()))
    mask = torch.ones(videos, T, dtype=torch.bool)
    to = dict(device=device, dtype=dtype)
    return (feats.to(**to), att.to(**to), labels.to(device), mask.to(device), db.to(**to), log_q.to(**to),
            1.0 / m)


def _flat_weights(att, labels, background):
    """The module's weights for an all-valid batch, in plain PyTorch: (w [N], labels [N, K], bg [N])."""
    B, T = att.shape
    w = att / att.sum(1, keepdim=True)
    lab = labels
    bg = None
    if background:
        comp = 1 - att / att.amax(1, keepdim=True)
        bg = (comp / comp.sum(1, keepdim=True)).reshape(B * T)
        lab = torch.cat([labels, torch.zeros(B, 1, dtype=torch.bool, device=labels.device)], 1)
    return w.reshape(B * T), lab.repeat_interleave(T, 0), bg


def loss_fn(loss, which):
    """Returns f(feats, att, labels, mask, db, log_q, alpha) -> scalar loss."""
    if loss in ("contrastive", "background"):
        bg = loss == "background"
        if which == "fused":
            mod = ccluster.ClassContrastiveLoss(1.0, background=bg)

            def f(feats, att, labels, mask, db, log_q, alpha):
                mod.alpha = alpha
                return mod(feats, att, labels, mask, db, log_q)
            return f

        def f(feats, att, labels, mask, db, log_q, alpha):
            w, lab, bgw = _flat_weights(att, labels, bg)
            return reference.class_contrastive_loss(feats.reshape(-1, feats.shape[2]), w, lab, db, log_q, alpha,
                                                    background_weight=bgw)
        return f
    if loss == "prior":
        if which == "fused":
            mod = ccluster.AttentionPriorLoss(1.0, temperature=TAU_PRIOR, standardize=True)

            def f(feats, att, labels, mask, db, log_q, alpha):
                mod.alpha = alpha
                return mod(feats, att, labels, mask, db, log_q)
            return f
        return lambda feats, att, labels, mask, db, log_q, alpha: reference.attention_prior_loss(
            feats, att, labels, mask, db, log_q, alpha, temperature=TAU_PRIOR, standardize=True)
    # cc: the poster's loss
    if which == "fused":
        mod = ccluster.ConvexClusteringLoss(1.0)

        def f(feats, att, labels, mask, db, log_q, alpha):
            mod.alpha = alpha
            return mod(feats, att, labels, mask, db, log_q)
        return f

    def f(feats, att, labels, mask, db, log_q, alpha):
        B, T, m = feats.shape
        p = (att / att.sum(1, keepdim=True)).reshape(B * T)
        return reference.convex_clustering_loss_by_class(feats.reshape(B * T, m), p, labels.repeat_interleave(T, 0),
                                                         db, log_q, alpha)
    return f


def build_case(loss, case, videos, T, C, n, m, dtype, device):
    feats, att, labels, mask, db, log_q, alpha = make_inputs(videos, T, C, n, m, dtype, device,
                                                             background=loss == "background")
    if case == "gemm":
        if loss in ("contrastive", "background"):
            a, y = feats.reshape(-1, m), db.reshape(-1, m).t().contiguous()
        else:
            P = int(labels.sum(1).sum()) * T
            a, y = torch.randn(P, m, dtype=dtype, device=device), db[0].t().contiguous()
        return lambda: torch.mm(a, y)
    fn = loss_fn(loss, case)
    fg = feats.clone().requires_grad_()
    ag = att.clone().requires_grad_()

    def run():
        out = fn(fg, ag, labels, mask, db, log_q, alpha)
        out.backward()
        fg.grad = ag.grad = None
    return run


def check(loss, size, dtype, device):
    """Relative error of the fused loss (in dtype) against the float64 reference on the same inputs."""
    feats, att, labels, mask, db, log_q, alpha = make_inputs(*size, dtype, device, background=loss == "background")
    a = float(loss_fn(loss, "fused")(feats, att, labels, mask, db, log_q, alpha))
    d = [t.double() for t in (feats, att)] + [labels, mask] + [t.double() for t in (db, log_q)]
    b = float(loss_fn(loss, "reference")(*d, alpha))
    return abs(a - b) / max(abs(b), 1e-30), a


def main():
    p = common.base_parser(__doc__.splitlines()[0], DEFAULT_SIZES)
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of " + ",".join(LOSSES))
    args = p.parse_args()
    dtype = common.DTYPES[args.dtype]
    common.apply_threads(args)
    if args.memory_case:
        loss, case = args.memory_case.split(":")
        size = common.parse_sizes(args.sizes)[0]
        print(common.measure_in_process(lambda: build_case(loss, case, *size, dtype, args.device), args.device,
                                        lambda: build_case(loss, case, 2, 4, size[2], 4, 4, dtype, args.device)))
        return
    if not ccluster.has_compiled_ops():
        sys.exit("compiled ops are not loaded: this benchmark would time the reference against itself")
    losses = [s for s in args.losses.split(",") if s]
    for s in losses:
        if s not in LOSSES:
            sys.exit(f"bench_exemplar_losses: --losses must name some of {LOSSES}, got {s!r}")
    print(f"exemplar losses fwd+bwd (features, attention)  device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    header = f"{'videos,T,C,n,m':>20} | {'loss':>11} | {'rel err':>8} | " + \
        " | ".join(f"{c:>22}" for c in CASES) + " | fused speed-up, memory saving"
    print(header)
    print("-" * len(header))
    rows = []
    for size in common.parse_sizes(args.sizes):
        for loss in losses:
            err, value = check(loss, size, dtype, args.device)
            cases = {c: build_case(loss, c, *size, dtype, args.device) for c in CASES}
            t = common.time_alternating(cases, args.rounds, "gemm", args.device)
            del cases
            mem = {c: None for c in CASES}
            if not args.no_memory:
                size_arg = ["--threads", str(torch.get_num_threads()), "--sizes", ",".join(map(str, size)),
                            "--dtype", args.dtype, "--device", args.device]
                mem = {c: common.measure_subprocess(__file__, f"{loss}:{c}", size_arg) for c in CASES}
            f, r = t["fused"]["seconds"], t["reference"]["seconds"]
            speedup = None if isinstance(f, str) or isinstance(r, str) else r / f
            mf, mr = mem["fused"], mem["reference"]
            saving = mr / mf if isinstance(mf, int) and isinstance(mr, int) and mf > 0 else None
            row = {"videos": size[0], "T": size[1], "C": size[2], "n": size[3], "m": size[4], "loss": loss,
                   "value": value, "rel_err_vs_float64": err, "speedup_vs_reference": speedup,
                   "memory_ratio_reference_over_fused": saving,
                   **{f"{c}_s": t[c]["seconds"] for c in CASES}, **{f"{c}_ratio": t[c]["ratio"] for c in CASES},
                   **{f"{c}_peak_bytes": mem[c] for c in CASES}}
            rows.append(row)
            cells = [f"{common.fmt_seconds(t[c]['seconds'])} {common.fmt_ratio(t[c]['ratio'])} "
                     f"{common.fmt_bytes(mem[c])}" for c in CASES]
            print(f"{','.join(map(str, size)):>20} | {loss:>11} | {err:8.1e} | " + " | ".join(f"{s:>22}" for s in cells)
                  + f" | {common.fmt_ratio(speedup)}, {common.fmt_ratio(saving)}", flush=True)
    print("cells: median time, ratio to that row's GEMM floor (median of per-round ratios), peak extra memory")
    common.write_json(args.json, {"op": "exemplar_losses", "dtype": args.dtype,
                                  "env": common.environment(args.device), "rounds": args.rounds,
                                  "rows": rows})


if __name__ == "__main__":
    main()
