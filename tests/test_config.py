import dataclasses
import os

import pytest

from raytitan import load_config
from raytitan.config.job import SECTIONS, ConfigError, JobConfig, parse_args, to_toml
from raytitan.config.plan import plan_run

from tests.helpers import RaytitanLog, tiny_config

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
    from raytitan.config.torchtitan import KEYS

    for key in KEYS:
        assert f"--{key}" in out
    assert "--section.no-key" in out and "--lr-scheduler.warmup-steps" in out


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
    ({"training": {"seq_len": -1}}, 2, "training.seq_len = -1 is out of range: it takes >= 1"),
    ({"optimizer": {"weight_decay": -0.1}}, 2, "optimizer.weight_decay = -0.1 is out of range: it takes >= 0"),
    ({"model": {"flavor": "7B"}}, 2, "model.flavor"),
    ({"model": {"tokenizer": "hf"}}, 2, "needs model.hf_assets_path"),
    ({"model": {"hf_assets_path": "/nonexistent"}}, 2, "no such folder"),
    ({"training": {"dataset_path": "/nonexistent/*.json.gz"}}, 2, "no shards"),
    ({"lr_scheduler": {"decay_type": "step"}}, 2, "lr_scheduler.decay_type"),
    ({"lr_scheduler": {"total_steps": 0}}, 2, "lr_scheduler.total_steps = 0 is out of range: it takes >= 1 \\(or unset\\)"),
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
    # A flavor's vocabulary smaller than the tokenizer's is no error: the model's follows the tokenizer.
    with RaytitanLog() as log:
        plan = plan_run(tiny_config(str(tmp_path), data_dir, model={"flavor": "small_vocab"}), 1)
    assert plan.model_args.vocab_size == 259
    assert log.messages("WARNING") == ["llama3 small_vocab publishes a vocabulary of 100; the tokenizer (bytes) has "
                                       "259: training with 259 (the model's vocabulary follows the tokenizer)"]


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


# --------------------------------------------------------------------------- torchtitan carry-over

# torchtitan v0.2.x's four Llama 3 TOMLs (torchtitan/models/llama3/train_configs/, the same at
# v0.2.0, v0.2.1 and v0.2.2): their keys and values, written out here section by section.
TORCHTITAN_DEBUG_MODEL = {
    "job": {"dump_folder": "./outputs", "description": "Llama 3 debug training", "print_config": False},
    "profiling": {"enable_profiling": False, "save_traces_folder": "profile_trace", "profile_freq": 10,
                  "enable_memory_snapshot": False, "save_memory_snapshot_folder": "memory_snapshot"},
    "metrics": {"log_freq": 1, "disable_color_printing": False, "enable_tensorboard": False, "save_tb_folder": "tb",
                "enable_wandb": False},
    "model": {"name": "llama3", "flavor": "debugmodel", "hf_assets_path": "./tests/assets/tokenizer"},
    "optimizer": {"name": "AdamW", "lr": 8e-4, "eps": 1e-8},
    "lr_scheduler": {"warmup_steps": 2, "decay_ratio": 0.8, "decay_type": "linear", "min_lr_factor": 0.0},
    "training": {"local_batch_size": 8, "seq_len": 2048, "max_norm": 1.0, "steps": 10, "dataset": "c4_test"},
    "parallelism": {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                    "fsdp_reshard_after_forward": "default", "tensor_parallel_degree": 1,
                    "enable_async_tensor_parallel": False, "pipeline_parallel_degree": 1,
                    "pipeline_parallel_schedule": "Interleaved1F1B", "context_parallel_degree": 1},
    "checkpoint": {"enable": False, "folder": "checkpoint", "interval": 10, "last_save_model_only": False,
                   "export_dtype": "float32", "async_mode": "disabled"},
    "activation_checkpoint": {"mode": "selective", "selective_ac_option": "2"},
    "compile": {"enable": False, "components": ["model", "loss"]},
    "quantize.linear.float8": {"enable_fsdp_float8_all_gather": False, "precompute_float8_dynamic_scale_for_fsdp": False,
                               "filter_fqns": ["output"]},
    "validation": {"enable": False, "dataset": "c4_validation", "freq": 5, "steps": 10},
}


