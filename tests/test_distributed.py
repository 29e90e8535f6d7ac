"""Multi-process runs of the real worker on gloo ranks: parity with one process, exact resume."""

import json
import os
import shutil

import pytest

from raytitan.components.checkpoint.layout import COMMIT_MARKER, committed_steps, read_commit_at, read_metadata
from raytitan.components.checkpoint.convert import export_torch
from raytitan.components.checkpoint.torchtitan import export_torchtitan

from tests.helpers import run_ranks, spawn, tiny_config

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


BLOCK_CAUSAL = {"attn_mask_type": "block_causal"}


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_dir, seed_checkpoint):
    """One process, the whole global batch of 8 in one microbatch: causal attention over whole rows,
    and block-causal (document masking), in one spawn."""
    root = tmp_path_factory.mktemp("reference")
    causal, block_causal = run_ranks(
        [tiny_config(str(root / name), data_dir, model=model, training={"local_batch_size": 8},
                     checkpoint={"initial_load_path": seed_checkpoint, "enable": False})
         for name, model in (("causal", {}), ("block_causal", BLOCK_CAUSAL))], 1, str(root))
    return {"causal": causal["losses"], "block_causal": block_causal["losses"]}


@pytest.fixture(scope="module")
def reference_losses(references):
    return references["causal"]


@pytest.mark.parametrize("world, parallelism, local_batch, extra, block_causal", [
    (2, {}, 4, {}, None),  # FSDP over 2 ranks
    # HSDP: 2 replicas x 2 shards; in the same spawn, block-causal attention on TP 2 x PP 2 (document
    # ids passed to both stages, the mask next to TP's sharded heads).
    (4, {"data_parallel_replicate_degree": 2}, 2, {},
     {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "pipeline_parallel_microbatch_size": 4}),
    (2, {}, 4, {"activation_checkpoint": {"mode": "selective", "selective_ac_option": "op"}}, None),  # FSDP + AC
])
def test_data_parallel_matches_one_process(tmp_path, data_dir, seed_checkpoint, references, world,
                                           parallelism, local_batch, extra, block_causal):
    config = tiny_config(str(tmp_path), data_dir, parallelism=parallelism, training={"local_batch_size": local_batch},
                         checkpoint={"initial_load_path": seed_checkpoint, "enable": False}, **extra)
    configs = [config]
    if block_causal:
        configs.append(tiny_config(str(tmp_path / "block_causal"), data_dir, model=BLOCK_CAUSAL,
                                   parallelism=block_causal, training={"local_batch_size": 8},
                                   checkpoint={"initial_load_path": seed_checkpoint, "enable": False}))
    results = run_ranks(configs, world, str(tmp_path))
    for mask, result in zip(("causal", "block_causal"), results):
        reference, losses = references[mask], result["losses"]
        assert len(reference) == len(losses) == 5
        for a, b in zip(reference, losses):
            assert abs(a - b) / a < 1e-5, (mask, reference, losses)
        assert reference[-1] < reference[0]
    # Document masking changes what the model sees: its losses are not causal attention's.
    assert max(abs(a - b) / a for a, b in zip(references["causal"], references["block_causal"])) > 1e-4


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data_dir, seed_checkpoint):
    # The uninterrupted run saves asynchronously (step 3 is written while steps 4-6 train), the
    # resumed one synchronously: the two kinds of save must hold the same state.
    config = tiny_config(str(tmp_path), data_dir, training={"steps": 6},
                         checkpoint={"interval": 3, "initial_load_path": seed_checkpoint, "async_mode": "async"})
    full = run_ranks(config, 2, str(tmp_path))
    folder = os.path.join(config.run_dir, "checkpoint")
    assert committed_steps(folder) == [3, 6]
    # Drop the last checkpoint: the next run resumes at step 3 (model, optimizer, schedule, data).
    shutil.rmtree(os.path.join(folder, "step-6"))
    config.checkpoint.async_mode = "disabled"
    resumed = run_ranks(config, 2, str(tmp_path))
    assert resumed["losses"] == full["losses"][3:]  # bit-identical, not just close
    assert resumed["tokens_seen"] == full["tokens_seen"]


