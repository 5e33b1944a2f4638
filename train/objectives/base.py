"""What every exemplar objective supplies, and the defaults most of them share.

An objective (``cc.loss``) decides four things, each in one method:

* **collection** (:meth:`ExemplarObjective.candidates`, :meth:`ExemplarObjective.collection_weights`):
  which classes the exemplar database holds, what ranks a segment as an exemplar candidate, and the
  weights ``w[s, c]`` of the Q fit (:func:`ccluster.fit_representativeness`);
* **training** (:meth:`ExemplarObjective.loss`): the exemplar loss of one stream on one batch, in the
  objective's own units (the literal loss divides by its value at collection with ``cc.scale: relative``);
* **test-time selection** (:meth:`ExemplarObjective.select`): the representative segments of a test video;
* **its settings** (:meth:`ExemplarObjective.check`, :attr:`ExemplarObjective.auto_fit_gap`): what it
  cannot work with, and the Q-fit gap it tolerates (``cc.guard_fit_gap: auto``).

The loss of a stream is an ``nn.Module`` of :mod:`ccluster` built once per collection with that
stream's bandwidth (:meth:`ExemplarObjective.stream_loss`); the database slice, Q and alpha it is
called with are the stream's :class:`train.run.exemplars.StreamExemplars`.
"""
from __future__ import annotations

import torch

import ccluster
from ..config.errors import ConfigError


class ExemplarObjective:
    """The base of every objective: attention-weighted collection, no background class, test-time
    selection by ``cc.select_by``. Subclasses set :attr:`name` and implement :meth:`stream_loss` and
    :meth:`loss`.

    Args:
        cc: the config's ``cc`` section (read here once).
    """

    name = ""
    #: cc.guard_fit_gap "auto": the Q-fit gap (nats) below which the final mAPs moved < 0.2 points
    #: (docs/training.md, "Collapse guards"); 0.01 for the objectives that use log z as it is.
    auto_fit_gap = 0.01
    #: whether the objective can train with a background class in the database (cc.background)
    supports_background = False

    def __init__(self, cc: dict):
        self.metric = cc["metric"]
        self.reduction = cc["reduction"]
        self.temperature = cc["temperature"]
        self.detach_attention = cc["detach_attention"]
        self.select_by = cc["select_by"]
        self.k = cc["k"]
        self.background = False

    @classmethod
    def check(cls, cfg: dict) -> None:
        """Raise :class:`train.config.ConfigError` for settings this objective cannot work with."""
        if cfg["cc"]["background"] and not cls.supports_background:
            from . import OBJECTIVES, load_objective
            which = ", ".join(f"'{name}'" for name in OBJECTIVES if load_objective(name).supports_background)
            raise ConfigError(f"config key 'cc.background': a background class is used by cc.loss {which} only, "
                              f"got cc.loss '{cls.name}'")

    # ------------------------------------------------------------------------------------------------
    # collection

    def database_classes(self, num_classes: int) -> int:
        """Classes of the exemplar database: the dataset's (and a background class where used)."""
        return num_classes + self.background

    def candidates(self, out: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels [K], score [T, K])`` of one training video (batch of one, ``out`` the model's
        outputs): the database's classes the video belongs to and the fused score that ranks its
        segments as exemplars of them (the T-CAM)."""
        return labels, out["tcam"][0]

    def collection_weights(self, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``w [T, K]``: the Q fit's weight of each segment for each class of the video: the
        attention normalised over the video, ``p(s|x)``, on its labelled classes."""
        p = attention / attention.sum().clamp_min(1e-12)
        return p[:, None] * labels[None].to(p.dtype)

    # ------------------------------------------------------------------------------------------------
    # training

    def stream_loss(self, alpha: float) -> torch.nn.Module:
        """The loss module of one stream whose bandwidth is ``alpha`` (built at every collection)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, out: dict, labels: torch.Tensor, mask: torch.Tensor, stream: str,
             exemplars) -> torch.Tensor:
        """The exemplar loss of ``stream`` on a batch: ``x [B, T, m]`` what the loss sees (phi or the
        input features, :func:`train.run.exemplars.cc_features`), ``out`` the model's outputs, ``labels
        [B, C]``, ``mask [B, T]``, ``exemplars`` the stream's :class:`train.run.exemplars.StreamExemplars`."""
        raise NotImplementedError

    def attention(self, out: dict, stream: str) -> torch.Tensor:
        """The stream's attention as the loss weighs segments: held fixed with ``cc.detach_attention``."""
        att = out[f"att_{stream}"]
        return att.detach() if self.detach_attention else att

    # ------------------------------------------------------------------------------------------------
    # test time

    def select(self, x: torch.Tensor, out: dict, stream: str, exemplars, classes: torch.Tensor):
        """Test-time selection in one video (``x [T, m]``): per class in ``classes`` the ``cc.k``
        segments closest to the class's exemplars (``cc.select_by: distance``) or with the least
        literal loss ``-p(s|x) log z`` (``loss``); a :class:`ccluster.Selection`."""
        T = x.shape[0]
        if self.select_by == "loss":
            a = out[f"att_{stream}"][0]
            weight = a / a.sum().clamp_min(1e-12)
        else:
            weight = torch.full((T,), 1.0 / T, device=x.device)
        return ccluster.select_representative(x, weight, exemplars.features, exemplars.log_q, exemplars.alpha,
                                              self.k, metric=self.metric, classes=classes)