def torchtitan_llama3(size: str, lr: float, warmup: int, local_batch: int, steps: int, tp: int, ac: dict,
                      float8: bool, **extra: dict) -> dict:
    """llama3_8b.toml, llama3_70b.toml and llama3_405b.toml share their shape; these are what differ."""
    sections = {
        "job": {"dump_folder": "./outputs", "description": f"Llama 3 {size} training"},
        "profiling": {"enable_profiling": True, "save_traces_folder": "profile_trace", "profile_freq": 100},
        "metrics": {"log_freq": 10, "enable_tensorboard": True, "save_tb_folder": "tb"},
        "model": {"name": "llama3", "flavor": size, "hf_assets_path": f"./assets/hf/Llama-3.1-{size}"},
        "optimizer": {"name": "AdamW", "lr": lr, "eps": 1e-8},
        "lr_scheduler": {"warmup_steps": warmup},
        "training": {"local_batch_size": local_batch, "seq_len": 8192, "max_norm": 1.0, "steps": steps, "dataset": "c4"},
        "parallelism": {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                        "tensor_parallel_degree": tp, "pipeline_parallel_degree": 1, "context_parallel_degree": 1},
        "checkpoint": {"enable": False, "folder": "checkpoint", "interval": 500, "last_save_model_only": True,
                       "export_dtype": "float32", "async_mode": "disabled"},
        "compile": {"enable": float8, "components": ["model", "loss"]},
        "activation_checkpoint": ac,
        "quantize.linear.float8": {"enable_fsdp_float8_all_gather": float8,
                                   "precompute_float8_dynamic_scale_for_fsdp": float8, "filter_fqns": ["output"]},
        "validation": {"enable": False, "dataset": "c4_validation", "freq": 500, "steps": 1200},
    }
    for name, keys in extra.items():
        sections[name].update(keys)
    return sections


TORCHTITAN_LLAMA3 = {
    "debug_model": (TORCHTITAN_DEBUG_MODEL, 2, (2, 1)),
    "llama3_8b": (torchtitan_llama3("8B", 3e-4, 200, 1, 1000, 1, {"mode": "selective", "selective_ac_option": "op"},
                                    False), 8, (8, 1)),
    "llama3_70b": (torchtitan_llama3("70B", 1.5e-4, 200, 8, 1000, 8, {"mode": "full"}, False), 64, (8, 8)),
    "llama3_405b": (torchtitan_llama3("405B", 8e-5, 600, 2, 3000, 8, {"mode": "full"}, True,
                                      model={"converters": ["float8"]},
                                      parallelism={"enable_async_tensor_parallel": True}), 128, (16, 8)),
}


def toml_text(sections: dict) -> str:
    from raytitan.config.job import toml_value

    return "\n".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
                     for name, keys in sections.items())