def test_ledger_is_exact_across_resumes_on_shrinking_worlds(tmp_path, data_dir):
    """dp 4 -> stop -> dp 3 -> stop -> dp 2: every sequence exactly once, in the uninterrupted order."""
    def config(root, steps, local):
        return tiny_config(str(root), data_dir, model={"flavor": "tiny"}, metrics={"log_freq": 100},
                           training={"global_batch_size": 12, "local_batch_size": local, "steps": steps,
                                     "shuffle_buffer": 16})

    full, first_leg = run_ranks([config(tmp_path / "full", 9, 3), config(tmp_path / "elastic", 3, 3)], 4,
                                str(tmp_path))
    uninterrupted = full["global_ledger"]
    legs = [first_leg,
            run_ranks(config(tmp_path / "elastic", 6, 4), 3, str(tmp_path)),
            run_ranks(config(tmp_path / "elastic", 9, 2), 2, str(tmp_path))]  # 2 ranks x 2 local x 3 accumulation
    resumed = sum((leg["global_ledger"] for leg in legs), [])
    assert [len(leg["global_ledger"]) for leg in legs] == [3, 3, 3]
    assert resumed == uninterrupted
    flat = [tuple(row) for step in resumed for row in step]
    assert len(flat) == 9 * 12 and len(set(flat)) == len(flat)


def test_validation_loss_is_logged_and_falls(tmp_path, data_dir):
    config = tiny_config(str(tmp_path), data_dir, training={"steps": 6},
                         validation={"enable": True, "dataset": "files", "dataset_path": data_dir, "freq": 3,
                                     "steps": 2, "local_batch_size": 2})
    result = run_ranks(config, 2, str(tmp_path))
    assert len(result["validation_losses"]) == 2
    assert result["validation_losses"][1] < result["validation_losses"][0]


def test_elastic_world_that_fits_no_layout_idles_a_rank(tmp_path, data_dir, seed_checkpoint):
    """3 ranks, global batch 8: dp 2 trains (local 4) and rank 2 idles; the math is dp 2's."""
    common = {"checkpoint": {"initial_load_path": seed_checkpoint}}
    elastic = tiny_config(str(tmp_path / "three"), data_dir, ray={"min_workers": 1, "max_workers": 4}, **common)
    three = run_ranks(elastic, 3, str(tmp_path))
    two = run_ranks(tiny_config(str(tmp_path / "two"), data_dir, **common), 2, str(tmp_path))
    assert three["losses"] == two["losses"]
    restarts = [json.loads(line) for line in open(os.path.join(elastic.run_dir, "restarts.jsonl"))]
    assert (restarts[0]["world"], restarts[0]["active"], restarts[0]["dp"]) == (3, 2, 2)


def _stop_then_resume(rank: int, world: int, config: dict, signalled_rank: int, signalled_step: int) -> dict:
    """The run, with SIGTERM sent to ``signalled_rank`` as it fetches the batch of
    ``signalled_step``; then the same run started again, as a rerun would."""
    import signal

    import torch

    from raytitan.components.metrics import read_metrics
    from raytitan.config.job import JobConfig
    from raytitan.trainer.loop import Trainer
    from raytitan.trainer.runtime import TorchrunRuntime
    from raytitan.trainer.worker import run

    class Preempted(TorchrunRuntime):
        def build_loader(self, purpose, *args, **kwargs):
            loader = super().build_loader(purpose, *args, **kwargs)
            if purpose == "train" and rank == signalled_rank:
                fetch, fetched = loader.next_batch, []

                def next_batch():
                    fetched.append(1)
                    if len(fetched) == signalled_step:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return fetch()

                loader.next_batch = next_batch
            return loader

    torch.set_num_threads(1)
    config = JobConfig.from_dict(config)
    handler = signal.getsignal(signal.SIGTERM)
    outcomes = [run(config, Preempted()), run(config, TorchrunRuntime())]
    states = [o.state if isinstance(o, Trainer) else o for o in outcomes]
    return {"steps": [s.step for s in states], "stopped": [getattr(o, "stopped", None) for o in outcomes],
            "handed_back": signal.getsignal(signal.SIGTERM) == handler,
            "losses": {m["step"]: m["loss"] for m in read_metrics(config.run_dir) if "loss" in m}}


