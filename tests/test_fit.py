"""The notebook API: ``raytitan.fit`` in this process, against a Ray instance it did not start."""

import os

import pytest
import ray

import raytitan
from raytitan.components.checkpoint.layout import committed_steps

pytestmark = pytest.mark.slow


def test_fit_returns_the_ray_result_and_a_second_fit_resumes(tmp_path, data_dir):
    settings = dict(job__dump_folder=str(tmp_path), training__seq_len=64, training__dataset="files",
                    training__dataset_path=data_dir, metrics__log_freq=2, metrics__enable_tensorboard=False,
                    checkpoint__interval=2, checkpoint__keep_latest_k=1)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = raytitan.fit(None, training__steps=4, **settings)
        # Step 2 was reported to Ray, then deleted by keep_latest_k: starting again must not trip on it.
        resumed = raytitan.fit(None, training__steps=6, **settings)
    finally:
        ray.shutdown()
    assert result.error is None
    assert result.metrics["step"] == 4 and result.metrics["loss"] > 0
    assert result.checkpoint.path.endswith(os.path.join("checkpoint", "step-4"))
    assert resumed.metrics["step"] == 6 and resumed.checkpoint.path.endswith(os.path.join("checkpoint", "step-6"))
    assert committed_steps(str(tmp_path / "llama3-debugmodel" / "checkpoint")) == [6]