@pytest.mark.parametrize("name", list(TORCHTITAN_LLAMA3))
def test_torchtitan_llama3_tomls_load_and_plan(tmp_path, monkeypatch, name):
    """torchtitan's own Llama 3 TOMLs plan unchanged; only the 405B adds a [ray] section (its async
    tensor parallel needs ray.use_gpu). Their hf_assets_path folders (relative to torchtitan's
    repository) are made, with a small BPE tokenizer in them: the run tokenizes with it, and the
    model's vocabulary is its, not the flavor's published 128,256."""
    from raytitan.components.data.tokenizer import HFTokenizer

    from tests.data.test_sources import make_hf_tokenizer

    sections, world, (dp_shard, tp) = TORCHTITAN_LLAMA3[name]
    monkeypatch.chdir(tmp_path)
    folder = make_hf_tokenizer(sections["model"]["hf_assets_path"])
    text = toml_text(sections) + ("[ray]\nuse_gpu = true\n" if name == "llama3_405b" else "")
    (tmp_path / f"{name}.toml").write_text(text)
    with RaytitanLog() as log:
        config = parse_args(["--job.config_file", f"{name}.toml"])
        plan = plan_run(config, world, resolve_data=name == "debug_model")
    assert (plan.dims.dp_shard, plan.dims.tp, plan.dims.pp) == (dp_shard, tp, 1)
    assert config.optimizer.lr == sections["optimizer"]["lr"]
    assert config.lr_scheduler.warmup_steps == sections["lr_scheduler"]["warmup_steps"]
    assert config.training.seq_len == plan.model_args.max_seq_len == sections["training"]["seq_len"]
    assert config.job.description == sections["job"]["description"]
    warnings = log.messages("WARNING")
    ignored = [m for m in warnings if m.startswith("torchtitan keys accepted with no effect")]
    if name == "debug_model":
        assert ignored == ["torchtitan keys accepted with no effect in raytitan: job.print_config, "
                           "metrics.disable_color_printing, metrics.enable_wandb (docs/from_torchtitan.md says what "
                           "raytitan does instead)"]
        assert config.training.dataset == "c4_test" and len(plan.shards) == 1
        assert any("2000 generated English-like documents in C4's format" in m for m in log.messages("INFO"))
    else:
        assert ignored == []
    # torchtitan's hf_assets_path is its tokenizer folder: model.tokenizer = "auto" takes it from there.
    assert config.model.tokenizer == "auto" and plan.model_args.vocab_size == HFTokenizer(folder).vocab_size < 400


def test_torchtitan_keys_are_named_in_one_warning_from_toml_and_command_line(tmp_path):
    path = write(tmp_path, "[job]\nprint_config = true\n[training]\ngc_freq = 10\n"
                           "[training.dataloader]\nnum_workers = 4\npin_memory = true\n[debug]\nseed = 7\n")
    with RaytitanLog() as log:
        c = parse_args(["--job.config_file", path, "--metrics.enable-wandb", "--comm.init-timeout-seconds", "600"])
    assert log.messages("WARNING") == [
        "torchtitan keys accepted with no effect in raytitan: job.print_config, training.gc_freq, "
        "training.dataloader.num_workers, training.dataloader.pin_memory, metrics.enable_wandb, "
        "comm.init_timeout_seconds (docs/from_torchtitan.md says what raytitan does instead)"]
    assert c.training.seed == 7  # debug.seed is torchtitan's name for training.seed: an alias, not ignored
    assert c.torchtitan_ignored["metrics.enable_wandb"] is True
    assert dataclasses.replace(c, torchtitan_ignored={}) == c  # the ignored keys are not part of the config
    assert "enable_wandb" not in to_toml(c) and "[debug]" not in to_toml(c)
    with RaytitanLog() as log:
        load_config(path, metrics__disable_color_printing=True)
    assert len(log.messages("WARNING")) == 1 and "metrics.disable_color_printing" in log.messages("WARNING")[0]


