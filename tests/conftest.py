import os

import pytest

from raytitan.components.data.synthetic import ensure_synthetic_shards

# Ray Train's controller polls its workers every 2 s by default: each start, failure and finish of
# a run waits up to that long to be noticed. Every Ray instance the tests start inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Nothing is preempted here: no watcher actor (one more process per run, polling every 5 s).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A small seeded C4-format corpus shared by the whole session."""
    folder = str(tmp_path_factory.mktemp("c4"))
    ensure_synthetic_shards(folder, seed=0, num_shards=4, docs_per_shard=300)
    return folder


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    # Never write generated data into the user's cache from tests.
    monkeypatch.setenv("RAYTITAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module (2 CPUs, as on the CI machine), started as
    raytitan starts one: on 127.0.0.1 only, with token authentication."""
    import ray  # here, so the tests that need no Ray run where it is not installed (a GPU box)

    from raytitan.ray.launcher import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=True, include_dashboard=False)
    yield
    ray.shutdown()
