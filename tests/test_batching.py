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
        assert b.tokens == sum(lengths[i] for i in b.indices)
        assert b.tokens <= budget or len(b.indices) == 1
        assert cap is None or len(b.indices) <= cap
        assert [lengths[i] for i in b.indices] == sorted((lengths[i] for i in b.indices), reverse=True)
    if cap is None:  # each batch is full: the next text would not have fit
        for b, nxt in zip(batches, batches[1:]):
            assert b.tokens + lengths[nxt.indices[0]] > budget


def test_an_item_longer_than_the_budget_gets_its_own_batch():
    batches = plan_batches([5, 900, 5], 100)
    assert [b.indices for b in batches] == [[1], [0, 2]]


@pytest.mark.parametrize("budget,cap", [(0, None), (10, 0)])
def test_bad_limits(budget, cap):
    with pytest.raises(ValueError):
        plan_batches([3], budget, cap)