@pytest.mark.parametrize("toml, message", [
    ("[training]\nenable_cpu_offload = true\n", "training.enable_cpu_offload = true in .*only as false: FSDP CPU offload"),
    ('[training]\ndtype = "bfloat16"\n', 'training.dtype = "bfloat16" .*only as "float32".*mixed_precision_param'),
    ('[compile]\nbackend = "aot_eager"\n', 'compile.backend = "aot_eager" .*only as "inductor"'),
    ("[parallelism]\nexpert_tensor_parallel_degree = 2\n",
     "parallelism.expert_tensor_parallel_degree = 2 .*no expert tensor parallel"),
    ('[parallelism]\nexpert_parallel_comm_backend = "deepep"\n', "expert_parallel_comm_backend .*no DeepEP"),
    ('[parallelism]\ncontext_parallel_load_balancer = "ptrr"\n', "only as \"headtail\": context parallel always"),
    ('[parallelism]\npipeline_parallel_schedule_csv = "s.csv"\n', 'only as "" or unset'),
    ("[checkpoint]\nload_only = true\n", "checkpoint.load_only = true .*no load-only mode"),
    ("[checkpoint]\nenable_first_step_checkpoint = true\n", "set checkpoint.interval = 1"),
    ("[optimizer]\nearly_step_in_backward = true\n", "optimizer.early_step_in_backward"),
    ("[fault_tolerance]\nenable = true\n", "fault_tolerance.enable = true .*ray.max_failures, ray.min_workers"),
    ('[model]\ntokenizer_path = "./tok"\n', "model.tokenizer_path .*only as unset.*set model.hf_assets_path"),
    ('[job]\ncustom_config_module = "my.config"\n', "job.custom_config_module .*model.name = package.module:attribute"),
    ("[training]\nseq_len = 2048\n[validation]\nseq_len = 4096\n",
     "validation.seq_len = 4096 differs from training.seq_len = 2048: validation runs at training.seq_len"),
    ("[metrics]\nenable_wandbb = true\n", "unknown config key 'metrics.enable_wandbb'.*did you mean 'metrics.enable_wandb'"),
    ("[training]\nnum_tokens_per_step = 4\n", "unknown config key 'training.num_tokens_per_step'"),
    ("[fault_tolerance]\nreplicas = 2\n", "unknown config key 'fault_tolerance.replicas'"),
    ("[training.dataloader]\nworkers = 2\n", "unknown config key 'training.dataloader.workers'"),
    ("[debug]\nseed = 1.5\n", "debug.seed: expected int"),
])
def test_torchtitan_keys_raytitan_does_not_implement_are_errors_unless_off(tmp_path, toml, message):
    """A torchtitan key whose value asks for something raytitan does not do is an error naming it;
    keys torchtitan never had stay unknown keys."""
    with pytest.raises(ConfigError, match=message):
        parse_args(["--job.config_file", write(tmp_path, toml)])


def test_torchtitan_keys_at_the_values_raytitan_follows_are_accepted(tmp_path):
    path = write(tmp_path, '[training]\nenable_cpu_offload = false\ndtype = "float32"\nseq_len = 512\n'
                           '[validation]\nseq_len = 512\n[compile]\nbackend = "inductor"\n'
                           '[parallelism]\ncontext_parallel_load_balancer = "headtail"\nexpert_tensor_parallel_degree = 1\n'
                           'pipeline_parallel_schedule_csv = ""\n[fault_tolerance]\nenable = false\ngroup_size = 0\n')
    c = parse_args(["--job.config_file", path, "--debug.deterministic"])
    assert c.training.deterministic and c.training.seq_len == 512
    assert list(c.torchtitan_ignored) == [
        "training.enable_cpu_offload", "training.dtype", "validation.seq_len", "compile.backend",
        "parallelism.context_parallel_load_balancer", "parallelism.expert_tensor_parallel_degree",
        "parallelism.pipeline_parallel_schedule_csv", "fault_tolerance.enable", "fault_tolerance.group_size"]
    # validation.seq_len is checked against the final training.seq_len, command line included
    with pytest.raises(ConfigError, match="validation.seq_len = 512 differs from training.seq_len = 1024"):
        parse_args(["--job.config_file", path, "--training.seq_len", "1024"])


@pytest.mark.parametrize("argv, enabled", [
    (["--checkpoint.enable"], True),
    (["--checkpoint.no-enable"], False),  # torchtitan's (tyro's) form
    (["--checkpoint.no_enable"], False),
    (["--no-checkpoint.enable"], False),
    (["--checkpoint.enable", "false"], False),
    (["--checkpoint.enable=false"], False),
    (["--checkpoint.no-enable", "--checkpoint.enable", "true"], True),  # the last one wins
])
def test_boolean_flags_in_both_styles(argv, enabled):
    assert parse_args(argv).checkpoint.enable is enabled


