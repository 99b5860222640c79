import random

import pytest

from moee_fast.batching import plan_batches


@pytest.mark.parametrize("seed", range(5))
def test_every_item_once_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(8, 40)] * 3 + [rng.randint(100, 400)]) for _ in range(rng.randint(1, 300))]
    budget, cap = rng.choice([512, 2048, 4096]), rng.choice([None, 1, 7, 64])
    batches = plan_batches(lengths, budget, cap)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(lengths)))
    for b in batches:
        assert b.max_len == max(lengths[i] for i in b.indices)
        assert b.padded_tokens <= budget or len(b.indices) == 1
        assert cap is None or len(b.indices) <= cap


def test_padding_is_small_on_a_mixed_corpus():
    rng = random.Random(0)
    lengths = [rng.randint(8, 40) if i % 4 else rng.randint(100, 400) for i in range(2000)]
    batches = plan_batches(lengths, 4096)
    padded = sum(b.padded_tokens for b in batches)
    assert padded / sum(lengths) < 1.05  # input order with fixed batches pads several times more


def test_an_item_longer_than_the_budget_gets_its_own_batch():
    batches = plan_batches([5, 900, 5], 100)
    assert [b.indices for b in batches] == [[1], [0, 2]]


@pytest.mark.parametrize("budget,cap", [(0, None), (10, 0)])
def test_bad_limits(budget, cap):
    with pytest.raises(ValueError):
        plan_batches([3], budget, cap)
