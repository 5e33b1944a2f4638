"""The weakly supervised losses (train/models/losses.py): classification, top-k MIL, sparsity, co-activity."""
import pytest
import torch
import torch.nn.functional as F

from train.models import classification_loss, co_activity_loss, sparsity_loss, topk_pool

C, D, RGB, E = 5, 12, 7, 6


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
