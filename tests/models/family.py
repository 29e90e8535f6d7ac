"""What the model families' tests share: one thread for tiny shapes, the relative difference of
two outputs, and a committed step of a model's weights (for the Hugging Face export)."""

import dataclasses

import pytest
import torch

from raytitan.components.checkpoint.manager import CheckpointManager, ModelState


@pytest.fixture(autouse=True)
def one_thread():
    """Shapes this small gain nothing from threads, and on a busy machine the many tiny
    parallel regions of a training loop wait on each other for seconds. A test module that
    imports this fixture uses it for all its tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def save_step(folder, model, args, family: str, flavor: str = "debugmodel", step: int = 1) -> str:
    """``model``'s weights as committed step ``step`` in ``folder``, with the facts an export reads."""
    info = {"model": family, "flavor": flavor, "model_args": dataclasses.asdict(args), "tokenizer": "byte",
            "bos_id": 256, "eos_id": 257}
    return CheckpointManager(str(folder), {"model": ModelState([model])}, 0, commit_info=info).save(step)


def train_repeated_batch(model, spec, vocab: int, watched_layer: str, steps: int = 10):
    """``steps`` AdamW steps on one repeated batch, running the spec's after-optimizer-step hook
    as the trainer chains it; returns the losses and ``watched_layer``'s expert bias after each."""
    from raytitan.trainer.build import after_optimizer_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    hook = after_optimizer_step(spec, [model], None, False)
    tokens = torch.randint(0, vocab, (2, 17))
    losses, biases = [], []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hook()
        losses.append(loss.item())
        biases.append(model.layers[watched_layer].moe.router.expert_bias.clone())
    return losses, biases, tokens
