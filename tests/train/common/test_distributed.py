"""Process groups (train/common/distributed.py): the helpers in one process, and the sharded Q fit
(fit_representativeness(group=...)) equal to the single-process fit with 2 gloo ranks."""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ccluster
from train.common import distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _problem():
    g = torch.Generator().manual_seed(3)
    C, n, m, N = 3, 24, 5, 400
    centres = torch.randn(C, 4, m, generator=g, dtype=torch.float64) * 3
    x = centres[torch.randint(C, (N,), generator=g), torch.randint(4, (N,), generator=g)] \
        + torch.randn(N, m, generator=g, dtype=torch.float64)
    db = x[torch.randperm(N, generator=g)[:C * n]].reshape(C, n, m)
    w = torch.rand(N, C, generator=g, dtype=torch.float64) * (torch.rand(N, C, generator=g) < 0.4)
    w[:, 2] = 0  # a class without weight on any rank: reported empty everywhere
    return x, db, w


def _rank_main(rank, world, init_file, out_dir, cache, accelerate):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, db, w = _problem()
        shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        res = ccluster.fit_representativeness(x[shard], db, w[shard], 0.5, tol=1e-7, max_iter=3000,
                                              cache=cache, accelerate=accelerate, group=dist.group.WORLD)
        torch.save({"log_q": res.log_q, "gap": res.gap, "n_iter": res.n_iter, "empty": res.empty_classes},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("cache,accelerate", [(False, False), (True, True)], ids=["fused", "cached-squarem"])
def test_sharded_fit_equals_single_process(tmp_path, cache, accelerate):
    x, db, w = _problem()
    single = ccluster.fit_representativeness(x, db, w, 0.5, tol=1e-7, max_iter=3000, cache=cache,
                                             accelerate=accelerate)
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), cache, accelerate), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # every rank made the same decisions and holds the same result, bit for bit
    assert torch.equal(ranks[0]["log_q"], ranks[1]["log_q"])
    assert torch.equal(ranks[0]["n_iter"], ranks[1]["n_iter"])
    assert ranks[0]["empty"] == ranks[1]["empty"] == single.empty_classes == [2]
    # and it is the single-process fit, up to the rounding of summing in another order
    q0, q1 = ranks[0]["log_q"].exp(), single.log_q.exp()
    assert torch.allclose(q0, q1, atol=1e-6, rtol=0)
    assert bool((ranks[0]["gap"][:2] < 1e-7).all())


def test_shard_helpers():
    assert [distributed.shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [distributed.shard_bounds(4, r, 3) for r in range(3)] == [(0, 2), (2, 3), (3, 4)]
    assert distributed.shard([10, 11, 12, 13, 14], 1, 2) == [11, 13]
    # single process: identities, nothing initialised
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init("cpu") is False
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_objects(3) == [3]
