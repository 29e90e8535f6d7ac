"""The grow decision: made by rank 0, the same on every rank, only when more workers would train."""

import json
import logging
import os
import time
import types

import pytest

from raytitan.config.job import JobConfig
from raytitan.trainer.elastic import growth
from raytitan.trainer.elastic.growth import (GROW_FILE, GrowRequestError, GrowthCheck, new_control_group,
                                             read_grow_request, request_grow)
from raytitan.trainer.elastic.history import read_starts, record_start, write_progress

from tests.helpers import spawn, tiny_config


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


def test_a_grow_request_belongs_to_the_attempt_that_made_it_whatever_the_clocks_say(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    assert read_grow_request(run_dir) is None and read_grow_request(run_dir, attempt="a1") is None
    # Made on a worker whose clock runs an hour behind the driver's: only the attempt id counts.
    monkeypatch.setattr(growth, "time", types.SimpleNamespace(time=lambda: time.time() - 3600))
    request_grow(run_dir, step=6, world=3, target=4, attempt="a1")
    request = read_grow_request(run_dir, attempt="a1")
    assert (request["step"], request["world"], request["target"], request["attempt"]) == (6, 3, 4, "a1")
    assert read_grow_request(run_dir, attempt="a2") is None  # an earlier attempt's request: stale
    assert read_grow_request(run_dir)["attempt"] == "a1"  # without an attempt: whatever is there


@pytest.mark.parametrize("content", ["{\"step\": 6, \"wor", "[1, 2]", "{\"step\": 6}"])
def test_a_corrupt_grow_request_is_an_error_naming_the_file(tmp_path, content):
    (tmp_path / GROW_FILE).write_text(content)
    with pytest.raises(GrowRequestError, match=f"{tmp_path / GROW_FILE}"):
        read_grow_request(str(tmp_path), attempt="a1")


def start(run_dir, attempt, started_at, resumed_step=None):
    return record_start(run_dir, os.path.join(run_dir, "checkpoint"), started_at=started_at, world=2, active=2,
                        dp=2, local_batch=1, accumulation=1, resumed_step=resumed_step, target_steps=8, timings={},
                        attempt=attempt)


def test_the_restart_history_names_growth_by_attempt_not_by_clock(tmp_path, monkeypatch, caplog):
    run_dir = str(tmp_path)
    assert start(run_dir, "a1", started_at=1000.0)["cause"] == "first start"
    write_progress(run_dir, 4)
    # The group of attempt a1 stopped to grow on a node whose clock is far behind the others'.
    monkeypatch.setattr(growth, "time", types.SimpleNamespace(time=lambda: 10.0))
    request_grow(run_dir, step=4, world=2, target=4, attempt="a1")
    grown = start(run_dir, "a2", started_at=1001.0, resumed_step=4)
    assert grown["cause"].startswith("grew after the checkpoint of step 4") and grown["lost_steps"] == 0
    assert grown["attempt"] == "a2" and grown["seconds_since_failure"] is None
    write_progress(run_dir, 6)
    lost = start(run_dir, "a2", started_at=1002.0, resumed_step=4)  # Ray restarted a2's group: no growth
    assert lost["cause"].startswith("worker group restarted") and lost["lost_steps"] == 2

    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)
    (tmp_path / GROW_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        unknown = start(run_dir, "a3", started_at=1003.0, resumed_step=4)
    assert f"{tmp_path / GROW_FILE}" in caplog.text and "whether the previous group stopped to grow" in caplog.text
    assert unknown["cause"].startswith("worker group restarted")  # told by the progress marker
    assert len(read_starts(run_dir)) == 4


# --------------------------------------------------------------------------- the launcher's side


def test_the_launcher_check_accepts_a_run_that_reached_its_steps(tmp_path, data_dir):
    from raytitan.ray.launcher import TrainingFailed, check_reached_steps

    config = tiny_config(str(tmp_path), data_dir, training={"steps": 8}).with_absolute_paths()
    os.makedirs(config.run_dir)
    with pytest.raises(TrainingFailed, match=r"(?s)no step.*training.steps = 8.*run the same command again"):
        check_reached_steps(config)  # nothing trained
    write_progress(config.run_dir, 4)
    with pytest.raises(TrainingFailed) as stopped:
        check_reached_steps(config)
    message = str(stopped.value)
    assert "stopped at step 4" in message and "training.steps = 8" in message
    assert "no committed checkpoint" in message and "run the same command again" in message
    commit(config, 4)
    with pytest.raises(TrainingFailed, match=r"newest committed checkpoint: .*step-4; run the same command again "
                                             r"to resume from it"):
        check_reached_steps(config)
    write_progress(config.run_dir, 8)
    assert check_reached_steps(config) == 8
    write_progress(config.run_dir, 9)  # a run that went past a lowered training.steps is done too
    assert check_reached_steps(config) == 9


def test_the_launcher_check_falls_back_on_committed_steps_when_the_marker_is_corrupt(tmp_path, data_dir, caplog,
                                                                                  monkeypatch):
    from raytitan.ray.launcher import TrainingFailed, check_reached_steps

    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)
    config = tiny_config(str(tmp_path), data_dir, training={"steps": 8}).with_absolute_paths()
    os.makedirs(config.run_dir)
    with open(os.path.join(config.run_dir, "progress.json"), "w") as f:
        f.write('{"step": 8, "ti')
    commit(config, 6)
    with caplog.at_level(logging.WARNING, logger="raytitan"), pytest.raises(TrainingFailed, match="step 6"):
        check_reached_steps(config)
    assert os.path.join(config.run_dir, "progress.json") in caplog.text
    commit(config, 8)
    assert check_reached_steps(config) == 8  # the final save's commit proves it


