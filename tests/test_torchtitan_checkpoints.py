"""Checkpoints from and to torchtitan: its DCP step folders (weights at the top level under its
0.2.x or 0.3.x names, optimizer and other states beside them, no commit marker) load in place
with the same logits, raytitan steps export to that layout and come back unchanged, and folders
that are neither are refused with errors that say what they are. One process, DCP without a
process group; a run started from a torchtitan folder on 2 ranks is in test_distributed.py.

Folders here are built the way torchtitan's CheckpointManager saves them (its flattened model
state dict plus its Stateful entries). The same checks were also run by hand against torchtitan
0.2.2's and 0.3.0's own CheckpointManager (see docs/checkpoints.md)."""

import dataclasses
import os
import re
import shlex
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from raytitan import convert as convert_cli
from raytitan.components.checkpoint.convert import load_tensors, model_of
from raytitan.components.checkpoint.layout import COMMIT_MARKER, CheckpointError, read_commit_at, read_metadata
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.components.checkpoint.torchtitan import (
    check_family, export_torchtitan, import_torchtitan, step_kind, to_torchtitan,
)
from raytitan.config.job import ConfigError
from raytitan.config.plan import plan_run
from raytitan.models import get_spec
from raytitan.models.llama3.args import FLAVORS
from raytitan.models.llama3.model import Transformer
from tests.helpers import tiny_config

ARGS = dataclasses.replace(FLAVORS["tiny"].with_vocab(259), max_seq_len=64)  # a short RoPE table: quick to build
TOKENS = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def random_model(args=ARGS, seed=0) -> Transformer:
    """Every weight distinct (norms near 1, the rest small)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def fuse_qkv(wq, wk, wv, n_heads, n_kv_heads):
    """torchtitan main's fused rows (2026-04..06): per key/value group its query heads, key, value."""
    head_dim = wk.shape[0] // n_kv_heads
    q = wq.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, -1)
    return torch.cat([q, wk.reshape(n_kv_heads, 1, head_dim, -1), wv.reshape(n_kv_heads, 1, head_dim, -1)],
                     dim=1).reshape(-1, wq.shape[1])


def torchtitan_step(path, model, names="0.2", full=True, fused=False) -> str:
    """A step folder as torchtitan's CheckpointManager writes it: the model's weights flattened to
    the top level, and for a full save its optimizer (AdamW after one step, flattened by parameter
    name), lr_scheduler, dataloader and train_state entries."""
    others = {}
    if full:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # moves the weights: they are saved as they are after it
        model.zero_grad(set_to_none=True)
        others = {"optimizer": get_optimizer_state_dict(model, optimizer,
                                                        options=StateDictOptions(flatten_optimizer_state_dict=True)),
                  "lr_scheduler": {"last_epoch": 1, "_step_count": 2, "base_lrs": [1e-3]},
                  "dataloader": {"dp_rank_0": b"\x80\x04}\x94."},
                  "train_state": {"step": 1, "ntokens_seen": 48}}
    state = {to_torchtitan(k, names): v.detach().clone() for k, v in model.state_dict().items()}
    if fused:
        for layer in range(model.args.n_layers):
            prefix = f"layers.{layer}.attention.qkv_linear."
            parts = [state.pop(f"{prefix}{w}.weight") for w in ("wq", "wk", "wv")]
            state[f"{prefix}wqkv.weight"] = fuse_qkv(*parts, model.args.n_heads, model.args.kv_heads)
    state.update(others)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return str(path)


