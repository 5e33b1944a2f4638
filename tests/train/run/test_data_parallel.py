"""Data-parallel training on torch.distributed (gloo, 2 CPU processes), against one process.

* spawned ranks resume a single-process checkpoint: the merged exemplar database equals the one-process
  database, Q, one training step with L_cc and the evaluation equal it within rounding; every rank ends
  with the same state; rank 0 alone writes (each step logged once);
* ``torchrun --nproc_per_node=2 -m train fit`` runs the CLI end to end; its checkpoint resumes in one
  process, and a one-process checkpoint resumes with two (``--resume``);
* a rank that raises (NaN features in its shard) ends the whole torchrun job with that rank's error,
  within seconds, instead of leaving rank 0 blocked in the all_gather.

Every process runs one thread (the reference too) so that the only differences are the ones of summing
the batch's gradients in two parts. Every launch is bounded (collective timeout 60 s, test deadline).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ccluster
from conftest import private_cache
from train.common import distributed
from train.config import load_config, resolve_subsets
from train.run import checkpoint as ckpt
from train.run import Run
from train.run.context import open_dataset

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

ROOT = Path(__file__).resolve().parents[3]
# Dropout off: the ranks draw their own masks, which is statistically but not numerically the same.
# Plain EM for Q: SQUAREM's accept/reject test is a discrete decision that the rounding of a sharded
# versus a single sum can flip before the fit has converged (tiny preset: 100 passes at most); both
# paths carry the same certificate, but only plain EM gives the same Q to rounding at every pass.
# Stages: baseline (3 steps), db1, cc1 (1 step), db2, cc2 (1 step).
OVERRIDES = ["train.baseline_steps=3", "train.cc_steps=1", "cc.rounds=2", "train.log_every=1",
             "model.dropout=0", "cc.fit_accelerate=false"]
STEPS = 3 + 2 * 1
DEADLINE_S = 120


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny synthetic dataset, generated once into a private cache (inherited by the children)."""
    with private_cache(tmp_path_factory.mktemp("cache")) as path:
        open_dataset(load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES))
        yield path


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """One single-process run: (config, run folder, results)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES)
    run = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Run(cfg, run) as r:
            results = r.train()
    finally:
        torch.set_num_threads(threads)
    return cfg, run, results


def _spawn(fn, args, nprocs=2, deadline=DEADLINE_S):
    """mp.spawn with a deadline: a failing rank raises here (with its traceback), a hang fails."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    start = time.time()
    while not ctx.join(timeout=1):
        if time.time() - start > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"spawned ranks still running after {deadline} s")


def _copy_run(src: Path, checkpoint: str, dst: Path) -> Path:
    """A run folder whose latest checkpoint is ``src/checkpoint`` (the run stopped there)."""
    dst.mkdir(parents=True)
    shutil.copy(src / checkpoint, dst / ckpt.LATEST)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "train"]


def _assert_close_results(a: dict, b: dict, tol=1e-4):
    """Evaluation results. mAPs are piecewise constant in the scores: after steps whose gradients were
    summed in another order a near-tie between proposals may move them by ~1e-6 (the parameters and loss
    terms are compared tightly)."""
    assert a.keys() == b.keys()
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for k in a[stage]:
            assert a[stage][k] == pytest.approx(b[stage][k], abs=tol), (stage, k)


def _assert_close_params(a: dict, b: dict):
    """Parameters after steps whose gradients were summed in another order. The attention biases are
    left out: a softmax over segments does not depend on them, so their gradient is pure rounding noise
    (~1e-9) that Adam normalises into a step of up to lr."""
    for k in a:
        if k.endswith("attention.bias"):
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


# -------------------------------------------------------------------------------------------------
# Spawned ranks (gloo, file:// rendezvous)