def test_sigterm_to_one_rank_stops_every_rank_at_a_saved_step_and_the_rerun_resumes_there(
        tmp_path, data_dir, seed_checkpoint, reference_losses):
    """Preemption of one process: rank 1 of 3 (rank 2 idles) gets SIGTERM while it fetches the
    batch of step 2. The ranks agree while step 3 trains, and all stop after step 3 with step 3
    committed; the same run started again resumes there, redoes nothing, and every step's loss is
    the one-process run's."""
    config = tiny_config(str(tmp_path), data_dir, ray={"min_workers": 1, "max_workers": 4},
                         checkpoint={"initial_load_path": seed_checkpoint})
    ranks = spawn(_stop_then_resume, 3, str(tmp_path), config.to_dict(), 1, 2)
    assert [r["steps"] for r in ranks] == [[3, 5]] * 3
    assert [r["stopped"] for r in ranks] == [["SIGTERM", None], ["SIGTERM", None], [None, None]]  # rank 2 idled
    assert all(r["handed_back"] for r in ranks)  # the SIGTERM handler the process had before
    assert committed_steps(os.path.join(config.run_dir, "checkpoint")) == [3, 5]
    restarts = [json.loads(line) for line in open(os.path.join(config.run_dir, "restarts.jsonl"))]
    assert restarts[1]["cause"] == "stopped on request (SIGTERM) after step 3, run again"
    assert (restarts[1]["resumed_step"], restarts[1]["lost_steps"], restarts[1]["seconds_since_failure"]) == (3, 0, None)
    losses = ranks[0]["losses"]
    assert sorted(int(s) for s in losses) == [1, 2, 3, 4, 5]  # each step logged once: none redone
    for step, reference in enumerate(reference_losses, start=1):
        assert abs(losses[str(step)] - reference) / reference < 1e-5, (losses, reference_losses)


def _hang_after_sigterm(rank: int, world: int, folder: str) -> None:
    import signal
    import time

    from raytitan.trainer.elastic.stop import StopCheck

    StopCheck(None, lambda: None, timeout_s=0.5, checkpoint_folder=folder)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # as in a collective that never completes


def test_a_rank_that_cannot_stop_within_the_timeout_kills_itself(tmp_path):
    from torch.multiprocessing import ProcessExitedException

    with pytest.raises(ProcessExitedException, match="SIGKILL"):
        spawn(_hang_after_sigterm, 1, str(tmp_path), str(tmp_path))


def test_finished_run_restarted_on_a_world_with_an_idle_rank_ends(tmp_path, data_dir):
    """A run whose last save holds weights only is finished: started again on 3 ranks (one
    idles), every rank sees that and returns, none waits for the others in a collective."""
    finished = tiny_config(str(tmp_path), data_dir, training={"steps": 2}, ray={"min_workers": 1, "max_workers": 4},
                           checkpoint={"last_save_model_only": True})
    first, again = run_ranks([finished, finished], 3, str(tmp_path), deadline_s=120)
    assert len(first["losses"]) == 2 and again["losses"] == []
    assert [r["step"] for r in again["ranks"]] == [2, 2, 2]