def test_dashed_key_names_on_the_command_line(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\n")
    for argv in (["--lr-scheduler.warmup-steps", "2"], ["--lr_scheduler.warmup_steps", "2"],
                 ["--lr-scheduler.warmup_steps=2"], ["--lr_scheduler.warmup-steps=2"]):
        assert parse_args(argv).lr_scheduler.warmup_steps == 2
    c = parse_args(["--job.config-file", path, "--quantize.linear.float8.no-enable-fsdp-float8-all-gather",
                    "--activation-checkpoint.mode", "full", "--no-metrics.enable-tensorboard"])
    assert c.training.steps == 7 and c.activation_checkpoint.mode == "full" and not c.metrics.enable_tensorboard
    assert not parse_args(["--metrics.no-enable-wandb"]).torchtitan_ignored["metrics.enable_wandb"]
    with pytest.raises(ConfigError, match="--checkpoint.no-folder: only boolean keys"):
        parse_args(["--checkpoint.no-folder"])
    with pytest.raises(ConfigError, match="did you mean 'lr_scheduler.warmup_steps'"):
        parse_args(["--lr-scheduler.warmup-step", "2"])


def test_c4_test_is_a_generated_set_or_the_files_given(tmp_path, data_dir):
    generated = plan_run(tiny_config(str(tmp_path), data_dir, training={"dataset": "c4_test", "dataset_path": None}), 2)
    assert [os.path.basename(p) for p in generated.shards] == ["c4-train.00000-of-00001.json.gz"]
    import gzip

    with gzip.open(generated.shards[0], "rt") as f:
        assert sum(1 for _ in f) == 2000
    given = plan_run(tiny_config(str(tmp_path), data_dir, training={"dataset": "c4_test"}), 2)
    assert given.shards == plan_run(tiny_config(str(tmp_path), data_dir), 2).shards  # the files in dataset_path


def test_from_torchtitan_doc_names_real_keys_and_raytitans_defaults():
    """docs/from_torchtitan.md: the raytitan column of its defaults table is raytitan's default,
    and every raytitan key its tables name exists."""
    import re
    import tomllib

    from raytitan.config.job import key_type, section

    text = open(os.path.join(REPO, "docs", "from_torchtitan.md")).read()
    defaults = JobConfig()
    rows = re.findall(r"^\| `([a-z_0-9.]+)` \| [^|]+ \| ([^|]+?) \|$", text, flags=re.M)
    assert len(rows) >= 20
    for key, ours in rows:
        path, _, name = key.rpartition(".")
        value = tomllib.loads(f"v = {ours.split(' (')[0].strip('` ')}")["v"]
        assert getattr(section(defaults, path), name) == value, key
    sections = "|".join(re.escape(s) for s in sorted(SECTIONS, key=len, reverse=True))
    raytitan_cells = [line.rstrip(" |").rsplit(" | ", 1)[-1] for line in text.splitlines() if line.startswith("| `")]
    named = {k for cell in raytitan_cells for k in re.findall(rf"`((?:{sections})\.[a-z_0-9]+)`", cell)}
    assert len(named) > 15
    assert [k for k in named if key_type(k) is None] == []


# --------------------------------------------------------------------------- numbers, names and folders


def test_every_numeric_key_declares_its_range_and_its_default_is_in_it():
    import typing

    from raytitan.config.job import _base_type

    for path, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _base_type(hints[f.name]) in (int, float):
                assert "allowed" in f.metadata, f"{path}.{f.name} has no range"
                assert f.default is None or f.default in f.metadata["allowed"], f"{path}.{f.name}"


@pytest.mark.parametrize("sections, message", [
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr = inf is not a finite number: it takes > 0; set --optimizer.lr"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr = nan is not a finite number: it takes > 0"),
    ({"optimizer": {"lr": 0.0}}, "optimizer.lr = 0.0 is out of range: it takes > 0"),
    ({"optimizer": {"eps": float("nan")}}, "optimizer.eps = nan is not a finite number: it takes > 0"),
    ({"optimizer": {"eps": 0.0}}, "optimizer.eps = 0.0 is out of range: it takes > 0"),
    ({"optimizer": {"beta1": 1.0}}, r"optimizer.beta1 = 1.0 is out of range: it takes \[0, 1\)"),
    ({"optimizer": {"beta2": -0.5}}, r"optimizer.beta2 = -0.5 is out of range: it takes \[0, 1\)"),
    ({"optimizer": {"weight_decay": float("inf")}}, "optimizer.weight_decay = inf is not a finite number"),
    ({"training": {"max_norm": float("nan")}}, "training.max_norm = nan is not a finite number: it takes >= 0"),
    ({"training": {"max_norm": float("-inf")}}, "training.max_norm = -inf is not a finite number"),
    ({"training": {"steps": -3}}, "training.steps = -3 is out of range: it takes >= 1"),
    ({"training": {"global_batch_size": -4}}, "training.global_batch_size = -4 is out of range: it takes >= 1 or -1"),
    ({"training": {"max_nonfinite_skips": 0}}, "training.max_nonfinite_skips = 0 is out of range: it takes >= 1"),
    ({"training": {"on_nonfinite": "ignore"}}, "training.on_nonfinite = 'ignore' is not one of stop, skip"),
    ({"lr_scheduler": {"warmup_steps": -1}}, "lr_scheduler.warmup_steps = -1 is out of range: it takes >= 0"),
    ({"lr_scheduler": {"decay_ratio": float("nan")}}, r"decay_ratio = nan is not a finite number: it takes \[0, 1\] \(or unset\)"),
    ({"lr_scheduler": {"min_lr_factor": 1.5}}, r"lr_scheduler.min_lr_factor = 1.5 is out of range: it takes \[0, 1\]"),
    ({"checkpoint": {"load_step": -2}}, "checkpoint.load_step = -2 is out of range: it takes >= 0 or -1"),
    ({"checkpoint": {"interval": 0}}, "checkpoint.interval = 0 is out of range: it takes >= 1"),
    ({"checkpoint": {"keep_latest_k": -1}}, "checkpoint.keep_latest_k = -1 is out of range"),
    ({"checkpoint": {"save_on_signal_timeout_s": float("inf")}}, "save_on_signal_timeout_s = inf is not a finite"),
    ({"metrics": {"peak_tflops": float("nan")}}, "metrics.peak_tflops = nan is not a finite number"),
    ({"validation": {"freq": 0}}, "validation.freq = 0 is out of range: it takes >= 1"),
    ({"parallelism": {"pipeline_parallel_first_stage_less_layers": -1}}, "first_stage_less_layers = -1 is out of range"),
    ({"ray": {"min_workers": 0}}, "ray.min_workers = 0 is out of range: it takes >= 1 or -1"),
    ({"ray": {"max_workers": -3}}, "ray.max_workers = -3 is out of range"),
    ({"ray": {"max_workers": 4}}, "ray.max_workers = 4 needs an elastic run"),
    ({"ray": {"max_failures": -1}}, "ray.max_failures = -1 is out of range: it takes >= 0"),
    ({"ray": {"resize_check_interval_s": float("nan")}}, "ray.resize_check_interval_s = nan is not a finite number"),
    ({"ray": {"resources_per_worker": {"CPU": float("nan")}}}, "ray.resources_per_worker: CPU = nan must be a finite"),
    ({"fault": {"kill_step": 0}}, "fault.kill_step = 0 is out of range: it takes >= 1 or -1"),
    ({"fault": {"kill_step": 6}}, "fault.kill_step = 6 is past training.steps = 5: the fault would never fire"),
    ({"fault": {"kill_rank": -1}}, "fault.kill_rank = -1 is out of range: it takes >= 0"),
    ({"fault": {"seed": -2}}, "fault.seed = -2 is out of range: it takes >= 0 or -1"),
])
def test_numbers_outside_their_range_are_config_errors(tmp_path, sections, message):
    from raytitan.config.plan import check_values

    with pytest.raises(ConfigError, match=message):
        check_values(tiny_config(str(tmp_path), str(tmp_path), **sections))