def _helpers_problem():
    g = torch.Generator().manual_seed(5)
    C, n, m, N = 4, 6, 3, 90
    feats = torch.randn(N, m, generator=g, dtype=torch.float64)
    scores = torch.randint(0, 5, (N, C), generator=g).double()  # many ties: the id breaks them
    labels = torch.rand(N, C, generator=g) < 0.5
    ids = torch.stack([torch.arange(N) // 10, torch.arange(N) % 10], 1)
    w = torch.rand(N, C, generator=g, dtype=torch.float64) * labels
    return (C, n, m), feats, scores, labels, ids, w


def _rank_main(rank, world, init_file, run_dir, out_dir):
    torch.set_num_threads(1)
    assert distributed.init("cpu", timeout_s=60, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    # The helpers on an uneven split where rank 1 holds nothing: database merge and Q fit.
    (C, n, m), feats, scores, labels, ids, w = _helpers_problem()
    part = slice(0, 90) if rank == 0 else slice(90, 90)
    db = ccluster.ExemplarDatabase(C, n, m, dtype=torch.float64)
    db.update(feats[part], scores[part], labels[part], ids[part])
    db = distributed.all_gather_database(db)
    fit = ccluster.fit_representativeness(feats[part], db.features, w[part], 0.7, tol=1e-8, max_iter=40,
                                          group=dist.group.WORLD)
    # The procedure: resume the single-process run after its baseline stage, with 2 processes.
    with Run.resume(run_dir) as trainer:
        results = trainer.train()
    torch.save({"db": db.state_dict(), "fit": fit.log_q, "results": results,
                "model": trainer.model.state_dict(), **trainer.exemplars.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


@pytest.mark.slow
def test_two_ranks_equal_one_process(reference, tmp_path):
    cfg, ref_run, ref_results = reference
    run = _copy_run(ref_run, "stage-baseline.pt", tmp_path / "run")
    _spawn(_rank_main, (2, str(tmp_path / "init"), str(run), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # helpers: merged database = one pass over all the rows; sharded fit = one-process fit
    (C, n, m), feats, scores, labels, ids, w = _helpers_problem()
    one = ccluster.ExemplarDatabase(C, n, m, dtype=torch.float64).update(feats, scores, labels, ids)
    for r in ranks:
        assert all(torch.equal(r["db"][k], v) for k, v in one.state_dict().items())
    single_fit = ccluster.fit_representativeness(feats, one.features, w, 0.7, tol=1e-8, max_iter=40)
    torch.testing.assert_close(ranks[0]["fit"].exp(), single_fit.log_q.exp(), atol=1e-10, rtol=0)

    # every rank holds the same state, bit for bit
    a, b = ranks
    assert a["results"] == b["results"] and a["alpha"] == b["alpha"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["database"][k], b["database"][k]) for k in a["database"])
    assert all(torch.equal(a["log_q"][s], b["log_q"][s]) for s in a["log_q"])

    # database + Q of round 1 (same network: resumed from the same checkpoint)
    ref_db1, db1 = ckpt.load(ref_run / "stage-db1.pt"), ckpt.load(run / "stage-db1.pt")
    assert all(torch.equal(ref_db1["model"][k], db1["model"][k]) for k in db1["model"])
    for k in ("ids", "count", "scores", "features"):
        assert torch.equal(ref_db1["database"][k], db1["database"][k]), k
    assert db1["alpha"] == ref_db1["alpha"]
    for s in ("rgb", "flow"):
        torch.testing.assert_close(db1["log_q"][s].exp(), ref_db1["log_q"][s].exp(), atol=1e-6, rtol=0)

    # one training step with L_cc (cc1), then the rest of the run
    ref_cc1, cc1 = ckpt.load(ref_run / "stage-cc1.pt"), ckpt.load(run / "stage-cc1.pt")
    _assert_close_params(cc1["model"], ref_cc1["model"])
    _assert_close_params(a["model"], ckpt.load(ref_run / "latest.pt")["model"])
    _assert_close_results(a["results"], ref_results)
    assert json.loads((run / "results.json").read_text()) == a["results"]

    # logs: written by rank 0 only, every step once; the summed loss terms are the global batch's
    assert _train_steps(run) == list(range(1, STEPS + 1))
    rows = {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "train"}
    ref_rows = {r["step"]: r for r in map(json.loads, open(ref_run / "metrics.jsonl"))
                if r["kind"] == "train"}
    for step in (4, 5):
        for k in ("total", "clf", "cc"):
            assert rows[step][k] == pytest.approx(ref_rows[step][k], rel=1e-5), (step, k)


# -------------------------------------------------------------------------------------------------
# torchrun


def _torchrun(args, tmp_path, timeout=DEADLINE_S, dist_timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.5", "-m", "train", *args, f"--dist-timeout={dist_timeout}"]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_fit_and_resume_across_world_sizes(reference, tmp_path):
    """A fresh 2-process run through the CLI; its checkpoint resumed in 1 process; the 1-process
    reference's checkpoint resumed with 2 processes through the CLI (rank 0 reads and broadcasts it)."""
    cfg, ref_run, ref_results = reference
    fit = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *OVERRIDES]
    run = tmp_path / "run"
    out = _torchrun([*fit, f"run.dir={run}"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("run folder:") == 1  # rank 0 alone reports
    results = json.loads((run / "results.json").read_text())
    _assert_close_results(results, ref_results)
    assert _train_steps(run) == list(range(1, STEPS + 1))
    final = ckpt.load(run / "latest.pt")
    assert final["global_step"] == STEPS
    # the 2-process checkpoint after db1 resumes in one process, to the same end
    again = _copy_run(run, "stage-db1.pt", tmp_path / "again")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Run.resume(again) as r:
            resumed = r.train()
    finally:
        torch.set_num_threads(threads)
    _assert_close_results(resumed, results)
    _assert_close_params(ckpt.load(again / "latest.pt")["model"], final["model"])
    assert _train_steps(again) == list(range(1, STEPS + 1))
    # 1 -> 2 processes through the CLI
    ref_again = _copy_run(ref_run, "stage-db1.pt", tmp_path / "ref-again")
    out = _torchrun([*fit, "--run-dir", str(ref_again), "--resume"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.count("resuming") == 1 and "with 2 processes" in out.stderr
    _assert_close_results(json.loads((ref_again / "results.json").read_text()), ref_results)
    _assert_close_params(ckpt.load(ref_again / "latest.pt")["model"],
                         ckpt.load(ref_run / "latest.pt")["model"])
    assert _train_steps(ref_again) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_torchrun_failing_rank_fails_the_job(reference, tmp_path):
    """Features of a test video of rank 1's shard so large (finite: NaN or inf would be refused when the
    data is opened, on every rank) that its T-CAM overflows to NaN: rank 1 raises while evaluating, rank 0
    is already waiting in the all_gather of the predictions; the job must end with rank 1's error."""
    cfg, _, _ = reference
    ds = open_dataset(cfg)
    _, test_idx = resolve_subsets(cfg, ds)
    bad = ds.videos[test_idx[distributed.shard(list(range(len(test_idx))), 1, 2)[0]]].name
    src = Path(os.environ["CCLUSTER_CACHE"]) / "synthetic-tiny"
    name = next(p.name for p in src.iterdir() if (p / "annotations.json").is_file())
    root = tmp_path / "data"
    shutil.copytree(src / name, root / name)
    feats = np.load(root / name / "features" / f"{bad}.npy")
    np.save(root / name / "features" / f"{bad}.npy", np.full_like(feats, 3e38))
    # the collectives' timeout is set far beyond _torchrun's deadline: a job that waited for it (rank 0
    # blocked in a collective) instead of failing at once would not end by then
    out = _torchrun(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *OVERRIDES,
                     "train.baseline_steps=0", "data.synthetic=", f"data.root={root}", f"data.name={name}",
                     f"run.dir={tmp_path / 'run'}"], tmp_path, dist_timeout=10 * DEADLINE_S)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    # torchrun's summary names rank 1 as the root cause, with its exception (recorded by train.cli)
    root_cause = text[text.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1\b", root_cause) and re.search(r"contains? NaN", root_cause), text
