"""Data-parallel training on ``torch.distributed``: process-group setup and the few collectives the
training procedure needs. Nothing here is a home-made engine: the model is wrapped in
:class:`torch.nn.parallel.DistributedDataParallel` by :class:`train.run.Run`, the Q fit sums its
partial eta/objective with ``all_reduce`` inside :func:`ccluster.fit_representativeness` (``group=``),
and the helpers below are thin wrappers over ``all_gather`` / ``broadcast`` / ``barrier``.

Launch with torchrun (one process per GPU, or per CPU worker)::

    torchrun --nproc_per_node=K -m train fit --config configs/thumos14.yaml

Every rank runs the same program. :func:`init` joins the group torchrun describes in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the config's
device is ``cuda`` (rank ``r`` uses GPU ``LOCAL_RANK``), gloo on CPU. Every collective of the default
group gets the ``timeout`` given there, so a lost rank ends the job with an error instead of a hang.

Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and every helper is the
single-process identity, so the single-process code path is unchanged.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


def is_initialized() -> bool:
    """Whether a process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the only one that writes checkpoints, logs and figures."""
    return rank() == 0


def env_rank() -> int:
    """The global rank torchrun set in the environment (0 if none); usable before :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node, from torchrun's ``LOCAL_RANK`` (0 if none)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: str = "cpu", backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, *,
         init_method: str | None = None, rank: int | None = None, world_size: int | None = None) -> bool:
    """Join the default process group; returns whether this is a multi-process run.

    ``backend``: ``"auto"`` (NCCL for ``device="cuda"``, gloo for ``"cpu"``), ``"nccl"`` or ``"gloo"``.
    ``timeout_s`` bounds every collective. By default the group comes from torchrun's environment
    (``init_method="env://"``); tests may pass ``init_method`` (e.g. ``file://...``), ``rank`` and
    ``world_size``. A no-op when the group already exists or the world size is 1.
    """
    if is_initialized():
        return dist.get_world_size() > 1
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' but CUDA is not available")
        local = local_rank()
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                               f"start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, init_method=init_method or "env://",
                            timeout=datetime.timedelta(seconds=float(timeout_s)),
                            **({} if rank is None else {"rank": rank, "world_size": world}), **kwargs)
    return True


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard(items: Sequence, of_rank: int | None = None, world: int | None = None) -> list:
    """This rank's items: every ``world``-th one from position ``rank`` (balanced, deterministic)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    return list(items[r::w])


def shard_bounds(n: int, of_rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[lo, hi)``: this rank's contiguous block of ``n`` items (the first ``n % world`` ranks get one
    more)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def _comm_device() -> torch.device:
    """Where tensors must be for the default group's backend (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (a new tensor, on ``values``' device)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return values.clone()
    t = values.detach().to(_comm_device()).clone()
    dist.all_reduce(t)
    return t.to(values.device)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_database(db):
    """Merge the per-rank :class:`ccluster.ExemplarDatabase` candidates into one database, identical on
    every rank and equal to the one a single process streaming all the segments builds: each rank's
    state is gathered (``all_gather`` of fixed-shape tensors), then merged in rank order with
    :meth:`ccluster.ExemplarDatabase.merge` (total order on (score, id), so the result does not depend
    on the order or the sharding). ``log_q`` is uniform over the filled slots, as after ``update``."""
    import ccluster
    if not is_initialized() or dist.get_world_size() == 1:
        return db
    world, dev = dist.get_world_size(), _comm_device()
    gathered: dict[str, list[torch.Tensor]] = {}
    for key, t in db.state_dict().items():
        t = t.to(dev).contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        gathered[key] = [p.to(db.device) for p in parts]
    merged = ccluster.ExemplarDatabase(db.num_classes, db.size, db.dim, dtype=db.dtype, device=db.device)
    for r in range(world):
        part = ccluster.ExemplarDatabase(db.num_classes, db.size, db.dim, dtype=db.dtype, device=db.device)
        part.load_state_dict({key: parts[r] for key, parts in gathered.items()})
        merged.merge(part)
    return merged


def generation_turn() -> int:
    """When a rank may write a shared cache (e.g. the synthetic dataset): 0 for rank 0, 1 for the first
    process of every other node, 2 for the rest (by then they find the files written)."""
    if rank() == 0:
        return 0
    return 1 if local_rank() == 0 else 2


__all__ = ["init", "cleanup", "is_initialized", "rank", "world_size", "is_main", "env_rank", "local_rank",
           "barrier", "shard", "shard_bounds", "all_reduce_sum", "all_gather_objects", "broadcast_object",
           "all_gather_database", "generation_turn", "DEFAULT_TIMEOUT_S"]
