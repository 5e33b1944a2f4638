"""What every part of a run shares: the config, the dataset and its subsets, the device and the process
group, and the model. :class:`RunContext` is built once per run and handed to the training steps
(:mod:`train.run.steps`), the exemplar database (:mod:`train.run.exemplars`) and the evaluation
(:mod:`train.run.evaluation`), so that each of them can be used alone (``python -m train compare`` reuses
them stage by stage).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import distributed
from ..config import ConfigError, check_against_data, resolve_subsets
from ..data.standardize import FeatureStandardizer, fit_standardizer
from ..models import TwoStreamAttention
from ..objectives import build_objective
from ..objectives.base import ExemplarObjective

STREAMS = ("rgb", "flow")  # the streams of the two-stream model; a joint model has one, "joint"


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def default_cache() -> Path:
    """Where generated synthetic sets live: ``$CCLUSTER_CACHE`` or ``~/.cache/ccluster``."""
    return Path(os.environ.get("CCLUSTER_CACHE", Path.home() / ".cache" / "ccluster"))


def open_dataset(cfg: dict):
    """Load (and, for a synthetic preset, first generate) the dataset named by the config."""
    from .. import data as tdata
    d = cfg["data"]
    root, name = d["root"], d["name"]
    if d["synthetic"]:  # generated once into the cache (generate() skips an identical earlier run)
        from ..data import synthetic
        root = root or str(default_cache() / f"synthetic-{d['synthetic']}")
        gen = None
        for turn in range(3 if distributed.world_size() > 1 else 1):  # one writer at a time
            if turn == distributed.generation_turn():
                gen = synthetic.generate(root, preset=d["synthetic"], seed=0)
            distributed.barrier()
        root, gen_name = gen
        name = name or gen_name
    if not Path(root).exists():
        raise ConfigError(f"config key 'data.root': dataset folder not found: {root}; {_what_goes_there(d, name)}")
    try:
        kwargs = {"layout": d["layout"]}
        if d["feature_rate"]:
            kwargs["feature_rate"] = d["feature_rate"]
        if d["rgb_dim"]:
            kwargs["rgb_dim"] = d["rgb_dim"]
        return tdata.load_dataset(root, name, **kwargs)
    except FileNotFoundError as exc:
        raise ConfigError(f"config key 'data.root' ({root}, dataset '{name}'): missing file: "
                          f"{exc.filename or exc}; {_what_goes_there(d, name)}") from None
    except tdata.DatasetError as exc:
        if exc.argument is None:
            raise
        detail = str(exc).removeprefix(f"{exc.argument}: ")
        raise ConfigError(f"config key 'data.{exc.argument}': {detail}") from None


def _what_goes_there(d: dict, name: str) -> str:
    """What the folder of ``data.root`` must hold for ``data.layout`` (the advice of a missing-data error)."""
    if d["layout"] == "standard":
        return (f"it should hold {name}-I3D-JOINTFeatures.npy and the folder {name}-Annotations/ of the W-TALC "
                f"release (data.layout: standard), or set data.root to the folder that does")
    return (f"it should hold {name}/annotations.json and {name}/features/<video>.npy (data.layout: native), or "
            f"set data.root to the folder that does")


@dataclass
class RunContext:
    """The shared, fixed parts of a run. ``model`` is the bare model; ``net`` is what the training
    forward runs through (the model itself, or its DistributedDataParallel wrapper)."""
    cfg: dict
    dataset: object
    train_idx: list
    test_idx: list
    device: torch.device
    rank: int
    world: int
    model: TwoStreamAttention
    net: torch.nn.Module
    feature_stats: FeatureStandardizer      # raw statistics of the training subset (for the checks)
    standardizer: FeatureStandardizer | None  # what every forward applies (data.standardize), or None
    objective: ExemplarObjective            # the exemplar objective (cc.loss)

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features as the model sees them: standardised with ``data.standardize: zscore`` (padding,
        where ``mask`` is False, set to 0)."""
        return features if self.standardizer is None else self.standardizer.apply(features, mask)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    @property
    def progress(self) -> bool:
        """Whether this process draws progress bars (rank 0 with ``run.progress``)."""
        return bool(self.cfg["run"]["progress"]) and self.is_main

    @property
    def streams(self) -> tuple[str, ...]:
        """The model's streams: ``("rgb", "flow")``, or ``("joint",)`` with ``model.streams: joint``."""
        return self.model.streams

    @property
    def stream_dims(self) -> tuple[int, ...]:
        """Width of what L_cc and the database see, per stream: phi's, or the input features'."""
        if self.cfg["cc"]["on"] == "input":
            if self.streams == ("joint",):
                return (self.dataset.feature_dim,)
            return self.dataset.rgb_dim, self.dataset.feature_dim - self.dataset.rgb_dim
        return (self.cfg["model"]["embed_dim"],) * len(self.streams)

    def video(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole video as a batch of one: ``features [1, T, D]`` and an all-true ``mask [1, T]``."""
        feats = torch.as_tensor(self.dataset.videos[index].features, dtype=torch.float32)
        feats = self.prepare(feats[None].to(self.device))
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=self.device)


def apply_threads(cfg: dict) -> None:
    """``run.threads`` > 0: torch's intra-op thread count (0 leaves torch's default). The one place that
    sets it: every run applies it as its context is built (:func:`build_context`)."""
    if cfg["run"]["threads"] > 0:
        torch.set_num_threads(cfg["run"]["threads"])


def build_context(cfg: dict, dataset=None) -> RunContext:
    """Apply ``run.threads``, open the dataset (unless given), check the config against it, seed and
    build the model (wrapped in DistributedDataParallel when several processes run) and the exemplar
    objective."""
    apply_threads(cfg)
    dataset = dataset if dataset is not None else open_dataset(cfg)
    train_idx, test_idx = resolve_subsets(cfg, dataset)
    check_against_data(cfg, dataset, train_idx, test_idx)
    # Input statistics of the training subset (streamed, float64): always measured for the conditioning
    # check; with data.standardize: zscore they standardise every forward. A checkpoint's replace them.
    stats = fit_standardizer(dataset, train_idx)
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and min(cfg["data"]["batch_size"], len(train_idx)) < world:
        raise ConfigError(f"config key 'data.batch_size': expected at least one video per process "
                          f"({world} processes), got a batch of "
                          f"{min(cfg['data']['batch_size'], len(train_idx))}")
    device = torch.device(cfg["device"])
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    model = TwoStreamAttention(
        dataset.feature_dim, dataset.rgb_dim, dataset.num_classes, embed_dim=m["embed_dim"],
        dropout=m["dropout"], attention=m["attention"], attention_hidden=m["attention_hidden"],
        probabilities=cfg["loss"]["classification"], joint=m["streams"] == "joint",
        topk_ratio=cfg["loss"]["topk_ratio"], init=m["init"]).to(device)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return RunContext(cfg, dataset, train_idx, test_idx, device, rank, world, model, net, stats,
                      stats if cfg["data"]["standardize"] == "zscore" else None, build_objective(cfg))
