"""A user's own model family (examples/custom_model, a GPT-2-style decoder) under the model
contract, on one process: found by model.name, built on meta, initialized, trained a step, cut
into pipeline stages; what it does not support fails with a clear error. Its multi-rank layouts
and a Ray run with a worker killed are in tests/test_elastic.py."""

import dataclasses
import os
import sys

import pytest
import torch
from torch import nn

import raytitan
from raytitan import convert as convert_cli
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.config.job import ConfigError
from raytitan.config.plan import plan_run
from raytitan.distributed.attention import CausalAttention
from raytitan.distributed.pipeline import keep_stage
from raytitan.models import get_spec, source_root
from raytitan.models.spec import ModelSpec, build_meta

NAME = "examples.custom_model:spec"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return get_spec(NAME)


def args_of(spec, **changes):
    return dataclasses.replace(spec.flavor("debugmodel"), vocab_size=97, max_seq_len=32, **changes)


def built(spec, seed=0) -> nn.Module:
    """Built on meta, materialized and initialized: the path every rank takes."""
    model = build_meta(spec, args_of(spec)).to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def test_the_spec_is_found_by_module_and_attribute_and_builds_on_meta(spec):
    assert spec.name == "gpt" and "debugmodel" in spec.flavors and spec.hf is None
    model = build_meta(spec, args_of(spec))
    assert all(p.is_meta for p in model.parameters())
    assert type(model).__name__ == "GPT" and model.args == args_of(spec)
    # The contract: blocks in a ModuleDict keyed 0..n-1, attention through CausalAttention.
    assert isinstance(model.layers, nn.ModuleDict) and list(model.layers) == ["0", "1", "2", "3"]
    assert sum(isinstance(m, CausalAttention) for m in model.modules()) == 4
    for name in spec.first_stage_modules + spec.last_stage_modules:
        assert isinstance(getattr(model, name), nn.Module), name


def test_init_weights_sets_every_parameter_and_is_seeded(spec):
    model, again = built(spec), built(spec)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
    layer = model.layers["0"]
    assert torch.equal(layer.ln_1.weight, torch.ones(128)) and torch.equal(layer.attn.wq.bias, torch.zeros(128))
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 2e-3
    assert layer.mlp.proj.weight.std() < layer.mlp.fc.weight.std() / 2  # residual projections depth-scaled


def test_one_process_forward_backward_is_causal_and_learns(spec):
    model = built(spec)
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 32, 97)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0]


def test_pipeline_stages_pass_hidden_states_and_compose_to_the_whole_model(spec):
    model = built(spec)
    first, last = built(spec), built(spec)
    keep_stage(first, [0, 1], first=True, last=False, first_modules=spec.first_stage_modules,
               last_modules=spec.last_stage_modules)
    keep_stage(last, [2, 3], first=False, last=True, first_modules=spec.first_stage_modules,
               last_modules=spec.last_stage_modules)
    assert first.norm is None and last.tok_embeddings is None and last.pos_embeddings is None
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens)), model(tokens), rtol=0, atol=0)


def test_context_parallel_positions_select_the_position_embeddings(spec):
    """A context-parallel rank holds some positions of each sequence (``model.positions``): its
    embeddings are the ones of those positions, not of 0..len-1."""
    model = built(spec)
    model.layers.clear()  # embeddings and head only: attention would mix positions
    tokens = torch.randint(0, 97, (1, 8))
    held = torch.tensor([0, 1, 6, 7])
    with torch.no_grad():
        whole = model(tokens)
        model.positions = held
        torch.testing.assert_close(model(tokens[:, held]), whole[:, held], rtol=0, atol=0)


def test_flops_per_token_count_attention_on_top_of_the_parameters(spec):
    args = args_of(spec)
    model = build_meta(spec, args)
    embeddings = model.tok_embeddings.weight.numel() + model.pos_embeddings.weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - embeddings
    assert spec.training_flops_per_token(args, model, 64) == 6 * dense + 12 * 4 * 128 * 64


