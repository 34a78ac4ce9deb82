"""The multi-rank harness itself: results come back in rank order, errors and hangs fail fast."""
import time

import pytest
import torch
import torch.distributed as dist

from lessons_pkg import testing
from lessons_pkg.testing import RankError, RankStartError, RankTimeout, run_on_ranks


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_in_rank_order(world_size):
    results = run_on_ranks(_all_reduce_rank, world_size)
    expected_sum = sum(range(world_size))
    assert results == [(r, float(expected_sum)) for r in range(world_size)]


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the harness


def test_failing_rank_shows_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_on_ranks(_rank_one_raises, 2, timeout=30)
    assert "rank 1 of 2 failed" in str(info.value)
    assert "deliberate failure on rank 1" in str(info.value)
    assert time.monotonic() - start < 25


def _rank_one_hangs():
    if dist.get_rank() == 1:
        time.sleep(3600)  # a rank that never joins the collective
    dist.barrier()


def test_hung_rank_fails_within_timeout():
    timeout = 3
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_on_ranks(_rank_one_hangs, 2, timeout=timeout)
    elapsed = time.monotonic() - start
    # either the harness's deadline or gloo's own collective timeout (set to the same value) ends it
    assert elapsed < timeout + 10, f"took {elapsed:.1f} s for a {timeout} s timeout"
    assert isinstance(info.value, RankTimeout) or "rank 0" in str(info.value)


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_on_ranks(_all_reduce_rank, 0)


def _big_tensor_then_exit():
    # 4 MB; before the fix any tensor crossed the queue as a shared-memory handle, whatever its size
    return torch.full((1 << 20,), float(dist.get_rank()))


def test_returned_tensors_survive_their_rank_exiting():
    """A rank returns a tensor and exits at once: the parent still gets the values (they travel by value)."""
    for _ in range(3):
        results = run_on_ranks(_big_tensor_then_exit, 2)
        assert [r.shape for r in results] == [(1 << 20,)] * 2
        assert all(torch.equal(r, torch.full((1 << 20,), float(k))) for k, r in enumerate(results))


def _returns_a_lambda():
    return lambda: None


def test_a_result_that_cannot_be_pickled_is_the_rank_s_error():
    with pytest.raises(RankError, match="rank 0 of 1 failed"):
        run_on_ranks(_returns_a_lambda, 1, timeout=30)


def _failing_start_on_rank_one(marker, message):
    """dist.init_process_group, except that rank 1's first call in this test raises ``message``
    (counted in ``marker``): a start-up failure before fn, as gloo's mesh connect flake is."""
    real = dist.init_process_group

    def init(*args, **kwargs):
        if kwargs.get("rank") == 1:
            with open(marker, "a") as f:
                f.write("x")
            if len(open(marker).read()) == 1:
                raise RuntimeError(message)
        return real(*args, **kwargs)

    return init


@pytest.mark.skipif(testing._start_method() != "fork", reason="the patched start-up reaches the ranks by fork only")
def test_gloo_mesh_flake_at_start_up_is_retried_once_and_says_so(tmp_path, monkeypatch):
    marker = tmp_path / "starts"
    flake = "Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer [127.0.0.1]:1 (simulated)"
    monkeypatch.setattr(dist, "init_process_group", _failing_start_on_rank_one(marker, flake))
    with pytest.warns(UserWarning, match="starting again once, after gloo's start-up failed"):
        assert run_on_ranks(_all_reduce_rank, 2, timeout=30) == [(0, 1.0), (1, 1.0)]
    assert marker.read_text() == "xx"  # rank 1 started twice: the failed job, then the whole job again


@pytest.mark.skipif(testing._start_method() != "fork", reason="the patched start-up reaches the ranks by fork only")
def test_any_other_start_up_failure_is_not_retried(tmp_path, monkeypatch):
    marker = tmp_path / "starts"
    monkeypatch.setattr(dist, "init_process_group", _failing_start_on_rank_one(marker, "bad backend (simulated)"))
    with pytest.raises(RankStartError, match=r"rank 1 of 2 failed to start:(.|\n)*bad backend \(simulated\)"):
        run_on_ranks(_all_reduce_rank, 2, timeout=30)
    assert marker.read_text() == "x"
