import copy

import torch

from raytitan.components.checkpoint.manager import CheckpointManager
from raytitan.models.llama3.args import ModelArgs
from raytitan.models.llama3.model import Transformer
from raytitan.components.loss import cross_entropy_sum
from raytitan.components.optimizer import PartOptimizers, WarmupStableDecay, build_lr_scheduler
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
    loss_a, norm_a = make_trainer(model, local_batch_size=2).train_step(tokens)  # 4 microbatches of 2
    loss_b, norm_b = make_trainer(twin, local_batch_size=8).train_step(tokens)  # 1 microbatch of 8
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
    loss, _ = make_trainer(model, local_batch_size=1).train_step(tokens)
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


def test_lr_schedule_shapes():
    wsd = WarmupStableDecay(warmup_steps=4, total_steps=20, decay_ratio=0.25, decay_type="linear", min_lr_factor=0.1)
    factors = [wsd(s) for s in range(20)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8]  # linear warmup
    assert all(f == 1.0 for f in factors[4:15])  # stable
    assert factors[15] == 1.0 and factors[19] < factors[16] < 1.0  # decays over the last quarter
    assert abs(wsd(20) - 0.1) < 1e-9  # reaches min_lr_factor
    cosine = WarmupStableDecay(0, 10, None, "cosine", 0.0)
    sqrt = WarmupStableDecay(0, 10, None, "sqrt", 0.0)
    assert abs(cosine(5) - 0.5) < 1e-9 and abs(sqrt(5) - (1 - 0.5**0.5)) < 1e-9


def test_schedule_reports_at_checkpoints_validations_and_the_end():
    s = Schedule(total_steps=10, log_freq=4, checkpoint_interval=3, checkpoint_enabled=True, validation_freq=5)
    assert [t for t in range(1, 11) if s.reports(t)] == [3, 5, 6, 9, 10]
    assert [t for t in range(1, 11) if s.logs(t, first_step=7)] == [1, 4, 7, 8, 10]
    off = Schedule(total_steps=10, log_freq=100, checkpoint_interval=3, checkpoint_enabled=False, validation_freq=0)
    assert [t for t in range(1, 11) if off.reports(t)] == [10]


def test_the_loop_reads_losses_back_only_on_the_steps_it_logs(monkeypatch):
    """Reading a tensor's value waits for the device: the loop does it for the loss and gradient
    norm on logged and reported steps only, never on the others."""
    from raytitan.components.data.loader import RankBatch
    from raytitan.trainer.loop import TrainState

    class Loader:
        global_batch_size, bad_records = 4, 0

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
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(trainer.state.step) or item(t))
    trainer.fit()
    assert trainer.metrics.logged == [1, 3, 6, 7]
    assert sorted(set(reads)) == [1, 3, 6, 7] and len(reads) == 2 * 4  # loss and grad norm, on those steps only
