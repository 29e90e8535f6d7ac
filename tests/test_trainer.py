import copy
import logging
import math
import os

import pytest
import torch

from raytitan.components.checkpoint.manager import CheckpointManager
from raytitan.models.llama3.args import ModelArgs
from raytitan.models.llama3.model import Transformer
from raytitan.components.loss import cross_entropy_sum
from raytitan.components.optimizer import PartOptimizers, build_lr_scheduler
from raytitan.trainer.runner import ModelRunner
from raytitan.trainer.loop import Schedule, Trainer, clip_grad_norm_

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=16)


def make_trainer(model, local_batch_size):
    # SGD: the update is proportional to the gradient, so it shows any difference in the math
    # (Adam's g / sqrt(v) would amplify float rounding of near-zero gradients).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoint = CheckpointManager("unused", {}, keep_latest_k=0)
    return Trainer(ModelRunner([model]), optimizer, scheduler, loader=None, checkpoint=checkpoint, metrics=None, state=None,
                   device=torch.device("cpu"), local_batch_size=local_batch_size,
                   schedule=Schedule(1, 1, 1, False, 0), max_norm=1.0, loss_group=None)


def test_gradient_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 61, (8, 17))
    loss_a, norm_a, _ = make_trainer(model, local_batch_size=2).train_step(tokens)  # 4 microbatches of 2
    loss_b, norm_b, _ = make_trainer(twin, local_batch_size=8).train_step(tokens)  # 1 microbatch of 8
    assert abs(loss_a - loss_b) / loss_b < 1e-6 and abs(norm_a - norm_b) / norm_b < 1e-5
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), Transformer(ARGS).parameters())]
    assert all(changed)


def test_loss_is_the_global_token_mean():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    tokens = torch.randint(0, 61, (4, 17))
    expected = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss, _, _ = make_trainer(model, local_batch_size=1).train_step(tokens)
    assert abs(loss - expected.item()) < 1e-5
    assert cross_entropy_sum(torch.zeros(1, 2, 5), torch.tensor([[0, -100]])).item() == torch.log(torch.tensor(5.0)).item()


def test_clip_grad_norm_clips_to_max_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    total = clip_grad_norm_([p], max_norm=1.0)
    assert total.item() == 5.0
    torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)


def test_lr_schedule_reaches_every_part_also_after_a_state_load():
    """The schedule sets the learning rate of each part's optimizer, including after loading a
    state dict (which replaces an optimizer's param-group dicts)."""
    from raytitan.config.job import JobConfig

    parts = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    optimizers = [torch.optim.SGD(p.parameters(), lr=1.0) for p in parts]
    combined = PartOptimizers(optimizers)
    config = JobConfig.from_dict({"lr_scheduler": {"warmup_steps": 0, "decay_type": "linear"}})
    scheduler = build_lr_scheduler(combined, config.lr_scheduler, total_steps=4)
    optimizers[1].load_state_dict(optimizers[1].state_dict())
    for _ in range(2):
        combined.step()
        scheduler.step()
    assert [o.param_groups[0]["lr"] for o in optimizers] == [0.5, 0.5]


# The schedule tests below write torchtitan's formulas out by hand (lr_scheduler.py of torchtitan
# v0.2.2, `linear_warmup_stable_decay`): over T total steps with W warmup and D decay steps, step
# n (1-based) trains at n / W while n <= W, at 1.0 until n = T + 1 - D, then decays with progress
# p = (n - (T + 1 - D)) / D to min_lr_factor; W is cut to T, and D to T - W when they overlap.


def lr_scheduler_config(**keys):
    from raytitan.config.job import JobConfig

    return JobConfig.from_dict({"lr_scheduler": keys}).lr_scheduler


