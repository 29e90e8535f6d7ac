"""The workers' side of Ray: a ``Runtime`` that takes its data from the feeder actors and
reports through Ray Train, and the function each Ray Train worker runs."""

from __future__ import annotations

import logging
import os

import ray
import ray.train

from raytitan.components import storage
from raytitan.config.job import JobConfig
from raytitan.ray.feed_loader import RayFeedLoader
from raytitan.trainer.elastic.stop import read_stop_request
from raytitan.trainer.runtime import Runtime

# How long a capacity probe waits for Ray to place a placement group before calling it full.
PROBE_TIMEOUT_S = 2.0


class RayRuntime(Runtime):
    name = "ray"
    reads_shards = False  # the DataFeeder reads them; 512 workers need not each list the source

    def __init__(self, feeders: dict, worker_bundle: dict, max_workers: int, attempt: str | None = None,
                 run_dir: str | None = None, snapshot_stores: str | None = None, relays: str | None = None):
        self.feeders = feeders  # purpose -> DataFeeder actor
        self.relays = relays  # the launch id naming its per-node data relays; None: ranks ask the feeders
        self.snapshot_stores = snapshot_stores  # the launch id naming its snapshot stores; None: none started
        self.worker_bundle, self.max_workers = worker_bundle, max_workers
        self.attempt, self.run_dir = attempt, run_dir

    def device(self, use_gpu: bool):
        if use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return super().device(False)

    def build_loader(self, purpose, shards, model_config, tokenizer, seq_len, seed, global_batch_size, dp_rank,
                     dp_size, shuffle_block, reader=None, readers=None):
        return RayFeedLoader(self.feeders[purpose], global_batch_size, dp_rank, dp_size, reader, readers,
                             relays=self.relays, purpose=purpose)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        # The checkpoint is already committed in the run folder (= Ray's experiment folder).
        checkpoint = None
        if checkpoint_dir:
            filesystem, path = storage.resolve(checkpoint_dir)
            checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=os.path.basename(checkpoint_dir) if checkpoint_dir else None,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )

    def snapshot_folder(self, replicas: int) -> str | None:
        if self.snapshot_stores is None:
            return None
        from raytitan.ray.snapshots import mount

        return mount(self.snapshot_stores, replicas)

    def max_world_size(self, world: int) -> int:
        return max(world, self.max_workers)

    def stop_requested(self) -> str | None:
        """The driver's request (it got SIGTERM or SIGINT: ``raytitan.ray.signals``), through the run folder."""
        return read_stop_request(self.run_dir, self.attempt) if self.run_dir else None

    def spare_workers(self, most: int) -> int:
        """Probe with placement groups of 1, 2, ... worker bundles: what Ray could place right now.

        Only as many as the cluster's free resources could hold are probed: with no room for one
        more worker (the usual case) the check answers at once instead of stalling the step for a
        probe's timeout."""
        from ray.util.placement_group import placement_group, remove_placement_group

        free = ray.available_resources()
        room = min((int(free.get(name, 0.0) / amount + 1e-9) for name, amount in self.worker_bundle.items()
                    if amount > 0), default=most)
        placed = 0
        for n in range(1, min(most, room) + 1):
            group = placement_group([self.worker_bundle] * n)
            fits = group.wait(timeout_seconds=PROBE_TIMEOUT_S)
            remove_placement_group(group)
            if not fits:
                break
            placed = n
        return placed


def report_echo_logger() -> logging.Logger:
    """The logger Ray Train echoes every report with. The one use of Ray's private API in this
    module (Ray 2.60: ``ray.train.v2._internal.execution.context``, whose logger is named by its
    file); tests/test_private_apis.py checks it."""
    from ray.train.v2._internal.execution import context

    return logging.getLogger(context.__file__)


def _quiet_report_echo() -> None:
    """Ray Train logs every report's whole metrics dict from every worker at INFO; rank 0's own
    metrics line already says it, once."""
    try:
        report_echo_logger().setLevel(logging.WARNING)
    except ImportError as e:  # a Ray version that moved it: keep its logging as it is
        logging.getLogger("raytitan").warning("Ray Train's report logger is not where Ray 2.60 has it (%s); "
                                              "its per-report lines stay on", e)


def train_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: the same ``run`` as under torchrun, with a RayRuntime."""
    from raytitan.trainer.worker import run

    _quiet_report_echo()
    config = JobConfig.from_dict(loop_config["config"])
    run(config, RayRuntime(loop_config["feeders"], loop_config["worker_bundle"], loop_config["max_workers"],
                           loop_config.get("attempt"), config.run_dir, loop_config.get("snapshot_stores"),
                           loop_config.get("relays")))
