"""Batches mixing labelled and unlabelled images: composition, one pass over the unlabelled images per epoch, the
labelled pool cycled evenly, shards across processes, and exact mid-epoch resumption."""

from collections import Counter

import pytest

from pand.engine.data import MixedEpochSampler
from pand.errors import ConfigError

NL, NU, B, L = 5, 40, 8, 2


def _batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    keys = [index for index, e in sampler if e == epoch]
    return [keys[i : i + B] for i in range(0, len(keys), B)]


def test_each_batch_is_its_labelled_share_then_unlabelled_images():
    batches = _batches(MixedEpochSampler(NL, NU, B, L, seed=0))
    assert len(batches) == NU // (B - L)
    for batch in batches:
        assert len(batch) == B
        assert all(i < NL for i in batch[:L]) and all(i >= NL for i in batch[L:])


def test_an_epoch_is_one_pass_over_the_unlabelled_images_and_cycles_the_labelled_pool_evenly():
    batches = _batches(MixedEpochSampler(NL, NU, B, L, seed=0, drop_last=False))
    unlabelled = [i for b in batches for i in b if i >= NL]
    assert sorted(unlabelled) == list(range(NL, NL + NU))  # each exactly once, the last batch partial
    counts = Counter(i for b in batches for i in b if i < NL)
    assert set(counts) == set(range(NL)) and max(counts.values()) - min(counts.values()) <= 1


def test_orders_are_seeded_by_seed_and_epoch():
    a = _batches(MixedEpochSampler(NL, NU, B, L, seed=0))
    assert a == _batches(MixedEpochSampler(NL, NU, B, L, seed=0))
    assert a != _batches(MixedEpochSampler(NL, NU, B, L, seed=0), epoch=1)
    assert a != _batches(MixedEpochSampler(NL, NU, B, L, seed=1))


def test_processes_get_disjoint_unlabelled_shares():
    shares = [[i for b in _batches(MixedEpochSampler(NL, NU, B, L, seed=0, rank=r, world_size=2)) for i in b
               if i >= NL] for r in (0, 1)]
    assert set(shares[0]).isdisjoint(shares[1]) and len(shares[0]) == len(shares[1])


def test_a_mid_epoch_resume_yields_exactly_the_rest_of_the_epoch():
    whole = [k for k in _flat(MixedEpochSampler(NL, NU, B, L, seed=3), epoch=2)]
    resumed = MixedEpochSampler(NL, NU, B, L, seed=3)
    resumed.resume_at(2, 3 * B)
    assert _flat(resumed, epoch=2) == whole[3 * B :]


def _flat(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_label_free_batches_are_all_unlabelled_and_a_full_labelled_batch_is_refused():
    batches = _batches(MixedEpochSampler(0, NU, B, 3, seed=0))
    assert all(i >= 0 for b in batches for i in b) and len(batches) == NU // B
    with pytest.raises(ConfigError, match="no room"):
        MixedEpochSampler(NL, NU, B, B, seed=0)
