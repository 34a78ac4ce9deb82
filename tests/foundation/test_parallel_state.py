"""Process groups in Megatron-LM's rank order, checked on real ranks."""
import pytest
import torch
import torch.distributed as dist

from lessons_pkg import parallel_state as ps
from lessons_pkg.testing import run_on_ranks


def test_rank_grid_matches_megatron_example():
    # the example of Megatron-LM's docs: 16 GPUs, TP=2, PP=4 -> DP=2
    grid = ps.rank_grid(16, tp=2, pp=4)
    assert grid["tensor"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert grid["pipeline"][:2] == [[0, 4, 8, 12], [1, 5, 9, 13]]
    assert grid["data"][:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid["embedding"][0] == [0, 12]


@pytest.mark.parametrize("world,tp,pp", [(8, 2, 2), (4, 4, 1), (4, 1, 4), (6, 3, 2)])
def test_every_rank_in_exactly_one_group_of_each_kind(world, tp, pp):
    grid = ps.rank_grid(world, tp, pp)
    for kind in ("tensor", "data", "pipeline"):
        flat = sorted(r for g in grid[kind] for r in g)
        assert flat == list(range(world)), kind
    assert all(len(g) == tp for g in grid["tensor"])
    assert all(len(g) == pp for g in grid["pipeline"])
    assert all(len(g) == world // (tp * pp) for g in grid["data"])


@pytest.mark.parametrize("world,tp,pp,msg", [
    (6, 4, 1, r"world size \(6\) is not divisible by tensor_model_parallel_size \(4\) x pipeline_model_parallel_size \(1\)"),
    (8, 3, 2, r"world size \(8\) is not divisible .* \(3\) .* \(2\) = 6"),
    (4, 0, 1, r"tensor_model_parallel_size must be a positive integer, got 0"),
    (4, 1, 0, r"pipeline_model_parallel_size must be a positive integer, got 0"),
])
def test_bad_sizes_raise_naming_the_numbers(world, tp, pp, msg):
    with pytest.raises(ValueError, match=msg):
        ps.check_parallel_sizes(world, tp, pp)


def _groups_on_rank(tp, pp):
    ps.initialize_model_parallel(tp, pp)
    # a collective on each group proves the group works, not only that it exists
    out = {}
    for kind, group in (("tensor", ps.get_tensor_model_parallel_group()),
                        ("pipeline", ps.get_pipeline_model_parallel_group()),
                        ("data", ps.get_data_parallel_group())):
        t = torch.tensor([dist.get_rank()])
        members = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(members, t, group=group)
        out[kind] = [int(m) for m in members]
    out["ranks"] = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_data_parallel_rank())
    out["sizes"] = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                    ps.get_data_parallel_world_size())
    out["first_last"] = (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    out["next_prev"] = (ps.get_pipeline_model_parallel_next_rank(), ps.get_pipeline_model_parallel_prev_rank())
    return out


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2), (4, 4, 1), (8, 2, 2)])
def test_groups_on_real_ranks(world, tp, pp):
    results = run_on_ranks(_groups_on_rank, world, args=(tp, pp), timeout=120)
    grid = ps.rank_grid(world, tp, pp)
    dp = world // (tp * pp)
    for rank, got in enumerate(results):
        for kind in ("tensor", "pipeline", "data"):
            expected = next(g for g in grid[kind] if rank in g)
            assert got[kind] == expected, (rank, kind)
        tp_rank, pp_rank, dp_rank = got["ranks"]
        assert rank == tp_rank + tp * (dp_rank + dp * pp_rank)
        assert got["sizes"] == (tp, pp, dp)
        assert got["first_last"] == (pp_rank == 0, pp_rank == pp - 1)
        pipe = next(g for g in grid["pipeline"] if rank in g)
        assert got["next_prev"] == (pipe[(pp_rank + 1) % pp], pipe[(pp_rank - 1) % pp])


def _init_with_bad_sizes():
    ps.initialize_model_parallel(tensor_model_parallel_size=4)


def test_initialize_rejects_indivisible_world_before_creating_groups():
    from lessons_pkg.testing import RankError

    with pytest.raises(RankError, match=r"world size \(2\) is not divisible by tensor_model_parallel_size \(4\)"):
        run_on_ranks(_init_with_bad_sizes, 2, timeout=30)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("LESSONS_BACKEND", raising=False)
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert ps.default_backend() == expected
    monkeypatch.setenv("LESSONS_BACKEND", "gloo")
    assert ps.default_backend() == "gloo"


def test_init_without_torchrun_environment_says_how_to_launch(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="start this program with torchrun"):
        ps.init_distributed()
