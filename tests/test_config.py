import dataclasses
import os

import pytest

from raytitan import load_config
from raytitan.config.job import SECTIONS, ConfigError, JobConfig, parse_args, to_toml
from raytitan.config.plan import plan_run

from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_toml_then_overrides(tmp_path):
    path = write(tmp_path, '[training]\nsteps = 7\nseq_len = 128\n[optimizer]\nlr = 0.01\n')
    c = parse_args(["--job.config_file", path, "--training.steps=9", "--optimizer.lr", "3e-4",
                    "--no-checkpoint.enable", "--metrics.enable_tensorboard",
                    "--ray.resources_per_worker", "CPU=0.5,GPU=1"])
    assert c.training.steps == 9  # command line beats TOML
    assert c.training.seq_len == 128  # TOML beats default
    assert c.optimizer.lr == 3e-4
    assert c.checkpoint.enable is False and c.metrics.enable_tensorboard is True
    assert c.ray.resources_per_worker == {"CPU": 0.5, "GPU": 1.0}
    assert c.training.local_batch_size == JobConfig().training.local_batch_size


def test_resolved_config_round_trips_through_toml(tmp_path):
    c = parse_args(["--training.steps", "11", "--ray.name", "x", "--ray.resources_per_worker", "CPU=2"])
    again = parse_args(["--job.config_file", write(tmp_path, to_toml(c))])
    again.job.config_file = c.job.config_file
    assert again == c


