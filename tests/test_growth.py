"""The grow decision: made by rank 0, the same on every rank, only when more workers would train."""

import pytest

from raytitan.trainer.elastic.growth import GrowthCheck, new_control_group, read_grow_request, request_grow

from tests.helpers import spawn


def _decisions(rank: int, world: int) -> dict:
    asked = []

    def spare(most):
        asked.append(most)
        return 2 if rank == 0 else 0  # only rank 0's answer may count

    def check(interval_s, trained_by, max_world=4):
        return GrowthCheck(new_control_group(), world, max_world, interval_s, spare, trained_by)

    grows = check(0.0, lambda n: n)
    useless = check(0.0, lambda n: min(n, 2))  # a layout that cannot use more than 2 workers
    too_soon = check(3600.0, lambda n: n)
    full = check(0.0, lambda n: n, max_world=world)
    return {"grows": [grows(4), grows.target], "useless": useless(4), "too_soon": too_soon(4),
            "full": full(4), "asked": asked}


@pytest.mark.slow
def test_rank_zero_decides_for_every_rank_and_only_when_more_workers_would_train(tmp_path):
    results = spawn(_decisions, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["grows"] == [True, 4], (rank, r)
        assert (r["useless"], r["too_soon"], r["full"]) == (False, False, False), (rank, r)
    assert results[0]["asked"] == [2, 2]  # the capacity is probed for the missing workers, not sooner
    assert results[1]["asked"] == []


def test_a_grow_request_counts_only_after_the_attempt_that_made_it(tmp_path):
    assert read_grow_request(str(tmp_path)) is None
    request_grow(str(tmp_path), step=6, world=3, target=4)
    request = read_grow_request(str(tmp_path))
    assert (request["step"], request["world"], request["target"]) == (6, 3, 4)
    assert read_grow_request(str(tmp_path), since=request["time"] + 1) is None
