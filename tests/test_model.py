"""train/models: the two-stream attention model and the weakly supervised losses."""
import math

import pytest
import torch
import torch.nn.functional as F

import ccluster
from train.models import (TwoStreamAttention, classification_loss, co_activity_loss, masked_softmax,
                          sparsity_loss, topk_pool)
from train.run.exemplars import auto_alpha

C, D, RGB, E = 5, 12, 7, 6


def model(attention="untrimmednet", probabilities="softmax"):
    torch.manual_seed(0)
    return TwoStreamAttention(D, RGB, C, embed_dim=E, dropout=0.0, attention=attention,
                              probabilities=probabilities).eval()


def batch(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    lengths = torch.tensor([T, T - 3, 2][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    labels = torch.zeros(3, C)
    labels[0, 1] = labels[1, 1] = labels[1, 3] = labels[2, 0] = 1
    return x, mask, labels[:B]


@pytest.mark.parametrize("attention", ["untrimmednet", "stpn"])
def test_shapes_and_padding_invariance(attention):
    m = model(attention)
    x, mask, _ = batch()
    out = m(x, mask)
    B, T = mask.shape
    for s in ("rgb", "flow"):
        assert out[f"emb_{s}"].shape == (B, T, E)
        assert out[f"seg_{s}"].shape == (B, T, C)
        assert out[f"att_{s}"].shape == (B, T) and out[f"video_{s}"].shape == (B, C)
        assert (out[f"att_{s}"][~mask] == 0).all()
    assert out["video"].shape == (B, C) and out["tcam"].shape == (B, T, C)
    if attention == "untrimmednet":
        torch.testing.assert_close(out["att_rgb"].sum(1), torch.ones(B))
    # A video's outputs do not depend on the padding or on the other videos of the batch.
    one = m(x[1:2, :int(mask[1].sum())], mask[1:2, :int(mask[1].sum())])
    torch.testing.assert_close(one["video"][0], out["video"][1])
    torch.testing.assert_close(one["tcam"][0], out["tcam"][1, :int(mask[1].sum())])


@pytest.mark.parametrize("attention", ["untrimmednet", "stpn"])
def test_fused_score_is_the_methods_formula(attention):
    m = model(attention)
    x, mask, _ = batch()
    out = m(x, mask)
    T = mask.sum(1, keepdim=True).float()
    fused = 0
    for s in ("rgb", "flow"):
        a = out[f"att_{s}"] * (T if attention == "untrimmednet" else 1)
        fused = fused + torch.softmax(out[f"seg_{s}"], -1) * a[..., None]
    torch.testing.assert_close(out["tcam"], fused / 2 * mask[..., None])
    # the video logits are the attention-weighted mean of the segment logits
    a = out["att_rgb"]
    v = (a[..., None] * out["seg_rgb"]).sum(1) / a.sum(1, keepdim=True)
    torch.testing.assert_close(out["video_rgb"], v)


def test_rescore_on_all_segments_equals_forward():
    m = model()
    x, mask, _ = batch(B=1, T=7)
    out = m(x, mask)
    torch.testing.assert_close(m.rescore("flow", out["emb_flow"][0]), out["video_flow"][0])


def test_masked_softmax_empty_row_is_zero():
    z = torch.randn(2, 4)
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    p = masked_softmax(z, mask)
    assert torch.isfinite(p).all() and (p[1] == 0).all()
    torch.testing.assert_close(p[0].sum(), torch.tensor(1.0))


def test_classification_losses():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    lsm = F.log_softmax(logits, -1)
    expect = -(lsm[0, 0] + 0.5 * lsm[1, 1] + 0.5 * lsm[1, 2]) / 2
    torch.testing.assert_close(classification_loss(logits, labels, "softmax"), expect)
    torch.testing.assert_close(classification_loss(logits, labels, "bce"),
                               F.binary_cross_entropy_with_logits(logits, labels))
    with pytest.raises(ValueError, match="kind must be"):
        classification_loss(logits, labels, "hinge")


def test_topk_pool_and_sparsity():
    seg = torch.tensor([[[1.0], [5.0], [3.0], [4.0], [100.0]]])
    mask = torch.tensor([[True, True, True, True, False]])   # the 100 is padding
    # T=4, ratio=2 -> k=2: mean of 5 and 4
    torch.testing.assert_close(topk_pool(seg, mask, ratio=2), torch.tensor([[4.5]]))
    torch.testing.assert_close(topk_pool(seg, mask, ratio=8), torch.tensor([[5.0]]))
    a = torch.tensor([[0.5, 0.25, 1.0, 7.0]])
    assert float(sparsity_loss(a, mask[:, :4] & torch.tensor([[True, True, True, False]]))) == 1.75


def test_co_activity_loss():
    torch.manual_seed(0)
    B, T = 4, 6
    emb = torch.randn(B, T, E, requires_grad=True)
    seg = torch.randn(B, T, C, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    labels = torch.eye(C)[:B]
    assert float(co_activity_loss(emb, seg, labels, mask)) == 0.0   # no two videos share a class
    labels[1, 0] = 1                                                 # videos 0 and 1 share class 0
    loss = co_activity_loss(emb, seg, labels, mask, margin=0.5)
    assert loss > 0
    loss.backward()
    assert emb.grad[0].abs().sum() > 0 and emb.grad[2].abs().sum() == 0
    assert seg.grad is not None


def test_cc_loss_reaches_phi_and_attention():
    """L_cc on the embedding shapes both phi and the attention (the method's default)."""
    m = model()
    m.train()
    x, mask, labels = batch()
    out = m(x, mask)
    db = torch.randn(C, 4, E)
    log_q = torch.full((C, 4), -math.log(4))
    loss = ccluster.ConvexClusteringLoss(0.5, reduction="mean")(out["emb_rgb"], out["att_rgb"], labels,
                                                                 mask, db, log_q)
    loss.backward()
    assert m.rgb.phi[0].weight.grad.abs().sum() > 0
    assert m.rgb.attention.weight.grad.abs().sum() > 0
    assert m.flow.phi[0].weight.grad is None


def test_auto_alpha_rules():
    # two exemplars at squared distance 4 in each class: lashkari = n^2 log n / sum_ij d = 4 log 2 / 8
    y = torch.zeros(2, 3, 2)
    y[:, 1, 0] = 2.0
    count = torch.tensor([2, 2])
    assert auto_alpha(y, count, "lashkari") == pytest.approx(4 * math.log(2) / 8)
    assert auto_alpha(y, count, "median") == pytest.approx(1 / 4)
    assert auto_alpha(y, count, "median", metric="euclidean") == pytest.approx(1 / 2)
    assert math.isnan(auto_alpha(y, torch.tensor([1, 0]), "lashkari"))


def joint_model(attention="none", init="torch"):
    torch.manual_seed(0)
    return TwoStreamAttention(D, RGB, C, embed_dim=E, dropout=0.0, attention=attention, joint=True,
                              topk_ratio=3, init=init).eval()


def test_joint_model_without_attention_is_wtalcs():
    """One stream on the whole feature vector; no attention; video logits = mean of the top ceil(T/3)
    segment logits per class over the valid segments; the T-CAM is the class probabilities."""
    m = joint_model()
    assert m.streams == ("joint",) and m.joint.attention is None
    x, mask, _ = batch()
    out = m(x, mask)
    assert out["emb_joint"].shape == (3, 9, E) and "emb_rgb" not in out
    for b in range(3):
        t = int(mask[b].sum())
        k = math.ceil(t / 3)
        top = out["seg_joint"][b, :t].topk(k, dim=0).values.mean(0)
        torch.testing.assert_close(out["video_joint"][b], top)
    torch.testing.assert_close(out["video"], torch.softmax(out["video_joint"], -1))
    torch.testing.assert_close(out["tcam"], torch.softmax(out["seg_joint"], -1) * mask[..., None])
    torch.testing.assert_close(out["logits"], out["seg_joint"])
    assert torch.equal(out["att_joint"], mask.float())
    assert (out["logatt_joint"][mask] == 0).all() and (out["logatt_joint"][~mask] < -1e30).all()
    # test-time re-scoring of all segments is the forward's video logits
    t = int(mask[1].sum())
    torch.testing.assert_close(m.rescore("joint", out["emb_joint"][1, :t]), out["video_joint"][1])


def test_two_stream_logits_are_the_mean_and_xavier_init():
    m = model("stpn")
    x, mask, _ = batch()
    out = m(x, mask)
    torch.testing.assert_close(out["logits"], (out["seg_rgb"] + out["seg_flow"]) / 2)
    mx = joint_model(init="xavier")
    for mod in mx.modules():
        if isinstance(mod, torch.nn.Linear):
            assert (mod.bias == 0).all()
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))
            assert mod.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="init must be"):
        TwoStreamAttention(D, RGB, C, init="he")
    with pytest.raises(ValueError, match="attention must be one of"):
        TwoStreamAttention(D, RGB, C, attention="soft")