def scheduled_lrs(keys: dict, training_steps: int, base_lr: float = 1.0) -> list[float]:
    """The learning rate each step n = 1..training_steps trains at, stepping as the loop does."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base_lr)
    scheduler = build_lr_scheduler(optimizer, lr_scheduler_config(**keys), training_steps)
    lrs = []
    for _ in range(training_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def assert_lrs(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    for n, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) < 1e-12, f"step {n}: lr {a}, torchtitan's formula gives {e}"


def logged_lrs(trainer, total_steps: int) -> list[float]:
    """Run the training loop to ``total_steps`` and return the lr it logged for each step it ran."""
    from raytitan.components.data.loader import RankBatch

    class Loader:
        global_batch_size, bad_records = 2, 0

        def metrics(self):
            return {}

        def next_batch(self):
            return RankBatch(torch.randint(0, 61, (2, 9)), None)

    class Metrics:
        def __init__(self):
            self.lrs = []

        def summarize(self, step, loss, grad_norm, lr):
            self.lrs.append(lr)
            return {"step": step}

        log = record_step = flush = close = log_validation = lambda self, *a: None

    trainer.loader, trainer.metrics = Loader(), Metrics()
    trainer.schedule = Schedule(total_steps=total_steps, log_freq=1, checkpoint_interval=1, checkpoint_enabled=False,
                                validation_freq=0)
    trainer.fit()
    return trainer.metrics.lrs


def test_the_loop_trains_each_step_at_torchtitans_lr_also_after_resuming_mid_warmup():
    """torchtitan's debug_model.toml schedule (lr 8e-4, warmup 2, decay_ratio 0.8, linear, 10
    steps): W = 2, D = 8, decay from n = 3. The loop logs the lr each step trained at. A run that
    stops after step 1 (mid-warmup) and resumes from the saved schedule state trains steps 2-10 at
    the same rates; the state is {"last_epoch": completed steps}, as checkpoints from before the
    switch to torchtitan's warmup hold it too."""
    from raytitan.components.optimizer import LRSchedulerState
    from raytitan.trainer.loop import TrainState

    keys = {"warmup_steps": 2, "decay_ratio": 0.8, "decay_type": "linear", "min_lr_factor": 0.0}
    expected = [8e-4 * f for f in (1 / 2, 2 / 2, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8)]

    def trainer_at(step: int, saved: dict | None):
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=61, max_seq_len=8))
        model.init_weights()
        trainer = make_trainer(model, local_batch_size=2)
        trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=8e-4)
        trainer.lr_scheduler = build_lr_scheduler(trainer.optimizer, lr_scheduler_config(**keys), 10)
        trainer.state = TrainState(step=step)
        if saved is not None:
            LRSchedulerState(trainer.lr_scheduler).load_state_dict(saved)
        return trainer

    assert_lrs(scheduled_lrs(keys, 10, base_lr=8e-4), expected)
    first = trainer_at(0, None)
    assert_lrs(logged_lrs(first, 1), expected[:1])
    saved = LRSchedulerState(first.lr_scheduler).state_dict()
    assert saved == {"last_epoch": 1}
    assert_lrs(logged_lrs(trainer_at(1, saved), 10), expected[1:])


@pytest.mark.parametrize("decay_type, shape", [
    ("linear", lambda p: 1 - p),
    ("sqrt", lambda p: 1 - math.sqrt(p)),
    ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
])
def test_lr_decay_shapes_with_a_floor(decay_type, shape):
    """12 steps, warmup 3, decay_ratio 0.5 (D = 6: steps 8-12 decay, p = (n - 7) / 6), floor 0.1."""
    warmup, stable = [1 / 3, 2 / 3, 1.0], [1.0] * 4
    decay = [0.1 + 0.9 * shape((n - 7) / 6) for n in range(8, 13)]
    assert_lrs(scheduled_lrs({"warmup_steps": 3, "decay_ratio": 0.5, "decay_type": decay_type, "min_lr_factor": 0.1},
                             12, base_lr=2.0), [2.0 * f for f in warmup + stable + decay])


