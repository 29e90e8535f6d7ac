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


def check_fsdp_matches_one_process(tmp_path, data_dir, model_name: str, moe_layer: str) -> None:
    """From the same seed weights, FSDP over 2 ranks (each counting its own tokens, the bias update
    summed over both) gives one process's first 3 losses within 1e-4, and the optimizer-step hook
    runs in the real trainer: layer ``moe_layer``'s saved bias has moved off zero."""
    import os

    from raytitan.components.checkpoint.convert import check_files, load_tensors
    from tests.helpers import run_ranks, tiny_config

    def config(name, **sections):
        return tiny_config(str(tmp_path / name), data_dir, model={"name": model_name, "flavor": "debugmodel"},
                           training={"steps": 3, "local_batch_size": 8 if name != "fsdp" else 4}, **sections)

    seed = os.path.join(str(tmp_path / "seed"), "run", "checkpoint", "step-0")
    start = {"enable": True, "interval": 3, "initial_load_path": seed}
    _, one = run_ranks([config("seed", checkpoint={"create_seed_checkpoint": True}),
                        config("one", checkpoint=start)], 1, str(tmp_path))
    two = run_ranks(config("fsdp", checkpoint=start), 2, str(tmp_path))
    assert len(one["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)

    step = os.path.join(str(tmp_path / "fsdp"), "run", "checkpoint", "step-3")
    key = f"model.layers.{moe_layer}.moe.router.expert_bias"
    assert load_tensors(step, check_files(step), [key])[key].abs().sum() > 0
