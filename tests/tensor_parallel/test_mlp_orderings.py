"""src/ch6/mlp_orderings.py: the four column/row orderings of a two-layer MLP, their collectives and results.

The expected collectives and bytes are worked out here from the shapes (what each layer's
flags imply), not read from the script; the results are the script's own comparison with
one process, which the second test shows failing when a collective is left out.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lessons_pkg.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src" / "ch6"))
import mlp_orderings  # noqa: E402

BATCH, SEQ, HIDDEN = 2, 4, 16


def _summary(outcomes):
    return {o.ordering: {"forward": dict(o.forward), "backward": dict(o.backward), "sent": o.sent_bytes,
                         "matches": o.matches, "errors": o.errors, "bounds": o.bounds} for o in outcomes}


def rank_main() -> dict:
    group = dist.group.WORLD
    outcomes = mlp_orderings.run_all(group, BATCH, SEQ, HIDDEN)
    by_name = {o.ordering: o for o in outcomes}
    plain, defaults = by_name["column -> row"], by_name["column -> row, gather + scatter"]
    import torch
    identical = all(torch.equal(plain.tensors[k], defaults.tensors[k]) for k in plain.tensors)
    return {"orderings": _summary(outcomes), "identical": identical,
            "cancels": mlp_orderings.gather_then_scatter_is_identity(group)}


def rank_main_without_f() -> dict:
    """The same, with f (identity forward, all-reduce of the gradient backward) replaced by the identity."""
    from lessons_pkg.tensor_parallel import layers
    layers.copy_to_tensor_model_parallel_region = lambda x, group: x
    return _summary(mlp_orderings.run_all(dist.group.WORLD, BATCH, SEQ, HIDDEN))


def expected(tp: int) -> dict:
    """Collectives and ring bytes per rank of each ordering, from what its two layers must do."""
    h = BATCH * SEQ * HIDDEN * 4            # bytes of one [b, s, h] float32 tensor
    f = 4 * h                               # [b, s, 4h]
    share = (tp - 1) / tp
    ar, ag = (lambda n: 2 * share * n), (lambda n: share * n)
    table = {  # forward, backward, bytes sent forward + backward
        "column -> row": ({"all_reduce": 1}, {"all_reduce": 1}, ar(h) + ar(h)),
        "column -> row, gather + scatter": ({"all_gather": 1, "all_reduce": 1}, {"all_gather": 1, "all_reduce": 1},
                                            2 * (ag(f) + ar(h))),
        "row -> column": ({"all_reduce": 1, "all_gather": 1}, {"all_reduce": 1, "all_gather": 1},
                          2 * (ar(f) + ag(h))),
        "column -> column": ({"all_gather": 2}, {"all_reduce": 2}, ag(f) + ag(h) + ar(f) + ar(h)),
        "row -> row": ({"all_reduce": 2}, {"all_gather": 2}, ar(f) + ar(h) + ag(f) + ag(h)),
    }
    return {k: {"forward": fw, "backward": bw, "sent": round(sent)} for k, (fw, bw, sent) in table.items()}


@pytest.mark.parametrize("tp", [2, 4])
def test_each_ordering_needs_its_collectives_and_matches_one_process(tp):
    results = run_on_ranks(rank_main, tp, timeout=120)
    want = expected(tp)
    assert set(want) == set(mlp_orderings.ORDERINGS)
    for rank, result in enumerate(results):
        assert result["cancels"] and result["identical"], f"rank {rank}: gather + scatter did not cancel: {result}"
        for name, got in result["orderings"].items():
            assert got["matches"], f"rank {rank}, {name}: errors {got['errors']} against bounds {got['bounds']}"
            counts = {"forward": {k: v for k, v in got["forward"].items() if v},
                      "backward": {k: v for k, v in got["backward"].items() if v}, "sent": got["sent"]}
            assert counts == want[name], f"rank {rank}, {name}: {counts}, expected {want[name]}"
    # Megatron's ordering communicates least: 1 collective each way, and 3x to 4.5x fewer bytes
    sent = {name: want[name]["sent"] for name in want}
    assert min(sent, key=sent.get) == "column -> row"


def test_a_missing_collective_fails_the_comparison():
    results = run_on_ranks(rank_main_without_f, 2, timeout=120)
    for rank, result in enumerate(results):
        for name, got in result.items():
            if name == "row -> row":   # no column-parallel layer, so no f to leave out: still right
                assert got["matches"], f"rank {rank}, {name}: {got['errors']}"
                continue
            assert not got["matches"], f"rank {rank}, {name}: passed without f's all-reduce: {got['errors']}"
            wrong = {k for k, e in got["errors"].items() if e > got["bounds"][k]}
            assert "x grad" in wrong, f"rank {rank}, {name}: the input gradient should be wrong: {got['errors']}"
            assert got["errors"]["x grad"] > 1e4 * got["bounds"]["x grad"], (name, got["errors"], got["bounds"])


def test_a_nan_or_inf_error_is_not_a_match():
    def outcome(error):
        return mlp_orderings.Outcome("column -> row", None, None, 0, {"output": error}, {"output": 1.0}, {})
    assert outcome(0.5).matches
    assert not outcome(math.nan).matches
    assert not outcome(math.inf).matches