def test_runs_started_from_a_step_or_its_exports(tmp_path, data_dir, seed_checkpoint):
    """One process trains 5 steps; its last save holds weights only and is also exported as a
    Hugging Face folder and (offline) as a .pt file and a torchtitan step folder (0.3.x names).
    Then, on 2 ranks (resharded): runs started from step 5, its HF export, its .pt and its
    torchtitan folder (read in place) have the same weights, so the same losses bit for bit;
    a run started from all of step 3 (initial_load_model_only = false) continues at step 4 with
    the first run's losses, and with exclude_from_loading = optimizer only its first step
    matches; the finished run, started again, trains nothing."""
    trained = tiny_config(str(tmp_path / "a"), data_dir, training={"steps": 5},
                          checkpoint={"initial_load_path": seed_checkpoint, "interval": 3, "last_save_in_hf": True,
                                      "last_save_model_only": True})
    folder = os.path.join(trained.run_dir, "checkpoint")
    started = {"training": {"steps": 2}}
    from_dcp = tiny_config(str(tmp_path / "b"), data_dir, **started,
                           checkpoint={"initial_load_path": f"{folder}/step-5", "enable": False})
    from_hf = tiny_config(str(tmp_path / "c"), data_dir, **started,
                          checkpoint={"initial_load_path": f"{folder}/step-5-hf", "initial_load_in_hf": True,
                                      "enable": False})
    from_pt = tiny_config(str(tmp_path / "e"), data_dir, **started,
                          checkpoint={"initial_load_path": str(tmp_path / "step5.pt"), "enable": False})
    from_torchtitan = tiny_config(str(tmp_path / "g"), data_dir, **started,
                                  checkpoint={"initial_load_path": str(tmp_path / "tt-step-5"), "enable": False})
    resumed = {"training": {"steps": 5}}
    from_full = tiny_config(str(tmp_path / "d"), data_dir, **resumed,
                            checkpoint={"initial_load_path": f"{folder}/step-3", "initial_load_model_only": False,
                                        "enable": False})
    no_optimizer = tiny_config(str(tmp_path / "f"), data_dir, **resumed,
                               checkpoint={"initial_load_path": f"{folder}/step-3", "initial_load_model_only": False,
                                           "exclude_from_loading": ["optimizer"], "enable": False})
    first = run_ranks(trained, 1, str(tmp_path))
    assert read_commit_at(f"{folder}/step-5")["model_only"] and not read_commit_at(f"{folder}/step-3")["model_only"]
    assert {k.split(".")[0] for k in read_metadata(f"{folder}/step-5").state_dict_metadata} == {"model"}
    assert os.path.isfile(os.path.join(folder, "step-5-hf", "config.json"))
    export_torch(f"{folder}/step-5", str(tmp_path / "step5.pt"))
    export_torchtitan(f"{folder}/step-5", str(tmp_path / "tt-step-5"), names="0.3")
    dcp_run, hf_run, pt_run, tt_run, full_run, partial_run, again = run_ranks(
        [from_dcp, from_hf, from_pt, from_torchtitan, from_full, no_optimizer, trained], 2, str(tmp_path))
    assert os.path.isfile(os.path.join(from_hf.run_dir, "hf_import", COMMIT_MARKER))
    assert os.path.isfile(os.path.join(from_pt.run_dir, "torch_import", COMMIT_MARKER))
    assert hf_run["losses"] == dcp_run["losses"] == pt_run["losses"] == tt_run["losses"] and len(hf_run["losses"]) == 2
    assert len(full_run["losses"]) == 2 and full_run["tokens_seen"] == first["tokens_seen"]
    for a, b in zip(first["losses"][3:], full_run["losses"]):
        assert abs(a - b) / a < 1e-5, (first["losses"], full_run["losses"])
    # A fresh optimizer: step 4's loss (before any update) is the same, step 5's is not.
    assert abs(partial_run["losses"][0] - first["losses"][3]) / first["losses"][3] < 1e-5
    assert abs(partial_run["losses"][1] - first["losses"][4]) / first["losses"][4] > 1e-5
    assert again["losses"] == [] and committed_steps(folder) == [3, 5]