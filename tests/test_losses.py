import math

import pytest
import torch
import torch.nn.functional as F

from molar import losses


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _case(seed=0, b=3, length=5, d=4, n_items=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, d, generator=g, dtype=dtype, requires_grad=True)
    items = torch.randn(n_items + 1, d, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, n_items + 1, (b, length), generator=g)
    targets[0, :2] = 0  # left padding
    targets[2, :4] = 0
    return hidden, targets, items


def _reference_ce(hidden, targets, items):
    """Hand-written softmax CE over items 1..n (no padding class), mean over real positions."""
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            t = int(targets[b, i])
            if t == 0:
                continue
            logits = items[1:] @ hidden[b, i]
            total = total - (logits[t - 1] - torch.logsumexp(logits, 0))
            count += 1
    return total / count


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_ce_matches_hand_written_softmax_for_any_chunk(chunk):
    hidden, targets, items = _case()
    got = losses.ce(hidden, targets, items, chunk=chunk)
    want = _reference_ce(hidden, targets, items)
    assert torch.allclose(got, want, atol=1e-12)
    g_got = torch.autograd.grad(got, [hidden, items])
    g_want = torch.autograd.grad(want, [hidden, items])
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-12)


def test_ce_gradcheck():
    hidden, targets, items = _case(seed=1)
    assert torch.autograd.gradcheck(lambda h, e: losses.ce(h, targets, e, chunk=3), (hidden, items))


def test_ce_of_uniform_scores_is_log_catalog():
    hidden = torch.zeros(2, 3, 4)
    targets = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert losses.ce(hidden, targets, torch.randn(10, 4)).item() == pytest.approx(math.log(9))


@pytest.mark.parametrize("name", ["ce", "bce", "sampled_ce"])
def test_padding_positions_never_contribute(name):
    hidden, targets, items = _case(seed=2)
    torch.manual_seed(0)
    loss = losses.next_item_loss(name, hidden, targets, items, num_negatives=3)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert torch.all(grad[targets == 0] == 0)
    assert torch.any(grad[targets != 0] != 0)
    # rewriting the hidden states at padding positions changes nothing
    changed = hidden.detach().clone()
    changed[targets == 0] = 1e3
    torch.manual_seed(0)
    again = losses.next_item_loss(name, changed, targets, items, num_negatives=3)
    assert again.item() == loss.item()
    # the padding row of the item table is never a class or a negative
    (item_grad,) = torch.autograd.grad(losses.next_item_loss(name, hidden, targets, items, num_negatives=3), [items])
    assert torch.all(item_grad[0] == 0)


def test_bce_of_zero_scores_is_two_log_two():
    # sigmoid(0) = 1/2 for the positive and the negative: -log(1/2) - log(1/2) per position
    hidden = torch.zeros(2, 3, 4)
    targets = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert losses.bce(hidden, targets, torch.randn(6, 4)).item() == pytest.approx(2 * math.log(2))


def test_bce_matches_its_definition_with_the_drawn_negatives():
    hidden, targets, items = _case(seed=3)
    torch.manual_seed(7)
    got = losses.bce(hidden, targets, items)
    torch.manual_seed(7)
    t = targets[targets != 0]
    neg = losses.sample_negatives(t, items.shape[0] - 1)
    h = hidden[targets != 0]
    pos_logit, neg_logit = (h * items[t]).sum(-1), (h * items[neg]).sum(-1)
    want = (-F.logsigmoid(pos_logit) - F.logsigmoid(-neg_logit)).mean()
    assert torch.allclose(got, want, atol=1e-12)


def test_negatives_are_uniform_over_the_catalog_without_the_positive():
    torch.manual_seed(0)
    n_items, draws = 6, 60_000
    positives = torch.full((draws,), 4)
    neg = losses.sample_negatives(positives, n_items)
    counts = torch.bincount(neg, minlength=n_items + 1)
    assert counts[0] == 0 and counts[4] == 0  # never padding, never the positive
    expected = draws / (n_items - 1)
    for item in (1, 2, 3, 5, 6):
        assert abs(counts[item] - expected) < 0.05 * expected


def test_sampled_ce_with_the_whole_catalog_as_negatives_is_full_ce():
    # every item drawn once as a negative; the positive's duplicate is masked: the full softmax
    hidden, targets, items = _case(seed=4)
    torch.manual_seed(0)
    got = losses.sampled_ce(hidden, targets, items, num_negatives=100)
    assert torch.allclose(got, losses.ce(hidden, targets, items), atol=1e-12)


def test_sampled_ce_uses_distinct_negatives_and_fewer_classes():
    hidden, targets, items = _case(seed=5, n_items=50)
    torch.manual_seed(0)
    small = losses.sampled_ce(hidden, targets, items, num_negatives=3)
    assert small.item() < losses.ce(hidden, targets, items).item()  # fewer competitors, smaller loss


def test_errors_name_the_problem():
    hidden, _, items = _case()
    with pytest.raises(ValueError, match="no non-padding target"):
        losses.ce(hidden, torch.zeros(3, 5, dtype=torch.long), items)
    with pytest.raises(ValueError, match="1..7"):
        losses.ce(hidden, torch.full((3, 5), 8), items)
    with pytest.raises(ValueError, match="disagree"):
        losses.ce(hidden, torch.ones(3, 4, dtype=torch.long), items)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.next_item_loss("hinge", hidden, torch.ones(3, 5, dtype=torch.long), items)