def test_nan_and_inf_from_the_command_line_and_toml_stop_before_launch(tmp_path, data_dir):
    """What used to pass the sign checks (NaN compares False) fails in plan_run, the driver's
    check (and each rank's under torchrun), before any worker starts."""
    base = ["--job.dump_folder", str(tmp_path), "--training.dataset", "files", "--training.dataset_path", data_dir]
    for argv, message in [(["--optimizer.lr", "inf"], "optimizer.lr = inf"),
                          (["--training.max_norm", "nan"], "training.max_norm = nan"),
                          (["--optimizer.eps=nan"], "optimizer.eps = nan")]:
        with pytest.raises(ConfigError, match=message):
            plan_run(parse_args(base + argv), 2)
    toml = write(tmp_path, "[optimizer]\nlr = nan\n")
    with pytest.raises(ConfigError, match="optimizer.lr = nan is not a finite number"):
        plan_run(parse_args(base + ["--job.config_file", toml]), 2)


@pytest.mark.parametrize("name", ["../../x", "..", ".", "/tmp/x", "a/b", "run name", "x\\y"])
def test_run_name_is_one_safe_folder_name(tmp_path, name):
    from raytitan.config.plan import check_values

    with pytest.raises(ConfigError, match="is not one folder name: it takes letters, digits"):
        check_values(tiny_config(str(tmp_path), str(tmp_path), ray={"name": name}))
    check_values(tiny_config(str(tmp_path), str(tmp_path), ray={"name": "llama3-8B_v2.1"}))


