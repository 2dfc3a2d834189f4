"""Per-rank data partition and launcher environment mapping."""

from dist_ft.data.dataset import BatchStream
from dist_ft.dist import env_from


def _global_sequence(world: int, micro: int, steps: int, n: int = 50) -> list[list[int]]:
    streams = [BatchStream(n, micro, r, world, seed=7) for r in range(world)]
    return [[i for s in streams for i in s.next_indices()] for _ in range(steps)]


def test_ranks_partition_the_same_global_order():
    one = _global_sequence(1, 4, 30)
    two = _global_sequence(2, 2, 30)
    assert one == two  # 2 ranks x 2 = 1 rank x 4: identical global batches
    for batch in two:
        assert len(set(batch)) == len(batch)  # no two ranks share an example within a step


def test_epoch_covers_every_item_once_and_reshuffles():
    s = BatchStream(48, 4, 0, 1, seed=3)
    epoch0 = [i for _ in range(12) for i in s.next_indices()]
    epoch1 = [i for _ in range(12) for i in s.next_indices()]
    assert sorted(epoch0) == sorted(epoch1) == list(range(48)) and epoch0 != epoch1


def test_state_round_trip():
    a = BatchStream(40, 3, 1, 2, seed=1)
    for _ in range(9):
        a.next_indices()
    b = BatchStream(40, 3, 1, 2, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(10)] == [b.next_indices() for _ in range(10)]


def test_env_mapping_launchers():
    e = env_from({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 4, 1, "n1", 1234)
    s = env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port) == (5, 8, 1, "gpu07", 24242)
    single = env_from({})
    assert (single.rank, single.world_size) == (0, 1)
