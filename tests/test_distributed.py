"""Multi-process runs of the real worker on gloo ranks: parity with one process, exact resume."""

import os
import shutil

import pytest

from raytitan.checkpoint import COMMIT_MARKER, committed_steps

from tests.helpers import run_ranks, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory, data_dir):
    """Initial weights written once by one process, so every layout starts identical."""
    root = str(tmp_path_factory.mktemp("seed"))
    config = tiny_config(root, data_dir, checkpoint={"create_seed_checkpoint": True})
    run_ranks(config, 1, root)
    path = os.path.join(config.run_dir, "checkpoint", "step-0")
    assert os.path.isfile(os.path.join(path, COMMIT_MARKER))
    return path


def test_fsdp_on_two_ranks_matches_one_process(tmp_path, data_dir, seed_checkpoint):
    common = {"checkpoint": {"initial_load_path": seed_checkpoint, "enable": False}}
    reference = run_ranks(tiny_config(str(tmp_path / "one"), data_dir, training={"local_batch_size": 8}, **common),
                          1, str(tmp_path))
    sharded = run_ranks(tiny_config(str(tmp_path / "two"), data_dir, **common), 2, str(tmp_path))
    assert len(reference["losses"]) == len(sharded["losses"]) == 5
    for a, b in zip(reference["losses"], sharded["losses"]):
        assert abs(a - b) / a < 1e-5, (reference["losses"], sharded["losses"])
    assert reference["losses"][-1] < reference["losses"][0]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data_dir, seed_checkpoint):
    config = tiny_config(str(tmp_path), data_dir, training={"steps": 6},
                         checkpoint={"interval": 3, "initial_load_path": seed_checkpoint})
    full = run_ranks(config, 2, str(tmp_path))
    folder = os.path.join(config.run_dir, "checkpoint")
    assert committed_steps(folder) == [3, 6]
    # Drop the last checkpoint: the next run resumes at step 3 (model, optimizer, schedule, data).
    shutil.rmtree(os.path.join(folder, "step-6"))
    resumed = run_ranks(config, 2, str(tmp_path))
    assert resumed["losses"] == full["losses"][3:]  # bit-identical, not just close
    assert resumed["tokens_seen"] == full["tokens_seen"]
