"""The exemplar objectives (train/objectives/): the registry is what cc.loss accepts; each objective's loss
is its ccluster loss on the stream's exemplars (with the literal loss's scale); the collection weights;
the test-time selection; the settings each one refuses; the Q-fit gap it tolerates."""
import json
from pathlib import Path

import pytest
import torch

import ccluster
from train.config import CHOICES, ConfigError, load_config
from train.objectives import OBJECTIVES, build_objective, load_objective, objective_class
from train.objectives.base import ExemplarObjective
from train.run import Run
from train.run.exemplars import StreamExemplars
from train.run.guards import fit_gap_threshold

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "tiny.yaml")
B, T, M, C, N = 3, 7, 5, 4, 6


def _cfg(*overrides):
    return load_config(TINY, list(overrides))


def _batch(seed=0):
    """What the loss of one stream sees: features, model outputs, labels, mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, M, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor([T, T - 2, 3])[:, None]
    labels = torch.zeros(B, C, dtype=torch.float64)
    labels[0, 1] = labels[1, 1] = labels[1, 3] = labels[2, 0] = 1
    raw = torch.randn(B, T, generator=g, dtype=torch.float64)
    att = torch.sigmoid(raw) * mask
    out = {"att_rgb": att.requires_grad_(), "logatt_rgb": torch.nn.functional.logsigmoid(raw) * mask,
           "seg_rgb": torch.randn(B, T, C, generator=g, dtype=torch.float64)}
    return x, out, labels, mask


def _stream(objective, seed=1, alpha=0.7, loss_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(C, N, M, generator=g, dtype=torch.float64)
    log_q = torch.randn(C, N, generator=g, dtype=torch.float64).log_softmax(1)
    return StreamExemplars(features, log_q, alpha, loss_scale, 1.0, objective.stream_loss(alpha))


def test_the_registry_is_what_cc_loss_accepts():
    assert CHOICES["cc.loss"] == tuple(OBJECTIVES)
    for name in OBJECTIVES:
        cls = load_objective(name)
        assert issubclass(cls, ExemplarObjective) and cls.name == name
        assert objective_class(_cfg(f"cc.loss={name}", *(["model.attention=none"] if name == "tcam_prior" else []))) \
            is cls
    assert type(build_objective(_cfg())).__name__ == "Prior"  # the default


@pytest.mark.parametrize("name,module", [
    ("literal", lambda o, a: ccluster.ConvexClusteringLoss(a, metric=o.metric, reduction="mean")),
    ("contrastive", lambda o, a: ccluster.ClassContrastiveLoss(a, metric=o.metric, temperature=2.0,
                                                                reduction="mean")),
    ("prior", lambda o, a: ccluster.AttentionPriorLoss(a, metric=o.metric, temperature=2.0, standardize=True,
                                                        log_attention=True, reduction="mean"))])
def test_each_objective_is_its_ccluster_loss_on_the_streams_exemplars(name, module):
    objective = build_objective(_cfg(f"cc.loss={name}", "cc.temperature=2", "cc.scale=none"))
    x, out, labels, mask = _batch()
    ex = _stream(objective)
    att = out["logatt_rgb"] if name == "prior" else out["att_rgb"].detach()  # cc.detach_attention: true
    want = module(objective, ex.alpha)(x, att, labels, mask, ex.features, ex.log_q)
    got = objective.loss(x, out, labels, mask, "rgb", ex)
    assert torch.equal(got, want) and ex.criterion.alpha == 0.7


def test_the_literal_loss_is_in_units_of_its_value_at_collection_with_a_relative_scale():
    x, out, labels, mask = _batch()
    relative, raw = (build_objective(_cfg("cc.loss=literal", f"cc.scale={s}")) for s in ("relative", "none"))
    ex = _stream(raw, loss_scale=3.0)
    assert torch.equal(relative.loss(x, out, labels, mask, "rgb", ex), raw.loss(x, out, labels, mask, "rgb", ex) / 3.0)
    # and the attention trains through it only with cc.detach_attention: false
    moving = build_objective(_cfg("cc.loss=literal", "cc.detach_attention=false"))
    moving.loss(x, out, labels, mask, "rgb", ex).backward()
    assert out["att_rgb"].grad is not None and out["att_rgb"].grad.abs().sum() > 0


def test_the_tcam_prior_is_the_prior_per_labelled_class_on_the_tcam():
    objective = build_objective(_cfg("cc.loss=tcam_prior", "model.attention=none", "cc.temperature=2"))
    x, out, labels, mask = _batch()
    ex = _stream(objective)
    want = 0.0
    for b, c in labels.nonzero().tolist():
        onehot = torch.zeros(1, C, dtype=labels.dtype)
        onehot[0, c] = 1
        want = want + ccluster.attention_prior_loss(
            x[b:b + 1], out["seg_rgb"][b:b + 1, :, c], onehot, mask[b:b + 1], ex.features, ex.log_q, ex.alpha,
            temperature=2.0, standardize=True, log_attention=True, reduction="sum")
    torch.testing.assert_close(objective.loss(x, out, labels, mask, "rgb", ex), want / B)


def test_collection_weights_and_the_background_class():
    a = torch.tensor([0.0, 1.0, 3.0, 0.5], dtype=torch.float64)
    labels = torch.tensor([False, True, False])
    plain = build_objective(_cfg("cc.loss=contrastive"))
    assert plain.database_classes(3) == 3
    torch.testing.assert_close(plain.collection_weights(a, labels),
                               (a / a.sum())[:, None] * labels[None].to(a.dtype))
    bg = build_objective(_cfg("cc.loss=contrastive", "cc.background=true"))
    assert bg.database_classes(3) == 4
    out = {"tcam": torch.rand(1, 4, 3), "attention": a[None]}
    lab, score = bg.candidates(out, labels)
    assert lab.tolist() == [False, True, False, True] and torch.equal(score[:, 3], -a)
    w = bg.collection_weights(a, lab)
    comp = 1 - a / a.max()
    torch.testing.assert_close(w[:, 3], comp / comp.sum())
    torch.testing.assert_close(w[:, :3], (a / a.sum())[:, None] * labels[None].to(a.dtype))


@pytest.mark.parametrize("select_by", ["distance", "loss"])
def test_the_test_time_selection(select_by):
    objective = build_objective(_cfg(f"cc.select_by={select_by}", "cc.k=2"))
    x, out, _, _ = _batch()
    ex = _stream(objective)
    a = out["att_rgb"].detach()[:1]
    weight = a[0] / a[0].sum() if select_by == "loss" else torch.full((T,), 1.0 / T, dtype=x.dtype)
    classes = torch.arange(C)
    want = ccluster.select_representative(x[0], weight, ex.features, ex.log_q, ex.alpha, 2, metric=objective.metric,
                                          classes=classes)
    got = objective.select(x[0], {"att_rgb": a}, "rgb", ex, classes)
    assert torch.equal(got.indices, want.indices)


def test_what_each_objective_refuses():
    with pytest.raises(ConfigError, match=r"config key 'cc.background': a background class is used by cc.loss "
                                          r"'contrastive' only, got cc.loss 'prior'"):
        _cfg("cc.background=true")
    with pytest.raises(ConfigError, match=r"config key 'cc.loss': 'prior' trains the attention, and "
                                          r"model.attention is 'none'; use 'tcam_prior'"):
        _cfg("model.attention=none")
    _cfg("model.attention=none", "cc.weight=0")  # no exemplar loss: nothing to refuse
    _cfg("model.attention=none", "cc.loss=tcam_prior")


def test_the_q_fit_gap_each_objective_tolerates():
    assert fit_gap_threshold(_cfg()) == 0.1  # prior standardises log z
    for name in ("literal", "contrastive"):
        assert fit_gap_threshold(_cfg(f"cc.loss={name}")) == 0.01
    assert fit_gap_threshold(_cfg("cc.loss=tcam_prior", "model.attention=none")) == 0.01
    assert fit_gap_threshold(_cfg("cc.guard_fit_gap=0.5")) == 0.5


@pytest.mark.slow
def test_the_tcam_prior_in_a_run_trains_the_segment_logits(cache, tmp_path):
    """configs/wtalc.yaml's recipe on the tiny preset: the run's exemplar term is the objective's loss on
    the stream's exemplars, and its gradient reaches the T-CAM."""
    recipe = ["model.streams=joint", "model.attention=none", "model.init=xavier", "data.sampler=similar_pairs",
              "data.similar_pairs=1", "loss.casl=0.5", "cc.loss=tcam_prior", "cc.weight=0.3", "eval.proposals=wtalc",
              "eval.smooth=0", "eval.figures=1", "cc.select=true", "train.baseline_steps=4", "train.cc_steps=2"]
    with Run(_cfg(*recipe), tmp_path / "run") as run:
        run.train()
        batch = run.steps.batch(2, 0)
        run.model.eval()
        out = run.model(batch["features"], batch["mask"])
        got = run.steps.cc_term(out, batch["features"], batch["mask"], batch["labels"], "joint")
        ex = run.exemplars.stream("joint")
        want = run.exemplars.objective.loss(out["emb_joint"], out, batch["labels"], batch["mask"], "joint", ex)
    torch.testing.assert_close(got, want)
    grad = torch.autograd.grad(got, out["seg_joint"], retain_graph=True)[0]
    assert grad.abs().sum() > 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "cls_map_select" in res["cc1"] and res["cc1"]["det_map_avg"] > 0