def config(**overrides):
    return raytitan.load_config(None, **{"model__name": NAME, "training__seq_len": 64,
                                         "training__dataset": "synthetic", **overrides})


def test_the_run_folder_is_named_without_a_colon_and_llama_runs_keep_their_name():
    assert config().run_name == "examples.custom_model.spec-debugmodel"
    assert raytitan.load_config(None).run_name == "llama3-debugmodel"
    assert config(ray__name="mine").run_name == "mine"


def test_layouts_it_cannot_split_and_missing_names_are_config_errors():
    plan = plan_run(config(parallelism__tensor_parallel_degree=2), 2, resolve_data=False)
    assert plan.dims.tp == 2 and plan.model_args.max_seq_len == 64 and plan.model_args.vocab_size == 259
    with pytest.raises(ConfigError, match="tensor_parallel_degree 8 does not divide the model's 4 heads"):
        plan_run(config(parallelism__tensor_parallel_degree=8), 8, resolve_data=False)
    with pytest.raises(ConfigError, match="training.seq_len = 2048 is above the longest context of gpt debugmodel"):
        plan_run(config(training__seq_len=2048), 1, resolve_data=False)
    with pytest.raises(ConfigError, match="training.seq_len 2048 is longer than the model's 1024 positions"):
        plan_run(config(training__seq_len=2048, training__allow_seq_len_above_model_max=True), 1, resolve_data=False)
    with pytest.raises(ConfigError, match="'7B' is not a gpt flavor: one of debugmodel, 124M"):
        plan_run(config(model__flavor="7B"), 1, resolve_data=False)
    with pytest.raises(ConfigError, match="cannot import examples.no_such_model .*importable from the working"):
        plan_run(config(model__name="examples.no_such_model:spec"), 1, resolve_data=False)
    with pytest.raises(ConfigError, match="examples.custom_model.GPT is type, not a raytitan.models.spec.ModelSpec"):
        plan_run(config(model__name="examples.custom_model:GPT"), 1, resolve_data=False)
    with pytest.raises(ConfigError, match="'examples.custom_model' is not a built-in model"):
        plan_run(config(model__name="examples.custom_model"), 1, resolve_data=False)


def test_without_an_hf_adapter_hugging_face_import_and_export_fail_clearly(spec, tmp_path, capsys):
    with pytest.raises(ConfigError, match="has no Hugging Face adapter: checkpoint.initial_load_in_hf and "
                                          "last_save_in_hf need one"):
        plan_run(config(checkpoint__last_save_in_hf=True), 1, resolve_data=False)
    args = args_of(spec)
    info = {"model": NAME, "flavor": "debugmodel", "model_args": dataclasses.asdict(args)}
    step = CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([built(spec)])}, 0, commit_info=info).save(1)
    assert convert_cli.main(["to-hf", step, str(tmp_path / "hf")]) != 0
    assert "model 'gpt' has no Hugging Face adapter: export it with to-torch instead" in capsys.readouterr().err
    assert convert_cli.main(["to-torch", step, str(tmp_path / "weights.pt")]) == 0
    weights = torch.load(tmp_path / "weights.pt")
    assert torch.equal(weights["pos_embeddings.weight"], built(spec).pos_embeddings.weight)


def test_local_ray_workers_import_the_spec_from_where_the_driver_did(tmp_path, monkeypatch):
    """A spec outside the working directory (a notebook that extended sys.path) still imports on
    the workers of a local Ray instance: its folder goes on their PYTHONPATH."""
    from raytitan.ray.launcher import import_root, worker_import_path

    package = tmp_path / "elsewhere" / "my_gpt_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from examples.custom_model import spec\n")
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    try:
        assert source_root("my_gpt_models:spec") == str(tmp_path / "elsewhere") and source_root("llama3") is None
        path = worker_import_path(config(model__name="my_gpt_models:spec"))
        assert path.split(os.pathsep) == [import_root(), str(tmp_path / "elsewhere")]
    finally:
        sys.modules.pop("my_gpt_models", None)
    assert worker_import_path(config()) == import_root()  # the example sits in the repository root
