"""The global sample order, each rank's slice of it, exact and elastic resume; launcher environment mapping."""

import pytest

from dist_ft.data.stream import GlobalOrder, SampleStream
from dist_ft.dist import env_from
from dist_ft.errors import UserError

SHARDS = [7, 13, 5, 11, 9]  # rows per shard: uneven on purpose (45 rows)


def _order(window: int = 8, seed: int = 7) -> GlobalOrder:
    return GlobalOrder(SHARDS, seed, window)


def _global(streams: list[SampleStream], steps: int) -> list[int]:
    """The global sequence: per step, rank 0's rows, then rank 1's, ..."""
    return [i for _ in range(steps) for s in streams for i in s.next_indices()]


@pytest.mark.parametrize("world,micro", [(1, 6), (2, 3), (3, 2), (2, 5), (3, 4)])
def test_ranks_partition_one_ordered_stream(world, micro):
    order = _order()
    seq = _global([SampleStream(order, micro, r, world) for r in range(world)], 20)
    assert seq == [order.row(g) for g in range(len(seq))]  # every world size walks the same stream
    span = micro * world
    for k in range(20):  # ranks hold disjoint rows in a step (one straddling two epochs may meet a row again)
        if (k * span) // 45 == ((k + 1) * span - 1) // 45:
            step = seq[k * span : (k + 1) * span]
            assert len(set(step)) == len(step)


def test_every_row_once_per_epoch_and_a_new_order_each_epoch():
    order = _order()
    n = sum(SHARDS)
    e0, e1 = [order.row(g) for g in range(n)], [order.row(g) for g in range(n, 2 * n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1


def test_shards_are_shuffled_as_units_then_rows_within_windows():
    starts = [0, 7, 20, 25, 36]
    shard_of = lambda row: max(i for i, s in enumerate(starts) if row >= s)  # noqa: E731
    order = GlobalOrder(SHARDS, seed=3, window=1)  # window 1: shard order only
    rows = [order.row(g) for g in range(45)]
    runs = [shard_of(r) for r in rows]
    # each shard one run
    assert [runs[0]] + [b for a, b in zip(runs, runs[1:], strict=False) if a != b] == sorted(
        set(runs), key=runs.index
    )
    assert runs != sorted(runs)  # the shard order is shuffled
    for k in range(5):  # rows within a shard stay in order with window 1
        mine = [r for r in rows if shard_of(r) == k]
        assert mine == sorted(mine)
    windowed = GlobalOrder(SHARDS, seed=3, window=8)
    pos = [windowed.row(g) for g in range(45)]
    for w in range(0, 45, 8):  # a window permutes exactly the rows the unwindowed order has there
        assert sorted(pos[w : w + 8]) == sorted(rows[w : w + 8]) and pos != rows


@pytest.mark.parametrize("stop_after", [1, 4, 9, 17])
def test_interrupt_restore_continues_the_exact_stream(stop_after):
    order = _order()
    ref = [SampleStream(order, 3, r, 2, "ds") for r in range(2)]
    reference = [[s.next_indices() for s in ref] for _ in range(30)]
    run = [SampleStream(_order(), 3, r, 2, "ds") for r in range(2)]
    for _ in range(stop_after):
        for s in run:
            s.next_indices()
    state = run[0].state_dict()
    resumed = [SampleStream(_order(), 3, r, 2, "ds") for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
    assert [[s.next_indices() for s in resumed] for _ in range(30 - stop_after)] == reference[stop_after:]


@pytest.mark.parametrize("new_world,new_micro", [(3, 2), (3, 3), (1, 4)])
def test_resume_on_another_world_size_keeps_the_global_order(new_world, new_micro):
    order = _order()
    before = [SampleStream(order, 3, r, 2, "ds") for r in range(2)]
    seq = _global(before, 5)  # 30 samples on 2 ranks
    after = [SampleStream(_order(), new_micro, r, new_world, "ds") for r in range(new_world)]
    for s in after:
        s.load_state_dict(before[0].state_dict())
    seq += _global(after, 12)
    assert seq == [order.row(g) for g in range(len(seq))]  # nothing skipped, nothing repeated
    n = sum(SHARDS)
    assert sorted(seq[:n]) == list(range(n))  # the epoch spanning the change still sees each row once


def test_state_from_other_data_is_refused():
    s = SampleStream(_order(), 2, 0, 1, "dataset-a")
    state = s.state_dict()
    with pytest.raises(UserError, match=r"other data \(dataset differ"):
        SampleStream(_order(), 2, 0, 1, "dataset-b").load_state_dict(state)
    with pytest.raises(UserError, match=r"n, seed differ"):
        SampleStream(GlobalOrder([3, 4], 9, 8), 2, 0, 1, "dataset-a").load_state_dict(state)


def test_global_batch_larger_than_the_data_is_refused():
    with pytest.raises(UserError, match=r"45 training rows but one global micro-batch needs 48"):
        SampleStream(_order(), 16, 0, 3)


def test_env_mapping_launchers():
    e = env_from(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 4, 1, "n1", 1234)
    s = env_from(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port) == (5, 8, 1, "gpu07", 24242)
    single = env_from({})
    assert (single.rank, single.world_size) == (0, 1)


def test_test_faults_come_from_the_environment_once():
    from dist_ft.faults import NONE, PAUSE_S, Faults

    assert Faults.from_env({}) == NONE == Faults.from_env({"DIST_FT_TEST_KILL_AT_STEP": " ", "OTHER": "1"})
    f = Faults.from_env(
        {
            "DIST_FT_TEST_KILL_AT_STEP": "7",
            "DIST_FT_TEST_PAUSE_IN_SAVE": "6",
            "DIST_FT_TEST_KILL_RANK_IN_SAVE": "2:1",
            "DIST_FT_TEST_CORRUPT_IN_SAVE": "4:1",
            "DIST_FT_TEST_KILL_AFTER_SHARD": "2",
            "DIST_FT_TEST_SLOW_TOKENS": "0.5",
            "DIST_FT_TEST_PAUSE_IN_SETUP": "120",
        }
    )
    assert f == Faults(
        kill_at_step=7,
        pause_in_save=(6, PAUSE_S),
        kill_rank_in_save=(2, 1),
        corrupt_in_save=(4, 1),
        kill_after_shard=2,
        slow_tokens=0.5,
        pause_in_setup=120.0,
    )
    assert Faults.from_env({"DIST_FT_TEST_PAUSE_IN_SAVE": "2:8"}).pause_in_save == (2, 8.0)
    for name, bad in [
        ("KILL_AT_STEP", "x"),
        ("PAUSE_IN_SAVE", "2:soon"),
        ("KILL_RANK_IN_SAVE", "2"),
        ("CORRUPT_IN_SAVE", "2:1:0"),
        ("SLOW_TOKENS", "-1"),
        ("PAUSE_IN_SETUP", "nan"),
    ]:
        with pytest.raises(UserError, match=f"DIST_FT_TEST_{name}='{bad}': expected"):
            Faults.from_env({f"DIST_FT_TEST_{name}": bad})
    for step in range(5):  # unset: every hook is a no-op
        (
            NONE.after_step(step, 0),
            NONE.in_save(step, 0, None),
            NONE.before_manifest(step),
            NONE.after_shard(step),
        )
    NONE.after_token(), NONE.in_setup()