def commit(config, step: int) -> None:
    folder = os.path.join(config.run_dir, config.checkpoint.folder, f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "COMMITTED"), "w") as f:
        json.dump({"step": step}, f)


class FakeTrainer:
    """Ray Train's TorchTrainer, without Ray: each ``fit`` plays the next scripted attempt of the
    workers (given the run's config and the loop config the launcher passed them)."""

    def __init__(self, attempts: list, train_loop_per_worker, train_loop_config: dict, **kwargs):
        self.attempts, self.loop_config = attempts, train_loop_config

    def fit(self):
        self.attempts.pop(0)(JobConfig.from_dict(self.loop_config["config"]), self.loop_config)
        return types.SimpleNamespace(metrics={}, checkpoint=None, error=None)


@pytest.fixture
def launch_without_ray(monkeypatch):
    """``launcher.launch`` with Ray's parts faked: returns (result, how many attempts ran)."""
    from raytitan.ray import launcher

    actor = types.SimpleNamespace(warm_start=types.SimpleNamespace(remote=lambda: None))
    feeder = types.SimpleNamespace(options=lambda **kw: types.SimpleNamespace(remote=lambda *a, **k: actor))
    monkeypatch.setattr(launcher, "setup_logging", lambda rank: None)
    monkeypatch.setattr(launcher, "_connect", lambda config: None)
    monkeypatch.setattr(launcher, "_worker_resources", lambda config: {"CPU": 1.0})
    monkeypatch.setattr(launcher, "_refresh_ray_cluster_view", lambda: None)
    monkeypatch.setattr(launcher, "NodeAffinitySchedulingStrategy", lambda node, soft: None)
    monkeypatch.setattr(launcher.ray, "remote", lambda cls: feeder)
    monkeypatch.setattr(launcher.ray, "kill", lambda actor: None)
    node = "ab" * 28  # a node id of Ray's form (the relays' scheduling strategy checks it)
    monkeypatch.setattr(launcher.ray, "nodes", lambda: [{"NodeID": node, "Alive": True}])  # one node: one relay
    monkeypatch.setattr(launcher.ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: node))

    def launch(config, attempts: list):
        script = list(attempts)
        monkeypatch.setattr(launcher, "TorchTrainer", lambda *a, **k: FakeTrainer(script, *a, **k))
        result = launcher.launch(config)
        return result, len(attempts) - len(script)

    return launch


def elastic_config(tmp_path, data_dir):
    return tiny_config(str(tmp_path), data_dir, training={"steps": 8, "global_batch_size": 8, "local_batch_size": 2},
                       checkpoint={"interval": 4}, ray={"num_workers": 2, "min_workers": 1, "max_workers": 2},
                       metrics={"progress_bar": "off"})


def test_a_run_that_stops_short_of_its_steps_fails_clearly(tmp_path, data_dir, launch_without_ray):
    """The workers stopped at the step-4 checkpoint to grow, but no grow request reached the
    launcher: it must not report success."""
    from raytitan.ray.launcher import TrainingFailed

    def stops_at_the_boundary(config, loop_config):
        write_progress(config.run_dir, 4)

    with pytest.raises(TrainingFailed, match=r"(?s)stopped at step 4 .*training.steps = 8.*run the same command again"):
        launch_without_ray(elastic_config(tmp_path, data_dir), [stops_at_the_boundary])


def test_the_launcher_grows_on_this_attempts_request_even_with_a_worker_clock_behind(
        tmp_path, data_dir, launch_without_ray, monkeypatch, capsys):
    attempts = []

    def grows(config, loop_config):
        attempts.append(loop_config["attempt"])
        write_progress(config.run_dir, 4)
        monkeypatch.setattr(growth, "time", types.SimpleNamespace(time=lambda: time.time() - 3600))
        request_grow(config.run_dir, step=4, world=1, target=2, attempt=loop_config["attempt"])

    def finishes(config, loop_config):
        attempts.append(loop_config["attempt"])
        write_progress(config.run_dir, 8)

    _, ran = launch_without_ray(elastic_config(tmp_path, data_dir), [grows, finishes])
    assert ran == 2 and attempts[0] != attempts[1]
    assert "growing: step 4 is committed" in capsys.readouterr().out


def test_a_stale_grow_request_does_not_start_another_attempt(tmp_path, data_dir, launch_without_ray, monkeypatch):
    config = elastic_config(tmp_path, data_dir)
    run_dir = config.with_absolute_paths().run_dir
    os.makedirs(run_dir)
    # Left by an earlier launch, on a worker whose clock runs an hour ahead of the driver's.
    monkeypatch.setattr(growth, "time", types.SimpleNamespace(time=lambda: time.time() + 3600))
    request_grow(run_dir, step=4, world=1, target=2, attempt="earlier")

    def finishes(config, loop_config):
        write_progress(config.run_dir, 8)

    _, ran = launch_without_ray(config, [finishes, finishes])
    assert ran == 1


def test_a_size_no_layout_fits_trains_no_workers_and_the_log_says_why(tmp_path, caplog, monkeypatch):
    from raytitan.trainer.elastic.idle import workers_that_train

    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)
    config = tiny_config(str(tmp_path), str(tmp_path), parallelism={"tensor_parallel_degree": 2})
    with caplog.at_level(logging.INFO, logger="raytitan"):
        assert workers_that_train(config, 1) == 0
    assert "no layout over 1 workers (world size 1 is not divisible" in caplog.text
