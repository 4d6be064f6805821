"""Tests for seq2seq.batching: length filtering, deterministic bucketed batch plans, padding."""

import numpy as np
import pytest

from seq2seq.batching import filter_by_length, padding_fraction, plan_batches


def sentence_lengths(count=5000, seed=0):
    """Token counts shaped like caption/news sentences: skewed, mostly 5-30, a long tail."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=2.5, sigma=0.5, size=count).astype(np.int64), 1, 120)


def assert_partition(batches, count):
    all_indices = np.concatenate(batches)
    assert all_indices.size == count
    np.testing.assert_array_equal(np.sort(all_indices), np.arange(count))


def test_filter_by_length_drops_long_and_empty_pairs():
    src = [3, 0, 10, 4, 5, 7]
    tgt = [2, 4, 3, 0, 9, 7]
    kept, dropped = filter_by_length(src, tgt, max_src_length=7, max_tgt_length=8)
    assert kept.tolist() == [0, 5]
    assert dropped == 4
    kept, dropped = filter_by_length(src, tgt, None, None)
    assert kept.tolist() == [0, 2, 4, 5]
    assert dropped == 2


def test_filter_by_length_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="differ in size: 2 vs 3"):
        filter_by_length([1, 2], [1, 2, 3], 5, 5)


def test_same_seed_and_epoch_give_identical_plans():
    lengths = sentence_lengths()
    first = plan_batches(lengths, batch_size=32, seed=7, epoch=3)
    second = plan_batches(lengths.copy(), batch_size=32, seed=7, epoch=3)
    assert len(first) == len(second)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_different_epochs_and_seeds_give_different_orders():
    lengths = sentence_lengths()
    plans = [
        np.concatenate(plan_batches(lengths, batch_size=32, seed=seed, epoch=epoch))
        for seed, epoch in [(7, 0), (7, 1), (8, 0)]
    ]
    assert not np.array_equal(plans[0], plans[1])
    assert not np.array_equal(plans[0], plans[2])


@pytest.mark.parametrize("options", [dict(batch_size=32), dict(max_tokens=500), dict(batch_size=7, bucket_width=5)])
def test_every_index_appears_exactly_once(options):
    lengths = sentence_lengths(3001)
    assert_partition(plan_batches(lengths, seed=1, epoch=2, **options), lengths.size)


def test_batch_size_plan_has_full_batches_except_one():
    lengths = sentence_lengths(1000)
    sizes = [len(batch) for batch in plan_batches(lengths, batch_size=32, seed=0, epoch=0, chunk_batches=4)]
    assert sorted(sizes)[1:] == [32] * (len(sizes) - 1)
    assert sum(sizes) == 1000


def test_max_tokens_caps_padded_batch_and_keeps_overlong_examples_alone():
    lengths = np.concatenate([sentence_lengths(2000), [900, 1200]])
    batches = plan_batches(lengths, max_tokens=400, seed=3, epoch=0)
    assert_partition(batches, lengths.size)
    for batch in batches:
        padded = len(batch) * lengths[batch].max()
        assert padded <= 400 or len(batch) == 1
    overlong = [batch.tolist() for batch in batches if lengths[batch].max() > 400]
    assert sorted(overlong) == [[2000], [2001]]


def test_unshuffled_plan_is_independent_of_seed_and_epoch():
    lengths = sentence_lengths(500)
    first = plan_batches(lengths, batch_size=16, seed=1, epoch=0, shuffle=False)
    second = plan_batches(lengths, batch_size=16, seed=99, epoch=5, shuffle=False)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    plain = plan_batches(lengths, batch_size=16, seed=1, epoch=0, shuffle=False, sort_by_length=False)
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(500))


def test_bucketing_reduces_padding_by_a_clear_margin():
    lengths = sentence_lengths(20000)
    unbucketed = plan_batches(lengths, batch_size=64, seed=0, epoch=0, sort_by_length=False)
    bucketed = plan_batches(lengths, batch_size=64, seed=0, epoch=0)
    coarse = plan_batches(lengths, batch_size=64, seed=0, epoch=0, bucket_width=4)
    assert padding_fraction(lengths, unbucketed) > 0.4
    assert padding_fraction(lengths, bucketed) < 0.05
    assert padding_fraction(lengths, bucketed) < padding_fraction(lengths, coarse) < 0.2


def test_bucket_width_keeps_shuffled_order_within_a_bucket():
    lengths = np.array([10, 11, 12, 13] * 50)
    exact = np.concatenate(plan_batches(lengths, batch_size=200, seed=0, epoch=0))
    bucketed = np.concatenate(plan_batches(lengths, batch_size=200, seed=0, epoch=0, bucket_width=4))
    assert np.all(np.diff(lengths[exact]) >= 0)
    assert np.any(np.diff(lengths[bucketed]) < 0)


def test_padding_fraction_counts_padded_slots():
    lengths = np.array([2, 4, 4, 4])
    assert padding_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(2 / 16)
    assert padding_fraction(lengths, [np.array([1, 2, 3])]) == 0.0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(), "exactly one of batch_size and max_tokens"),
        (dict(batch_size=4, max_tokens=10), "exactly one of batch_size and max_tokens"),
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(max_tokens=4, bucket_width=0), "bucket_width must be positive"),
    ],
)
def test_plan_batches_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        plan_batches([1, 2, 3], seed=0, epoch=0, **options)


def test_plan_batches_rejects_bad_lengths():
    with pytest.raises(ValueError, match="non-negative"):
        plan_batches([3, -1], batch_size=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="1-D"):
        plan_batches([[1, 2]], batch_size=2, seed=0, epoch=0)
    assert plan_batches([], batch_size=2, seed=0, epoch=0) == []