def test_storage_root_that_is_a_file_is_a_config_error(tmp_path):
    from raytitan.config.plan import check_run_folder

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"ray.storage_path = '.*afile': it is a file \(.*afile\), not a folder"):
        check_run_folder(tiny_config(str(tmp_path), "", ray={"storage_path": str(tmp_path / "afile")}))
    with pytest.raises(ConfigError, match="job.dump_folder = .* is not a folder this process can write to"):
        check_run_folder(tiny_config(str(tmp_path / "afile" / "below"), ""))
    (tmp_path / "run").write_text("x")  # the run folder itself (ray.name = "run") is a file
    with pytest.raises(ConfigError, match="the run folder 'run' in it is a file"):
        check_run_folder(tiny_config(str(tmp_path), ""))
    check_run_folder(tiny_config(str(tmp_path / "not" / "yet"), ""))  # created at launch
    check_run_folder(tiny_config(str(tmp_path), "", ray={"storage_path": "s3://bucket/prefix", "name": "r"}))


def test_seq_len_above_the_flavors_context_needs_the_explicit_key(tmp_path, monkeypatch):
    from raytitan.config.plan import check_values
    from raytitan.models.llama3 import args

    monkeypatch.setitem(args.FLAVORS, "short", args.ModelArgs(dim=64, n_layers=1, n_heads=4, max_seq_len=32))
    config = tiny_config(str(tmp_path), str(tmp_path), model={"flavor": "short"})  # seq_len 64
    with pytest.raises(ConfigError, match="training.seq_len = 64 is above the longest context of llama3 short "
                                          r"\(max_seq_len 32, .*allow_seq_len_above_model_max = true"):
        check_values(config)
    config.training.allow_seq_len_above_model_max = True
    check_values(config)
    with pytest.raises(ConfigError, match="training.seq_len = 200000 is above the longest context of llama3 8B"):
        check_values(tiny_config(str(tmp_path), str(tmp_path), model={"flavor": "8B"}, training={"seq_len": 200000}))


def test_kill_rank_must_exist_in_the_largest_world(tmp_path):
    from raytitan.config.plan import check_fault_rank

    with pytest.raises(ConfigError, match=r"fault.kill_rank = 2 cannot exist: the run has at most 2 ranks \(0 to 1\)"):
        check_fault_rank(tiny_config(str(tmp_path), "", fault={"kill_step": 3, "kill_rank": 2}), 2)
    check_fault_rank(tiny_config(str(tmp_path), "", fault={"kill_step": 3, "kill_rank": 1}), 2)
    check_fault_rank(tiny_config(str(tmp_path), "", fault={"kill_rank": 7}), 2)  # no kill_step: nothing to fire
    check_fault_rank(tiny_config(str(tmp_path), "", fault={"kill_step": 3, "kill_rank": 7, "seed": 1}), 2)  # seeded
    elastic = {"min_workers": 1, "max_workers": 4}
    check_fault_rank(tiny_config(str(tmp_path), "", ray=elastic, fault={"kill_step": 3, "kill_rank": 3}), 2)
    with pytest.raises(ConfigError, match="fault.kill_rank = 4 cannot exist: the run has at most 4 ranks"):
        check_fault_rank(tiny_config(str(tmp_path), "", ray=elastic, fault={"kill_step": 3, "kill_rank": 4}), 2)
