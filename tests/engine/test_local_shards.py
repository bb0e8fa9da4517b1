"""cache.local_shards: each process draws only the images of the teacher cache's shards it built (s % world == rank),
the same number on every process, reshuffled each epoch and resumable mid-epoch."""

from pand.engine.data import EpochSampler, MixedEpochSampler


def _keys(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler]


def test_each_rank_draws_only_its_own_shards_the_same_number_of_times():
    size, shard = 22, 4  # shards 0..5, the last one of 2 images
    ranks = [EpochSampler(size, seed=3, rank=r, world_size=2, shard_size=shard) for r in (0, 1)]
    keys = [_keys(s) for s in ranks]
    assert {i // shard % 2 for i in keys[0]} == {0} and {i // shard % 2 for i in keys[1]} == {1}
    # rank 0 holds shards 0, 2, 4 (12 images), rank 1 shards 1, 3, 5 (10): both take 10 with drop_last
    assert len(keys[0]) == len(keys[1]) == len(ranks[0]) == 10
    assert len(set(keys[1])) == 10 and set(keys[1]) == {4, 5, 6, 7, 12, 13, 14, 15, 20, 21}
    assert _keys(ranks[0], epoch=1) != keys[0]  # reshuffled per epoch
    padded = EpochSampler(size, seed=3, rank=1, world_size=2, shard_size=shard, drop_last=False)
    assert len(_keys(padded)) == 12 and set(_keys(padded)) == set(keys[1])  # cycled up to the longer share


def test_one_process_or_no_shard_size_keeps_the_global_shuffle():
    assert EpochSampler(10, seed=0, shard_size=4)._keys() == EpochSampler(10, seed=0)._keys()
    global_order = EpochSampler(12, seed=1, rank=1, world_size=2)._keys()
    assert {i // 4 % 2 for i in global_order} == {0, 1}


def test_a_mid_epoch_resume_continues_the_same_local_order():
    whole = EpochSampler(40, seed=5, rank=1, world_size=2, shard_size=8)
    keys = _keys(whole, epoch=2)
    resumed = EpochSampler(40, seed=5, rank=1, world_size=2, shard_size=8)
    resumed.resume_at(2, 7)
    assert [i for i, _ in resumed] == keys[7:]


def test_mixed_batches_split_the_unlabelled_images_by_their_pool_shards():
    # pool: 6 labelled (indices 0-5), then 30 unlabelled (6-35); shards of 8 pool indices
    ranks = [MixedEpochSampler(6, 30, batch_size=4, labelled_per_batch=1, seed=0, rank=r, world_size=2,
                               shard_size=8) for r in (0, 1)]
    for rank, sampler in enumerate(ranks):
        keys = _keys(sampler)
        unlabelled = [i for i in keys if i >= 6]
        assert unlabelled and {i // 8 % 2 for i in unlabelled} == {rank}
        assert len(keys) == len(ranks[0])
