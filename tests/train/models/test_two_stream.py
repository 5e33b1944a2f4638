"""The two-stream attention model (train/models/two_stream.py): shapes, padding, the fused score, re-scoring,
the joint W-TALC model."""
import math

import pytest
import torch

import ccluster
from train.models import TwoStreamAttention, masked_softmax

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