@pytest.mark.parametrize("argv, message", [
    (["--training.stpes", "3"], "did you mean 'training.steps'"),
    (["--trainig.steps", "3"], "did you mean 'training.steps'"),
    (["--training.steps", "three"], "training.steps: expected int"),
    (["--training.steps"], "needs a value"),
    (["--no-training.steps"], "only boolean keys"),
    (["steps=3"], "unexpected argument"),
    (["--job.config_file", "/nonexistent.toml"], "no such file"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optimizer.lr'"):
        parse_args(["--job.config_file", write(tmp_path, "[optimizer]\nlrr = 1\n")])
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--job.config_file", write(tmp_path, "[optimizer\n")])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}" in out


def test_nested_toml_tables_and_dotted_keys(tmp_path):
    """torchtitan's [quantize.linear.float8] table, and the same keys on the command line."""
    path = write(tmp_path, '[model]\nconverters = ["quantize.linear.float8"]\n'
                           '[quantize.linear.float8]\nrecipe_name = "rowwise"\nfilter_fqns = ["output", "w2"]\n')
    c = parse_args(["--job.config_file", path, "--quantize.linear.float8.emulate"])
    assert c.float8.recipe_name == "rowwise" and c.float8.filter_fqns == ["output", "w2"] and c.float8.emulate
    assert JobConfig.from_dict(c.to_dict()) == c
    assert parse_args(["--job.config_file", write(tmp_path, to_toml(c))]).float8 == c.float8
    with pytest.raises(ConfigError, match="did you mean 'quantize.linear.float8.emulate'"):
        parse_args(["--quantize.linear.float8.emulat"])


def test_selective_ac_option_takes_a_toml_integer(tmp_path, data_dir):
    """torchtitan configs write ``selective_ac_option = 2``; it means the same as "2" on the command line."""
    path = write(tmp_path, '[activation_checkpoint]\nmode = "selective"\nselective_ac_option = 2\n')
    c = parse_args(["--job.config_file", path])
    assert c.activation_checkpoint.selective_ac_option == "2"
    assert parse_args(["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                       "2"]).activation_checkpoint == c.activation_checkpoint
    assert parse_args(["--job.config_file", write(tmp_path, to_toml(c))]).activation_checkpoint == c.activation_checkpoint
    plan_run(tiny_config(str(tmp_path), data_dir, activation_checkpoint={"mode": "selective", "selective_ac_option": 2}), 2)


@pytest.mark.parametrize("value, message", [
    ("0", "use 'op' or a positive integer"),
    ("-1", "use 'op' or a positive integer"),
    ('"foo"', "use 'op' or a positive integer"),
    ("2.5", "expected str or int"),
    ("true", "expected str or int"),
])
def test_selective_ac_option_rejects_what_names_no_policy(tmp_path, data_dir, value, message):
    path = write(tmp_path, f'[activation_checkpoint]\nmode = "selective"\nselective_ac_option = {value}\n')
    with pytest.raises(ConfigError, match=f"activation_checkpoint.selective_ac_option.*{message}"):
        config = parse_args(["--job.config_file", path])
        config.job.dump_folder, config.training.dataset, config.training.dataset_path = str(tmp_path), "files", data_dir
        plan_run(config, 2)


def test_shipped_configs_parse():
    for name in os.listdir(os.path.join(REPO, "configs")):
        c = parse_args(["--job.config_file", os.path.join(REPO, "configs", name)])
        assert c.model.flavor


@pytest.mark.parametrize("name, world, layout", [
    ("llama3_8b.toml", 8, (8, 1, 1)),
    ("llama3_70b.toml", 64, (8, 8, 1)),
    ("llama3_405b.toml", 128, (8, 8, 2)),
    ("qwen3_8b.toml", 8, (8, 1, 1)),
    ("qwen3_32b.toml", 32, (8, 4, 1)),
])
def test_shipped_recipes_form_valid_layouts(name, world, layout):
    """The GPU recipes plan at their world size (tokenizer and data swapped for ones present here)."""
    c = parse_args(["--job.config_file", os.path.join(REPO, "configs", name), "--model.tokenizer", "byte"])
    c.model.hf_assets_path = None
    plan = plan_run(c, world, resolve_data=False)
    assert (plan.dims.dp_shard, plan.dims.tp, plan.dims.pp) == layout


def test_fit_api_overrides():
    c = load_config(os.path.join(REPO, "configs", "llama3_debug.toml"), training__steps=3)
    assert c.training.steps == 3 and c.ray.num_workers == 2
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, training__nope=1)


@pytest.mark.parametrize("sections, world, message", [
    ({"parallelism": {"data_parallel_shard_degree": 3}}, 2, "world size is 2"),
    ({"parallelism": {"data_parallel_replicate_degree": 3}}, 2, "not divisible"),
    ({"parallelism": {"tensor_parallel_degree": 4}, "model": {"flavor": "tiny"}}, 4,
     "tensor_parallel_degree 4 does not divide the model's n_kv_heads \\(2\\)"),
    ({"parallelism": {"context_parallel_degree": 3}, "training": {"seq_len": 64}}, 3,
     "seq_len 64 is not divisible by 2 x context_parallel_degree x tensor_parallel_degree = 6"),
    ({"parallelism": {"tensor_parallel_degree": 2}, "training": {"seq_len": 63}}, 2, "not divisible by tensor_parallel"),
    ({"parallelism": {"context_parallel_degree": 2}, "ray": {"use_gpu": True},
      "training": {"mixed_precision_param": "float32"}}, 2, "flash attention, which needs bfloat16"),
    ({"parallelism": {"context_parallel_rotate_method": "ring"}}, 2, "allgather, alltoall"),
    ({"parallelism": {"pipeline_parallel_degree": 4}, "model": {"flavor": "tiny"}}, 4,
     "4 layers cannot fill 4 pipeline stages"),
    ({"parallelism": {"pipeline_parallel_degree": 2, "pipeline_parallel_microbatch_size": 3}}, 2,
     "microbatch_size 3 does not divide the local batch size 4"),
    ({"parallelism": {"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "ZBVZeroBubble",
                      "pipeline_parallel_layers_per_stage": 1}}, 2, "needs exactly 2 stages per rank, the layout gives 4"),
    ({"parallelism": {"pipeline_parallel_degree": 2, "pipeline_parallel_layers_per_stage": 3}}, 2,
     "layers_per_stage = 3 does not divide 6 layers"),
    ({"parallelism": {"pipeline_parallel_schedule": "Zigzag"}}, 2, "pipeline_parallel_schedule"),
    ({"parallelism": {"enable_async_tensor_parallel": True}}, 2, "needs CUDA and torch.compile"),
    ({"parallelism": {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}}, 2,
     "world size 2 is not divisible by replicate x cp x tp x pp = 4"),
    ({"training": {"global_batch_size": 10}}, 2, "not divisible by local_batch_size 4 x data-parallel degree 2"),
    ({"training": {"seq_len": -1}}, 2, "training.seq_len must be > 0"),
    ({"optimizer": {"weight_decay": -0.1}}, 2, "optimizer.weight_decay must be >= 0"),
    ({"model": {"flavor": "7B"}}, 2, "model.flavor"),
    ({"model": {"tokenizer": "hf"}}, 2, "needs model.hf_assets_path"),
    ({"model": {"hf_assets_path": "/nonexistent"}}, 2, "no such folder"),
    ({"training": {"dataset_path": "/nonexistent/*.json.gz"}}, 2, "no shards"),
    ({"lr_scheduler": {"decay_type": "step"}}, 2, "lr_scheduler.decay_type"),
    ({"checkpoint": {"initial_load_path": "/nonexistent"}}, 2, "not a committed checkpoint"),
    ({"checkpoint": {"initial_load_path": "/nonexistent", "initial_load_in_hf": True}}, 2, "has no config.json"),
    ({"checkpoint": {"initial_load_in_hf": True}}, 2, "initial_load_in_hf needs checkpoint.initial_load_path"),
    ({"checkpoint": {"initial_load_path": "/nonexistent/model.pt"}}, 2, "no such file '/nonexistent/model.pt'"),
    ({"checkpoint": {"exclude_from_loading": ["optimizer", "optimiser"]}}, 2, "optimiser not among"),
    ({"checkpoint": {"async_mode": "background"}}, 2, "checkpoint.async_mode"),
    ({"checkpoint": {"export_dtype": "int8"}}, 2, "checkpoint.export_dtype"),
    ({"activation_checkpoint": {"mode": "partial"}}, 2, "activation_checkpoint.mode"),
    ({"activation_checkpoint": {"mode": "selective", "selective_ac_option": "0"}}, 2, "use 'op' or a positive"),
    ({"compile": {"components": ["model", "optimizer"]}}, 2, "compile.components: optimizer"),
    ({"model": {"converters": ["int4"]}}, 2, "model.converters: int4 unknown"),
    ({"quantize.linear.float8": {"recipe_name": "rowwise", "enable_fsdp_float8_all_gather": True}}, 2,
     "needs recipe_name = 'tensorwise'"),
    ({"quantize.linear.float8": {"precompute_float8_dynamic_scale_for_fsdp": True}}, 2,
     "needs enable_fsdp_float8_all_gather"),
])
def test_preflight_errors(tmp_path, data_dir, sections, world, message):
    config = tiny_config(str(tmp_path), data_dir, **sections)
    with pytest.raises(ConfigError, match=message):
        plan_run(config, world)


def test_preflight_takes_a_torch_file_for_weights_only(tmp_path, data_dir):
    import torch

    torch.save({"norm.weight": torch.ones(4)}, tmp_path / "model.pt")
    path = str(tmp_path / "model.pt")
    plan_run(tiny_config(str(tmp_path), data_dir, checkpoint={"initial_load_path": path}), 2)
    with pytest.raises(ConfigError, match="a .pt file gives weights only"):
        plan_run(tiny_config(str(tmp_path), data_dir,
                             checkpoint={"initial_load_path": path, "initial_load_model_only": False}), 2)


def test_preflight_heads_and_vocab(tmp_path, data_dir, monkeypatch):
    from raytitan.models.llama3 import args

    monkeypatch.setitem(args.FLAVORS, "odd", args.ModelArgs(dim=256, n_layers=1, n_heads=16, n_kv_heads=5))
    monkeypatch.setitem(args.FLAVORS, "small_vocab", args.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=100))
    with pytest.raises(ConfigError, match="not divisible by n_kv_heads 5"):
        plan_run(tiny_config(str(tmp_path), data_dir, model={"flavor": "odd"}), 1)
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 259"):
        plan_run(tiny_config(str(tmp_path), data_dir, model={"flavor": "small_vocab"}), 1)


def test_plan_accepts_composed_layouts(tmp_path, data_dir):
    plan = plan_run(tiny_config(str(tmp_path), data_dir, parallelism={
        "tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "context_parallel_degree": 2}), 16)
    assert (plan.dims.dp_shard, plan.dims.tp, plan.dims.pp, plan.dims.cp, plan.dims.dp) == (2, 2, 2, 2, 2)


def test_plan_derives_accumulation(tmp_path, data_dir):
    plan = plan_run(tiny_config(str(tmp_path), data_dir, training={"global_batch_size": 16, "local_batch_size": 2}), 2)
    assert (plan.dims.dp, plan.accumulation_steps, plan.model_args.vocab_size) == (2, 4, 259)
    assert len(plan.shards) == 4


def test_none_on_the_command_line_unsets_optional_keys(tmp_path):
    """``--section.key None`` means unset for every optional key, strings included (TOML has no
    null, so the command line and dicts are where None is written)."""
    path = write(tmp_path, '[model]\nhf_assets_path = "/tokenizer"\n[ray]\nname = "x"\n')
    c = parse_args(["--job.config_file", path, "--model.hf_assets_path", "None", "--ray.name=none",
                    "--checkpoint.initial_load_path", "None", "--lr_scheduler.decay_ratio", "None"])
    assert c.model.hf_assets_path is None and c.ray.name is None and c.checkpoint.initial_load_path is None
    assert c.lr_scheduler.decay_ratio is None
    assert c.run_name == JobConfig().run_name  # the default run name, not a run called "None"
    assert parse_args(["--ray.name", "Nonesuch"]).ray.name == "Nonesuch"
    assert parse_args(["--activation_checkpoint.mode", "none"]).activation_checkpoint.mode == "none"  # a value
    with pytest.raises(ConfigError, match="training.steps: expected int"):
        parse_args(["--training.steps", "None"])  # not optional: None is no value for it
