import random

import pytest

from moee_fast.packing import plan_batches


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


def test_padded_plans_bound_the_skewed_batch_that_real_token_plans_blow_up():
    """One 512-token text and 4,032 8-token texts: 32,768 real tokens, one batch when only real
    tokens count, but 2.06M padded slots for the padded attention."""
    lengths = [8] * 2000 + [512] + [8] * 2032
    (real,) = plan_batches(lengths, 32768)
    assert real.tokens == 32768 and real.slots == 4033 * 512
    padded = plan_batches(lengths, 32768, count_padding=True)
    assert sorted(i for b in padded for i in b.indices) == list(range(len(lengths)))
    assert [len(b.indices) for b in padded] == [64, 3969]  # the long text with 63 short ones, then the rest
    assert [b.slots for b in padded] == [64 * 512, 3969 * 8]
    assert sum(b.slots for b in padded) <= 2 * 32768


@pytest.mark.parametrize("seed", range(5))
def test_padded_plans_keep_batch_size_times_longest_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 30), rng.randint(100, 700)]) for _ in range(rng.randint(1, 400))]
    budget, cap = rng.choice([256, 1024, 4096]), rng.choice([None, 5, 64])
    batches = plan_batches(lengths, budget, cap, count_padding=True)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(lengths)))
    for b in batches:
        assert b.slots == len(b.indices) * max(lengths[i] for i in b.indices)
        assert b.slots <= budget or len(b.indices) == 1
        assert cap is None or len(b.indices) <= cap
    if cap is None:  # each batch is full: one more text would have passed the budget
        for b, nxt in zip(batches, batches[1:]):
            assert (len(b.indices) + 1) * lengths[b.indices[0]] > budget
