"""Run storage on an object store: a local S3-compatible server (moto) stands in for S3.

Checkpoints, metrics and the restart history go through pyarrow's S3 filesystem; a run resumes
from a checkpoint on S3 on a different number of ranks with the losses of the run that wrote it.
"""

import json
import os

import pytest
import ray

from raytitan.components import storage
from tests.helpers import run_ranks, tiny_config

BUCKET = "raytitan-test"


@pytest.fixture(scope="module")
def s3_root():
    """An empty bucket on a local S3 server; the storage root URI carries its endpoint."""
    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:  # spawned ranks and Ray workers inherit these
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        endpoint = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}/runs?{endpoint}"
    server.stop()


def test_files_round_trip_on_s3(s3_root):
    storage.use_root(s3_root)
    folder = f"s3://{BUCKET}/runs/files"
    storage.makedirs(folder)
    storage.write_text(storage.join(folder, "a.json"), '{"x": 1}')
    storage.append_text(storage.join(folder, "log.jsonl"), "1\n")
    storage.append_text(storage.join(folder, "log.jsonl"), "2\n")
    assert storage.read_text(storage.join(folder, "log.jsonl")) == "1\n2\n"
    assert storage.read_from(storage.join(folder, "log.jsonl"), 2) == b"2\n"
    assert sorted(storage.listdir(folder)) == ["a.json", "log.jsonl"]
    assert storage.isfile(storage.join(folder, "a.json")) and storage.size(storage.join(folder, "a.json")) == 8
    assert storage.size(storage.join(folder, "missing")) == -1 and storage.listdir(folder + "/none") == []
    storage.rmtree(folder)
    assert storage.listdir(folder) == []


def test_run_folder_lease_on_s3(s3_root, monkeypatch):
    """The lease works through the object store as on a folder: taken, refused to a second run
    naming the holder, released."""
    from raytitan.components import lease
    from raytitan.components.lease import RunFolderBusy, RunLease, hold_run_folder, read_lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.0)

    run_dir = f"s3://{BUCKET}/runs/leased"
    with hold_run_folder(run_dir, s3_root, kind="the Ray driver") as held:
        assert read_lease(run_dir)["holder"] == held.record["holder"]
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()} on host"):
            RunLease.acquire(run_dir, settle_s=0)
        assert held.renew()
    assert read_lease(run_dir) is None and not storage.isfile(f"{run_dir}/lease.json")


@pytest.mark.slow
def test_checkpoints_on_s3_resume_resharded_with_the_same_losses(tmp_path, data_dir, s3_root):
    from raytitan.components.checkpoint.layout import committed_steps, loadable_step

    storage.use_root(s3_root)
    run_dir = f"s3://{BUCKET}/runs/run"
    sections = dict(ray={"storage_path": s3_root, "name": "run"}, checkpoint={"interval": 3}, training={"steps": 6})
    first = run_ranks(tiny_config(str(tmp_path / "local"), data_dir, **sections), 2, str(tmp_path))
    assert committed_steps(f"{run_dir}/checkpoint") == [3, 6]
    assert loadable_step(f"{run_dir}/checkpoint") == 6  # the files DCP wrote are all there

    # From step 3, on one rank (the global batch of 8 as 4 x accumulation 2).
    resumed = run_ranks(tiny_config(str(tmp_path / "local"), data_dir, **{
        **sections, "checkpoint": {"interval": 3, "load_step": 3}}), 1, str(tmp_path))
    assert len(resumed["losses"]) == 3
    for got, want in zip(resumed["losses"], first["losses"][3:]):
        assert abs(got - want) / want < 1e-5, (resumed["losses"], first["losses"])

    logged = [json.loads(line) for line in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    starts = [json.loads(line) for line in storage.read_text(f"{run_dir}/restarts.jsonl").splitlines()]
    assert [(s["world"], s["resumed_step"]) for s in starts] == [(2, 0), (1, 3)]
    assert not os.path.exists(tmp_path / "local" / "run")  # nothing of the run landed on local disk


@pytest.mark.slow
def test_a_ray_run_keeps_everything_on_s3(tmp_path, data_dir, s3_root):
    import raytitan
    from raytitan.components.checkpoint.layout import committed_steps

    ray.init(num_cpus=2, include_dashboard=False)  # after the fixture: workers see the credentials
    try:
        result = raytitan.fit(
            None, job__dump_folder=str(tmp_path), ray__storage_path=s3_root, ray__name="ray-run",
            ray__num_workers=2, training__steps=4, training__seq_len=64, training__local_batch_size=2,
            training__dataset="files", training__dataset_path=data_dir, checkpoint__interval=2,
            metrics__log_freq=1, metrics__enable_tensorboard=False)
    finally:
        ray.shutdown()
    run_dir = f"s3://{BUCKET}/runs/ray-run"
    assert committed_steps(f"{run_dir}/checkpoint") == [2, 4]
    assert result.checkpoint is not None and result.checkpoint.path.endswith("ray-run/checkpoint/step-4")
    assert [m["step"] for m in raytitan.read_metrics(run_dir) if "loss" in m] == [1, 2, 3, 4]


def test_object_store_runs_refuse_what_needs_a_filesystem(tmp_path):
    from raytitan.tools import checkpoints
    from raytitan.tools import convert
    from raytitan.config.job import ConfigError, JobConfig
    from raytitan.config.plan import check_checkpoint

    config = JobConfig.from_dict({"ray": {"storage_path": f"s3://{BUCKET}/runs"}, "checkpoint": {"last_save_in_hf": True}})
    assert config.run_dir == f"s3://{BUCKET}/runs/llama3-debugmodel"
    assert config.local_dir == os.path.join(os.path.abspath(config.job.dump_folder), "llama3-debugmodel")
    with pytest.raises(ConfigError, match="need ray.storage_path on a filesystem"):
        check_checkpoint(config.checkpoint, config.run_dir)
    assert checkpoints.main(["list", f"s3://{BUCKET}/runs/x/checkpoint"]) == 2
    assert convert.main(["to-torch", f"s3://{BUCKET}/runs/x/checkpoint", str(tmp_path / "x.pt")]) == 2