def test_lr_schedule_without_decay_ratio_decays_every_step_after_warmup():
    """warmup 2 of 6 steps, decay_ratio unset: D = 4, p = (n - 3) / 4 from n = 4."""
    assert_lrs(scheduled_lrs({"warmup_steps": 2}, 6), [0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert_lrs(scheduled_lrs({"warmup_steps": 0}, 4), [1.0, 0.75, 0.5, 0.25])  # no warmup: D = 4 from step 1


def test_lr_schedule_clamps_as_torchtitan_does(caplog):
    raytitan_log = logging.getLogger("raytitan")
    raytitan_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="raytitan"):
            # warmup 8 of 5 steps: cut to 5 (D = 0: no decay)
            assert_lrs(scheduled_lrs({"warmup_steps": 8}, 5), [0.2, 0.4, 0.6, 0.8, 1.0])
            # warmup 4 + decay round(10 x 0.8) = 8 > 10 steps: D cut to 6, p = (n - 5) / 6 from n = 6
            assert_lrs(scheduled_lrs({"warmup_steps": 4, "decay_ratio": 0.8}, 10),
                       [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    finally:
        raytitan_log.removeHandler(caplog.handler)
    assert "warmup_steps 8 > 5 total steps: warmup over 5" in caplog.text
    assert "warmup 4 + decay 8 steps > 10 total steps: decay over 6" in caplog.text


def test_lr_scheduler_total_steps_decouples_the_schedule_from_the_run():
    # Spans 20 steps of a 6-step run: warmup 2, D = 18, p = (n - 3) / 18.
    assert_lrs(scheduled_lrs({"warmup_steps": 2, "total_steps": 20}, 6), [0.5, 1.0, 1.0, 17 / 18, 16 / 18, 15 / 18])
    # Spans 4 steps of a 6-step run: D = 2 ends at n = 5 with the floor; past it the floor stays
    # (torchtitan's formula would go on below it).
    assert_lrs(scheduled_lrs({"warmup_steps": 2, "total_steps": 4, "min_lr_factor": 0.1}, 6),
               [0.5, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_schedule_reports_at_checkpoints_validations_and_the_end():
    s = Schedule(total_steps=10, log_freq=4, checkpoint_interval=3, checkpoint_enabled=True, validation_freq=5)
    assert [t for t in range(1, 11) if s.reports(t)] == [3, 5, 6, 9, 10]
    assert [t for t in range(1, 11) if s.logs(t, first_step=7)] == [1, 4, 7, 8, 10]
    off = Schedule(total_steps=10, log_freq=100, checkpoint_interval=3, checkpoint_enabled=False, validation_freq=0)
    assert [t for t in range(1, 11) if off.reports(t)] == [10]


def test_the_loop_reads_losses_back_only_on_the_steps_it_logs(monkeypatch):
    """Reading a tensor's value waits for the device: the loop does it for the loss and gradient
    norm on logged and reported steps only, never on the others. Every step reads one flag: whether
    both are finite (the non-finite guard, before the optimizer step)."""
    from raytitan.components.data.loader import RankBatch
    from raytitan.trainer.loop import TrainState

    class Loader:
        global_batch_size, bad_records = 4, 0

        def metrics(self):
            return {}

        def next_batch(self):
            return RankBatch(torch.randint(0, 61, (4, 17)), None)

    class Metrics:
        logged: list = []

        def summarize(self, step, loss, grad_norm, lr):
            assert isinstance(loss, float) and isinstance(grad_norm, float)
            return {"step": step, "loss": loss}

        def log(self, metrics):
            self.logged.append(metrics["step"])

        record_step = flush = close = log_validation = lambda self, *a: None

    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    trainer = make_trainer(model, local_batch_size=2)
    trainer.loader, trainer.metrics, trainer.state = Loader(), Metrics(), TrainState()
    trainer.schedule = Schedule(total_steps=7, log_freq=3, checkpoint_interval=1, checkpoint_enabled=False,
                                validation_freq=0)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append((trainer.state.step, t.dtype)) or item(t))
    trainer.fit()
    assert trainer.metrics.logged == [1, 3, 6, 7]
    flags = [step + 1 for step, dtype in reads if dtype == torch.bool]  # read during the step, before it counts
    values = [step for step, dtype in reads if dtype != torch.bool]
    assert flags == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(set(values)) == [1, 3, 6, 7] and len(values) == 2 * 4  # loss and grad norm, on those steps only


# --------------------------------------------------------------------------- the non-finite guard


class CountingLoader:
    """Seeded batches of 4 rows; counts what the loop consumed (the data position)."""

    global_batch_size, bad_records = 4, 0

    def __init__(self):
        self.generator, self.consumed = torch.Generator().manual_seed(0), 0

    def metrics(self):
        return {"data/bad_records": 0}

    def next_batch(self):
        from raytitan.components.data.loader import RankBatch

        self.consumed += 1
        return RankBatch(torch.randint(0, 61, (4, 17), generator=self.generator), None)


class LoggedMetrics:
    def __init__(self):
        self.logged = []

    def summarize(self, step, loss, grad_norm, lr):
        return {"step": step, "loss": loss, "grad_norm": grad_norm}

    def log(self, metrics):
        self.logged.append(metrics)

    record_step = flush = close = log_validation = lambda self, *a: None


def guarded_trainer(folder, steps: int, *, on_nonfinite="stop", max_skips=3, lr=1e-3, poison=(), where="loss",
                    save=True):
    """The real loop and checkpoint manager on one process: AdamW, clipping off (the guard still
    reads the gradient norm), a save every step (``save``). ``poison``: steps whose loss (or, with
    ``where="grad"``, one gradient) is made NaN."""
    from raytitan.components.checkpoint.manager import ModelState, OptimizerState
    from raytitan.trainer.loop import NonFiniteGuard, TrainState

    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    state = TrainState()
    checkpoint = CheckpointManager(str(folder), {"model": ModelState([model]), "train_state": state,
                                                 "optimizer": OptimizerState([model], [optimizer])}, keep_latest_k=0)
    trainer = Trainer(ModelRunner([model]), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      CountingLoader(), checkpoint, LoggedMetrics(), state, device=torch.device("cpu"),
                      local_batch_size=4, schedule=Schedule(steps, 1, 1, save, 0), max_norm=0.0, loss_group=None,
                      guard=NonFiniteGuard(on_nonfinite, max_skips))
    poisoned = lambda: state.step + 1 in poison  # noqa: E731
    if where == "loss":
        forward_backward = trainer.runner.forward_backward
        trainer.runner.forward_backward = lambda *a: forward_backward(*a) * (math.nan if poisoned() else 1.0)
    else:
        model.norm.weight.register_hook(lambda g: g * math.nan if poisoned() else g)
    return trainer, model


def saved_weights(folder, step: int) -> dict:
    from raytitan.components.checkpoint.manager import ModelState

    model = Transformer(ARGS)
    CheckpointManager(str(folder), {"model": ModelState([model])}, keep_latest_k=0).load(step)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_stop_on_a_nonfinite_step_keeps_the_last_good_checkpoint(tmp_path, where):
    """on_nonfinite = stop: the error names the step; nothing of it reached the optimizer or a
    checkpoint, so step 2 stays the newest committed state and equals the weights in memory."""
    from raytitan.components.checkpoint.layout import committed_steps
    from raytitan.trainer.loop import NonFiniteError

    trainer, model = guarded_trainer(tmp_path, 5, poison={3}, where=where)
    with pytest.raises(NonFiniteError, match="step 3: loss .*: not finite, stopped before its optimizer step "
                                             r"\(training.on_nonfinite = stop\)") as stopped:
        trainer.fit()
    assert stopped.value.step == 3 and trainer.state.step == 2
    assert committed_steps(str(tmp_path)) == [1, 2]
    saved = saved_weights(tmp_path, 2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name  # the bad step changed nothing
    assert all(s["step"].item() == 2 for s in trainer.optimizer.state.values())


def test_a_learning_rate_too_large_stops_and_commits_nothing_nonfinite(tmp_path):
    """A finite but absurd lr: the weights or the loss overflow within a few steps; the run stops
    naming the step, and every committed checkpoint holds finite weights only."""
    from raytitan.components.checkpoint.layout import committed_steps
    from raytitan.trainer.loop import NonFiniteError

    trainer, _ = guarded_trainer(tmp_path, 6, lr=1e30)
    with pytest.raises(NonFiniteError, match=r"step \d: (loss|the weights) .*not finite") as stopped:
        trainer.fit()
    steps = committed_steps(str(tmp_path))
    assert steps == list(range(1, stopped.value.step))
    for step in steps:
        assert all(torch.isfinite(v).all() for v in saved_weights(tmp_path, step).values()), step


def test_nonfinite_weights_are_never_saved(tmp_path):
    from raytitan.components.checkpoint.layout import committed_steps
    from raytitan.trainer.loop import NonFiniteError

    trainer, model = guarded_trainer(tmp_path, 4)
    trainer.after_step = lambda step: step == 2 and model.norm.weight.data.fill_(math.inf)
    with pytest.raises(NonFiniteError, match="step 2: the weights are not finite after this step's update; not saved"):
        trainer.fit()
    assert committed_steps(str(tmp_path)) == [1]


def test_skip_drops_the_update_counts_it_and_stops_after_max_in_a_row(tmp_path):
    """on_nonfinite = skip, at most 1 in a row: steps 2 and 4 are skipped (weights and Adam state
    unchanged, the batch consumed, the step, data position and lr schedule advanced); step 5 is the
    second in a row and stops the run."""
    from raytitan.trainer.loop import NonFiniteError

    trainer, model = guarded_trainer(tmp_path, 6, on_nonfinite="skip", max_skips=1, poison={2, 4, 5}, save=False)
    after = []
    trainer.after_step = lambda step: after.append(model.norm.weight.detach().clone())
    with pytest.raises(NonFiniteError, match=r"step 5: .*2 non-finite steps in a row, more than "
                                             r"training.max_nonfinite_skips = 1"):
        trainer.fit()
    assert trainer.state.step == 4 and trainer.loader.consumed == 5
    assert [m["training/skipped_steps"] for m in trainer.metrics.logged] == [0, 1, 1, 2]
    assert [math.isfinite(m["loss"]) for m in trainer.metrics.logged] == [True, False, True, False]
    assert torch.equal(after[0], after[1])  # step 2: no update
    assert not torch.equal(after[1], after[2]) and torch.equal(after[2], after[3])  # step 3 trained; 4 not
    assert all(s["step"].item() == 2 for s in trainer.optimizer.state.values())  # Adam stepped at 1 and 3 only
    assert trainer.lr_scheduler.last_epoch == 5  # the schedule followed every step, skipped ones too


def _stop_on_one_ranks_nan(rank: int, world: int, root: str, data_dir: str, parallelism: dict | None = None,
                           microbatches_per_step: int = 1) -> dict:
    """Rank 1 alone sees a NaN loss in the first microbatch of step 3."""
    from raytitan.components.checkpoint.layout import committed_steps
    from raytitan.trainer.loop import NonFiniteError
    from raytitan.trainer.runner import ModelRunner
    from raytitan.trainer.runtime import TorchrunRuntime
    from raytitan.trainer.worker import run
    from tests.helpers import tiny_config

    calls = []
    forward_backward = ModelRunner.forward_backward

    def poisoned(self, *args):
        calls.append(1)
        loss = forward_backward(self, *args)
        return loss * math.nan if rank == 1 and len(calls) == 2 * microbatches_per_step + 1 else loss

    ModelRunner.forward_backward = poisoned
    config = tiny_config(root, data_dir, checkpoint={"interval": 1}, parallelism=parallelism or {})
    try:
        run(config, TorchrunRuntime())
    except NonFiniteError as e:
        return {"step": e.step, "committed": committed_steps(f"{config.run_dir}/checkpoint")}
    return {"step": None}


@pytest.mark.slow
def test_ranks_agree_to_stop_when_one_ranks_loss_is_nan(tmp_path, data_dir):
    """World 2: the decision uses the loss after its all-reduce, so both ranks stop at step 3
    (a rank going on alone would hang in the next collective), with steps 1-2 committed."""
    from tests.helpers import spawn

    results = spawn(_stop_on_one_ranks_nan, 2, str(tmp_path), str(tmp_path / "runs"), data_dir)
    assert [r["step"] for r in results] == [3, 3]
    assert results[0]["committed"] == [1, 2]


def test_a_launch_that_stopped_on_a_nonfinite_step_is_not_retried(tmp_path):
    """Ray restarts a failed group within the same launch (attempt): its workers raise the
    recorded stop again before building anything. Another launch trains again."""
    import json
    from types import SimpleNamespace

    from raytitan.trainer.loop import NonFiniteError
    from raytitan.trainer.worker import NONFINITE_FILE, refuse_retry

    (tmp_path / NONFINITE_FILE).write_text(json.dumps({"attempt": "a1", "step": 7, "error": "step 7: loss nan"}))
    ctx = lambda attempt: SimpleNamespace(runtime=SimpleNamespace(attempt=attempt),  # noqa: E731
                                          config=SimpleNamespace(run_dir=str(tmp_path)))
    with pytest.raises(NonFiniteError, match="step 7: loss nan \\(not retried: this launch stopped on it"):
        refuse_retry(ctx("a1"))
    refuse_retry(ctx("b2"))  # the same command run again
    refuse_retry(ctx(None))  # torchrun: nothing restarts the group


def test_the_driver_names_a_repeating_cause_instead_of_the_restarts_spent(tmp_path):
    """A non-finite stop of this launch, or data that make no batch, is what the driver says;
    other failures keep the restarts-used message."""
    import json

    from raytitan.components.data.stream import DataSourceError
    from raytitan.config.job import JobConfig
    from raytitan.ray.launcher import failure_message
    from raytitan.trainer.worker import NONFINITE_FILE

    config = JobConfig.from_dict({"job": {"dump_folder": str(tmp_path)}, "ray": {"name": "run"}})
    os.makedirs(config.run_dir)
    other = RuntimeError("worker died")
    assert "after using its" in failure_message(config, other, {"a1"})
    wrapped = RuntimeError("Training failed")
    wrapped.__cause__ = DataSourceError("training.dataset_path: no window in a whole epoch\nRay Data's advice")
    assert "failed: data error: training.dataset_path: no window in a whole epoch\n" in failure_message(config, wrapped)
    with open(os.path.join(config.run_dir, NONFINITE_FILE), "w") as f:
        json.dump({"attempt": "a1", "step": 7, "error": "step 7: loss nan"}, f)
    assert "failed: step 7: loss nan\n" in failure_message(config, other, {"a1"})
    assert "after using its" in failure_message(config, other, {"b2"})  # an earlier launch's stop
    folder = os.path.join(config.run_dir, "checkpoint")
    for step, marker in ((2, "{}"), (4, "")):  # step 4's marker is empty: a damaged step
        os.makedirs(os.path.join(folder, f"step-{step}"))
        with open(os.path.join(folder, f"step-{step}", "COMMITTED"), "w") as f:
            f.write(marker)
    assert f"newest committed checkpoint: {os.path.join(folder, 'step-2')};" in failure_message(config, other)


# --------------------------------------------------------------------------- MoE auxiliary loss


def moe_twins(alpha: float):
    """A tiny Qwen3-MoE (no routing bias, so only the scores choose) and an identical copy."""
    from raytitan.models.qwen3_moe.args import ModelArgs as MoEModelArgs
    from raytitan.models.qwen3_moe.model import Transformer as MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(MoEModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, moe_inter_dim=16,
                                        num_experts=4, top_k=2, vocab_size=61, max_seq_len=16,
                                        load_balance_coeff=None, aux_loss_alpha=alpha))
    model.init_weights()
    return model, copy.deepcopy(model)


def gradients_of_a_step(model, tokens, local_batch_size):
    """The gradients one train_step leaves (lr 0, no clipping), its loss, and its auxiliary loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(ModelRunner([model]), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      loader=None, checkpoint=CheckpointManager("unused", {}, keep_latest_k=0), metrics=None,
                      state=None, device=torch.device("cpu"), local_batch_size=local_batch_size,
                      schedule=Schedule(1, 1, 1, False, 0), max_norm=0.0, loss_group=None)
    loss, _, applied = trainer.train_step(tokens)
    assert applied
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss, trainer.aux_loss


@pytest.mark.parametrize("alpha", [0.05, 0.0])
def test_the_moe_auxiliary_loss_is_in_the_gradient_as_one_big_batchs(alpha):
    """training.load_balance_loss_weight > 0: 4 microbatches of 2 sequences give the gradients
    autograd gives for (token-mean cross entropy + the auxiliary loss averaged over all 8
    sequences) in one pass, the logged loss stays the cross entropy alone and moe/aux_loss is
    the auxiliary loss; the router's gradient differs from the cross entropy's alone. At 0
    nothing is added: the gradients are the cross entropy's and no auxiliary loss is kept."""
    from raytitan.models.moe import aux_loss

    model, twin = moe_twins(alpha)
    tokens = torch.randint(0, 61, (8, 17))
    grads, loss, aux = gradients_of_a_step(model, tokens, local_batch_size=2)

    lm = torch.nn.functional.cross_entropy(twin(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    expected_aux = aux_loss(twin)
    total = lm if expected_aux is None else lm + expected_aux
    expected = dict(zip([n for n, _ in twin.named_parameters()], torch.autograd.grad(total, list(twin.parameters()))))
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    assert abs(loss.item() - lm.item()) < 1e-5
    router = next(n for n in grads if n.endswith("router.gate.weight"))
    lm_only = torch.autograd.grad(
        torch.nn.functional.cross_entropy(twin(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()),
        dict(twin.named_parameters())[router])[0]
    if alpha > 0:
        assert aux is not None and abs(aux.item() - expected_aux.item()) < 1e-6 and expected_aux.item() > 0
        assert not torch.allclose(grads[router], lm_only, rtol=1e-3, atol=0)
    else:
        assert aux is None and expected_aux is None
        torch.testing.assert_close(grads[router], lm_only, rtol=1e-4, atol=1e-7)


def test_the_auxiliary_loss_weight_needs_an_moe_model_and_whole_sequences_on_each_rank():
    """training.load_balance_loss_weight reaches the MoE layers' args; a dense model, or a layout
    that splits sequences (tensor, context parallel) or owns the backward (pipeline), is refused
    naming the key."""
    from raytitan.config.job import ConfigError, JobConfig
    from raytitan.distributed.dims import ParallelDims
    from raytitan.models.qwen3_moe.args import FLAVORS
    from raytitan.trainer.build import with_aux_loss

    config = JobConfig()
    flat = ParallelDims(1, 2, 1, 1, 1, 2)
    assert with_aux_loss(FLAVORS["debugmodel"], flat, config) is FLAVORS["debugmodel"]  # 0: unchanged
    config.training.load_balance_loss_weight = 1e-3
    assert with_aux_loss(FLAVORS["debugmodel"], flat, config).moe.aux_loss_alpha == 1e-3
    with pytest.raises(ConfigError, match=r"training.load_balance_loss_weight = 0.001 needs a Mixture-of-Experts"):
        with_aux_loss(ARGS, flat, config)
    for layout, name in (((1, 1, 1, 2, 1, 2), "tensor"), ((1, 1, 2, 1, 1, 2), "context"),
                         ((1, 1, 1, 1, 2, 2), "pipeline")):
        with pytest.raises(ConfigError, match=rf"does not combine with {name} parallel yet.*"
                                              rf"parallelism.{name}_parallel_degree = 1"):
            with_aux_loss(FLAVORS["debugmodel"], ParallelDims(*layout), config)


def test_the_auxiliary_loss_gradient_is_the_same_under_full_activation_checkpointing():
    """The recomputed forward routes again; the auxiliary loss kept from the first forward still
    reaches the router through the recomputation, with the same gradients as without it."""
    from raytitan.distributed.activation_checkpoint import apply_activation_checkpointing

    model, twin = moe_twins(0.05)
    apply_activation_checkpointing(twin, "full")
    tokens = torch.randint(0, 61, (4, 17))
    grads = []
    for m in (model, twin):
        runner = ModelRunner([m])
        runner.forward_backward(tokens[:, :-1], tokens[:, 1:], float(tokens[:, 1:].numel()), 4.0)
        assert runner.take_aux_loss() > 0
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