def load_into_new_model(path, tmp_path, args=ARGS) -> Transformer:
    """What a run does with checkpoint.initial_load_path: the manager's load, weights only."""
    model = random_model(args, seed=7)
    manager = CheckpointManager(str(tmp_path / "run-ckpt"), {"model": ModelState([model])}, 0,
                                model_keys=set(model.state_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.load_path(str(path), model_only=True)
    return model


def save_step(folder, model, step=1, flavor="tiny") -> str:
    info = {"model": "llama3", "flavor": flavor, "model_args": dataclasses.asdict(model.args)}
    return CheckpointManager(str(folder), {"model": ModelState([model])}, 0, commit_info=info).save(step)


@pytest.mark.parametrize("names", ["0.2", "0.3"])
@pytest.mark.parametrize("full", [True, False], ids=["full", "model-only"])
def test_a_torchtitan_step_loads_in_place_with_the_same_logits(tmp_path, names, full):
    model = random_model()
    path = torchtitan_step(tmp_path / "step-10", model, names, full)
    assert step_kind(path) == "torchtitan" and not os.path.exists(os.path.join(path, COMMIT_MARKER))
    loaded = load_into_new_model(path, tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_raytitan_to_torchtitan_and_back_keeps_every_weight(tmp_path):
    """to-torchtitan writes flat keys under either version's names; the folder loads in place and
    converts back (from-torchtitan) to a committed step with the same logits."""
    model = random_model()
    step = save_step(tmp_path / "ckpt", model)
    for names, head, wq in (("0.2", "output.weight", "layers.0.attention.wq.weight"),
                            ("0.3", "lm_head.weight", "layers.0.attention.qkv_linear.wq.weight")):
        out, back = str(tmp_path / f"tt-{names}"), str(tmp_path / f"back-{names}")
        assert convert_cli.main(["to-torchtitan", str(tmp_path / "ckpt"), out, "--names", names]) == 0
        keys = set(read_metadata(out).state_dict_metadata)
        assert head in keys and wq in keys and "tok_embeddings.weight" in keys
        assert not any(k.startswith("model.") for k in keys) and not os.path.exists(os.path.join(out, COMMIT_MARKER))
        assert torch.equal(logits(load_into_new_model(out, tmp_path)), logits(model))
        assert convert_cli.main(["from-torchtitan", out, back, "--flavor", "tiny"]) == 0
        recorded = model_of(back)[1]  # for to-hf
        assert read_commit_at(back)["model_only"] and recorded == FLAVORS["tiny"].with_vocab(259)
        original, again = read_metadata(step), read_metadata(back)
        keys = sorted(k for k in original.state_dict_metadata if k.startswith("model."))
        assert sorted(again.state_dict_metadata) == keys
        a, b = load_tensors(step, original, keys), load_tensors(back, again, keys)
        assert all(torch.equal(a[k], b[k]) for k in keys)
        assert torch.equal(logits(load_into_new_model(back, tmp_path)), logits(model))
    with pytest.raises(CheckpointError, match="'tok_embeddings.weight' has shape .259, 64., --flavor debugmodel has"):
        import_torchtitan(out, str(tmp_path / "wrong"), flavor="debugmodel")


def test_to_torchtitan_in_bfloat16_stores_the_rounded_weights(tmp_path):
    model = random_model()
    save_step(tmp_path / "ckpt", model)
    out = export_torchtitan(str(tmp_path / "ckpt" / "step-1"), str(tmp_path / "tt"), dtype=torch.bfloat16)
    metadata = read_metadata(out)
    stored = load_tensors(out, metadata, ["norm.weight"])["norm.weight"]
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, model.norm.weight.detach().to(torch.bfloat16))


def test_fused_qkv_is_split_offline_and_refused_in_place(tmp_path, data_dir):
    """torchtitan's main branch saved its fused projection unsplit for two months: from-torchtitan
    splits it (given the flavor); a run would need more than a renaming and says so."""
    model = random_model()
    path = torchtitan_step(tmp_path / "step-5", model, "0.3", full=False, fused=True)
    assert "layers.0.attention.qkv_linear.wqkv.weight" in read_metadata(path).state_dict_metadata
    with pytest.raises(CheckpointError, match="fused.*from-torchtitan"):
        load_into_new_model(path, tmp_path)
    config = tiny_config(str(tmp_path), data_dir, checkpoint={"initial_load_path": path})
    with pytest.raises(ConfigError, match="checkpoint.initial_load_path: .*wqkv.*fused"):
        plan_run(config, 2)
    with pytest.raises(CheckpointError, match="name the model's --flavor"):
        import_torchtitan(path, str(tmp_path / "split"))
    assert convert_cli.main(["from-torchtitan", str(tmp_path), str(tmp_path / "split"), "--flavor", "tiny"]) == 0
    assert torch.equal(logits(load_into_new_model(tmp_path / "split", tmp_path)), logits(model))


def test_planning_accepts_torchtitan_steps_for_weights_only(tmp_path, data_dir):
    path = torchtitan_step(tmp_path / "step-3", random_model(), "0.3")
    plan_run(tiny_config(str(tmp_path), data_dir, checkpoint={"initial_load_path": path}), 2)
    full = tiny_config(str(tmp_path), data_dir, checkpoint={"initial_load_path": path,
                                                            "initial_load_model_only": False})
    with pytest.raises(ConfigError, match="torchtitan step; raytitan reads its model weights only"):
        plan_run(full, 2)
    with pytest.raises(CheckpointError, match="weights only"):
        manager = CheckpointManager(str(tmp_path / "c"), {"model": ModelState([random_model()])}, 0)
        manager.load_path(path, model_only=False)


def test_folders_that_are_neither_are_refused_with_what_they_are(tmp_path, data_dir):
    model = random_model()
    run_step = save_step(tmp_path / "ckpt", model, step=4)
    uncommitted = str(tmp_path / "half")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=uncommitted, no_dist=True)
        dcp.save({"optimizer": {"lr": torch.ones(1)}}, checkpoint_id=str(tmp_path / "noweights"), no_dist=True)
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "hf")
    open(tmp_path / "hf" / "config.json", "w").close()
    cases = {
        str(tmp_path / "nowhere"): "not a committed checkpoint step folder nor a torchtitan step folder .no such folder",
        str(tmp_path / "empty"): "no such folder",  # empty and absent read the same on object stores
        str(tmp_path / "ckpt"): f"it holds step folders: name one, e.g. {run_step}",
        str(tmp_path / "hf"): "looks like a Hugging Face folder: set checkpoint.initial_load_in_hf",
        uncommitted: "raytitan step without its COMMITTED file",
        str(tmp_path / "noweights"): "without model weights",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            step_kind(path)
        config = tiny_config(str(tmp_path / "run"), data_dir, checkpoint={"initial_load_path": path})
        with pytest.raises(ConfigError, match="checkpoint.initial_load_path: .*" + message.split(":")[0]):
            plan_run(config, 2)
    assert step_kind(run_step) == "raytitan"


def test_a_torchtitan_step_of_another_shape_is_an_error_naming_the_key(tmp_path):
    path = torchtitan_step(tmp_path / "step-1", random_model(), "0.3", full=False)
    with pytest.raises(CheckpointError, match="'tok_embeddings.weight' has shape .259, 64. but this model's"):
        load_into_new_model(path, tmp_path, dataclasses.replace(ARGS, vocab_size=300))
    with pytest.raises(CheckpointError, match="has no 'layers.4.attention_norm.weight': it was saved from a "
                                              "different model"):
        load_into_new_model(path, tmp_path, dataclasses.replace(ARGS, n_layers=5))
    with pytest.raises(CheckpointError, match="has 9 weights this model lacks .first: 'layers.3"):
        load_into_new_model(path, tmp_path, dataclasses.replace(ARGS, n_layers=3))


def test_conversions_never_replace_a_runs_checkpoint_or_their_source(tmp_path, capsys):
    model = random_model()
    step = save_step(tmp_path / "ckpt", model)
    tt = torchtitan_step(tmp_path / "tt", random_model(seed=1))  # a full torchtitan step: its optimizer state too
    for args, message in (
        (["to-torchtitan", step, step], "would replace the source"),
        (["to-torchtitan", step, str(tmp_path / "ckpt")], "would replace the source"),
        (["to-torchtitan", step, os.path.join(step, "tt")], "is inside the source"),
        (["to-torchtitan", step, tt], "is a torchtitan training step"),
        (["from-torchtitan", tt, step], "holds a run's checkpoint"),
        (["from-torchtitan", tt, tt], "would replace the source"),
    ):
        assert convert_cli.main(args) == 1, args
        assert message in capsys.readouterr().err, args
    assert read_commit_at(step)["step"] == 1 and step_kind(tt) == "torchtitan"
    assert torch.equal(logits(load_into_new_model(step, tmp_path)), logits(model))
    out = str(tmp_path / "export")
    assert convert_cli.main(["to-torchtitan", step, out]) == 0
    assert convert_cli.main(["to-torchtitan", step, out, "--names", "0.3"]) == 0  # an earlier export is replaced
    assert "lm_head.weight" in read_metadata(out).state_dict_metadata


def test_only_families_with_torchtitans_names_convert(tmp_path):
    check_family(get_spec("llama3"))
    other = dataclasses.replace(get_spec("llama3"), name="other", torchtitan_names=False)
    with pytest.raises(CheckpointError, match="'other' does not share torchtitan's weight names"):
        check_family(other)


def test_the_documented_commands_run_as_written(tmp_path, monkeypatch):
    """docs/checkpoints.md's torchtitan commands, word for word, from a folder holding a raytitan
    run's checkpoints and torchtitan's default output folder."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "checkpoints.md")) as f:
        section = f.read().split("## From and to torchtitan", 1)[1]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
                for line in block.splitlines() if line.startswith("python -m raytitan.convert ")]
    assert [c.split()[3] for c in commands] == ["to-torchtitan", "from-torchtitan"]
    monkeypatch.chdir(tmp_path)
    model = random_model(dataclasses.replace(FLAVORS["debugmodel"].with_vocab(259), max_seq_len=64))
    save_step("outputs/llama3-debugmodel/checkpoint", model, step=2, flavor="debugmodel")
    torchtitan_step("outputs/checkpoint/step-10", model, "0.2", full=False)
    for command in commands:
        assert convert_cli.main(shlex.split(command)[3:]) == 0, command
    weights = model.state_dict()
    for out, name in (("outputs/torchtitan-step", lambda k: to_torchtitan(k, "0.3")),
                      ("outputs/from-torchtitan", lambda k: f"model.{k}")):
        metadata = read_metadata(out)
        assert sorted(metadata.state_dict_metadata) == sorted(map(name, weights)), out
        stored = load_tensors(out, metadata, list(metadata.state_dict_metadata))
        assert all(torch.equal(stored[name(k)], v) for k, v in weights.items()), out
