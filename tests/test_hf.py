"""Hugging Face interop and the offline checkpoint tools (convert / checkpoints CLIs)."""

import dataclasses
import json
import os

import pytest
import torch
import transformers  # test-only dependency (the dev extra): the reference Llama implementation

from raytitan import checkpoints as checkpoints_cli
from raytitan import convert as convert_cli
from raytitan.components.checkpoint.layout import CheckpointError, read_metadata
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.components.checkpoint.convert import export_hf, import_hf, import_torch, load_tensors, read_hf_weights
from raytitan.models.hf import HFFormatError, halves_to_pairs, pairs_to_halves
from raytitan.models.llama3.hf import LlamaHF
from raytitan.models.llama3.args import FLAVORS
from raytitan.models.llama3.model import Transformer

ARGS = FLAVORS["tiny"].with_vocab(259)


def random_model(args=ARGS, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1: make every weight distinct
            p.add_(0.01 * torch.randn_like(p))
    return model


def save_step(folder, model, step=1, args=ARGS) -> str:
    info = {"flavor": "tiny", "model_args": dataclasses.asdict(args), "bos_id": 256, "eos_id": 257}
    return CheckpointManager(str(folder), {"model": ModelState([model])}, 0, commit_info=info).save(step)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (4, 4)])
def test_rope_row_order_round_trips(n_heads, n_kv_heads):
    w = torch.randn(n_kv_heads * 16, 64)
    moved = pairs_to_halves(w, n_kv_heads)
    assert not torch.equal(moved, w)
    assert torch.equal(halves_to_pairs(moved, n_kv_heads), w)
    # Head 0's pair (0, 1) becomes rows (0, d/2): the first half holds the even features.
    assert torch.equal(moved[:8], w[0:16:2]) and torch.equal(moved[8:16], w[1:16:2])


def test_exported_folder_loads_in_transformers_with_the_same_logits(tmp_path):
    model = random_model().eval()
    out = export_hf(save_step(tmp_path / "ckpt", model), str(tmp_path / "hf"), dtype=torch.float32,
                    max_shard_bytes=200_000)  # several shards and an index
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (model(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert theirs.config.bos_token_id == 256 and theirs.config.rope_parameters["rope_type"] == "llama3"


def test_dcp_to_hf_to_dcp_is_identity(tmp_path):
    model = random_model()
    step = save_step(tmp_path / "ckpt", model)
    convert = [str(tmp_path / "hf"), str(tmp_path / "back")]
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), convert[0], "--dtype", "float32"]) == 0
    assert convert_cli.main(["from-hf", *convert]) == 0
    original, back = read_metadata(step), read_metadata(convert[1])
    keys = sorted(k for k in original.state_dict_metadata if k.startswith("model."))
    assert sorted(back.state_dict_metadata) == keys
    a, b = load_tensors(step, original, keys), load_tensors(convert[1], back, keys)
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def test_bfloat16_export_is_the_rounded_weights(tmp_path):
    model = random_model()
    out = export_hf(save_step(tmp_path / "ckpt", model), str(tmp_path / "hf"))  # bfloat16 by default
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    weights = read_hf_weights(out, dtype=torch.bfloat16)
    for name, p in model.state_dict().items():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], p.to(torch.bfloat16)), name


def test_tied_hf_checkpoint_gets_an_output_head(tmp_path):
    """Published Llama 3.2 1B/3B tie the output head to the embedding and store it once."""
    from safetensors.torch import save_file

    model = random_model()
    out = export_hf(save_step(tmp_path / "ckpt", model), str(tmp_path / "hf"), dtype=torch.float32)
    path = os.path.join(out, "model.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config, "tie_word_embeddings": True}, f)
    weights = read_hf_weights(out)
    assert torch.equal(weights["output.weight"], weights["tok_embeddings.weight"])


# Llama 3.2 1B's architecture at a tiny width: the head tied to the embedding, RoPE scaled by 32
# from 8,192 positions (theta 500,000), as in meta-llama/Llama-3.2-1B's config.json.
LLAMA32_TINY = dataclasses.replace(FLAVORS["1B"], dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259,
                                   multiple_of=32, max_seq_len=128)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_llama32_shaped_tied_model_matches_transformers_after_import_and_export(tmp_path):
    """A folder transformers' LlamaForCausalLM saved from a 1B-shaped tiny config imports into the
    tied flavor with its logits (fp32, relative 1e-5), and raytitan's export of those weights loads
    back in transformers with them: lm_head left out, tie_word_embeddings and the RoPE scaling set.
    An untied folder does not load into the tied flavor (a planning error)."""
    args, adapter = LLAMA32_TINY, LlamaHF()
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**adapter.hf_config(args, torch.float32))).eval()
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norm scales away from 1
    theirs.save_pretrained(tmp_path / "theirs")
    step = import_hf(str(tmp_path / "theirs"), str(tmp_path / "imported"))
    ours = Transformer(args)
    CheckpointManager(str(tmp_path), {"model": ModelState([ours])}, 0).load_path(step, model_only=True)
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, args.vocab_size, (2, 128))
    with torch.no_grad():
        reference = theirs(tokens).logits
        assert relative_difference(ours.eval()(tokens), reference) <= 1e-5
        # The tolerance sees the scaling: Llama 3.1's factor 8 in place of 32 is far outside it.
        other = Transformer(dataclasses.replace(args, rope_scaling_factor=8.0))
        other.load_state_dict(ours.state_dict())
        assert relative_difference(other.eval()(tokens), reference) > 1e-4

    out = export_hf(save_step(tmp_path / "ckpt", ours, args=args), str(tmp_path / "ours"), dtype=torch.float32)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is True and config["rope_scaling"]["factor"] == 32.0
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert back.config.rope_parameters["factor"] == 32.0
    with torch.no_grad():
        assert relative_difference(back(tokens).logits, reference) <= 1e-5
    untied = adapter.hf_config(dataclasses.replace(args, tie_embeddings=False), torch.float32)
    with pytest.raises(HFFormatError, match="tie_word_embeddings = false.*ties output.weight to tok_embeddings.weight"):
        adapter.check_matches(args, untied)


def test_a_run_from_hugging_face_weights_takes_their_vocabulary(tmp_path, data_dir):
    """The one exception to the vocabulary following the tokenizer: weights imported from a Hugging
    Face folder keep their rows (a published vocabulary padded past the tokenizer's), said once;
    fewer rows than the tokenizer has ids is an error before launch."""
    from raytitan.config.job import ConfigError
    from raytitan.config.plan import plan_run

    from tests.helpers import RaytitanLog, tiny_config

    def folder(vocab: int) -> str:
        args = dataclasses.replace(ARGS, vocab_size=vocab)
        return export_hf(save_step(tmp_path / f"ckpt{vocab}", random_model(args), args=args), str(tmp_path / f"hf{vocab}"),
                         dtype=torch.float32)

    def config(path: str):
        return tiny_config(str(tmp_path), data_dir, model={"flavor": "tiny"},
                           checkpoint={"initial_load_path": path, "initial_load_in_hf": True})

    padded = folder(300)
    with RaytitanLog() as log:
        assert plan_run(config(padded), 1).model_args.vocab_size == 300
    assert log.messages("WARNING") == [
        f"the Hugging Face model in checkpoint.initial_load_path {padded} has a vocabulary of 300; the tokenizer "
        "(bytes) has 259: training with the checkpoint's 300 (rows 259 and up are never input tokens)"]
    with pytest.raises(ConfigError, match=r"has a vocabulary of 200, smaller than the tokenizer's \(bytes: 259\)"):
        plan_run(config(folder(200)), 1)


def test_hf_folder_errors_name_the_problem(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(HFFormatError, match="has no config.json"):
        import_hf(str(tmp_path / "empty"), str(tmp_path / "out"))
    out = export_hf(save_step(tmp_path / "ckpt", random_model()), str(tmp_path / "hf"), dtype=torch.float32)
    bigger = dataclasses.replace(ARGS, n_layers=6)
    with open(os.path.join(out, "config.json")) as f:
        with pytest.raises(HFFormatError, match="num_hidden_layers = 4, but the model being trained has 6"):
            LlamaHF().check_matches(bigger, json.load(f))


def test_checkpoints_cli_lists_inspects_and_verifies(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    save_step(folder, random_model(), step=1)
    step2 = save_step(folder, random_model(seed=1), step=2)
    os.makedirs(folder / "step-3")  # an interrupted save
    assert checkpoints_cli.main(["list", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "committed" in out and "UNCOMMITTED" in out and "uncommitted steps [3]" in out

    assert checkpoints_cli.main(["inspect", str(folder)]) == 0  # the newest committed step
    out = capsys.readouterr().out
    assert "step 2" in out and "layers.3.feed_forward.w2.weight" in out and "[64, 192]" in out

    assert checkpoints_cli.main(["verify", str(folder)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2

    with open(os.path.join(step2, "__0_0.distcp"), "r+b") as f:
        f.truncate(1000)
    assert checkpoints_cli.main(["verify", step2]) == 1
    assert "__0_0.distcp is truncated" in capsys.readouterr().err


def test_verify_reports_non_finite_weights(tmp_path, capsys):
    model = random_model()
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
    step = save_step(tmp_path, model)
    assert checkpoints_cli.main(["verify", step]) == 1
    assert "model.norm.weight: 1 non-finite values" in capsys.readouterr().out


def test_to_torch_writes_the_weights_by_name(tmp_path):
    model = random_model()
    save_step(tmp_path / "ckpt", model)
    assert convert_cli.main(["to-torch", str(tmp_path / "ckpt"), str(tmp_path / "model.pt")]) == 0
    loaded = torch.load(tmp_path / "model.pt")
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert convert_cli.main(["to-torch", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 1


def test_folder_saved_by_transformers_imports_with_the_same_logits(tmp_path):
    """A Llama folder written by transformers itself (not by raytitan's exporter) imports, and
    raytitan's forward of the imported weights matches transformers' logits."""
    theirs_config = transformers.LlamaConfig(**LlamaHF().hf_config(ARGS, torch.float32))
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(theirs_config).eval()
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    step = import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    ours = Transformer(ARGS)
    CheckpointManager(str(tmp_path), {"model": ModelState([ours])}, 0).load_path(step, model_only=True)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (ours.eval()(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("all_states", [False, True])
def test_torch_file_imports_as_a_loadable_step(tmp_path, all_states):
    """to-torch, then back into a step folder that loads the identical weights (either file form)."""
    from torch.distributed.checkpoint.stateful import Stateful

    class Step(Stateful):  # a non-tensor state, as a run's train_state is
        def state_dict(self):
            return {"step": 7}

        def load_state_dict(self, state):
            pass

    model = random_model()
    CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([model]), "train_state": Step()}, 0).save(1)
    args = ["to-torch", str(tmp_path / "ckpt"), str(tmp_path / "model.pt")] + (["--all-states"] if all_states else [])
    assert convert_cli.main(args) == 0
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ("train_state" in saved) == all_states
    step = import_torch(str(tmp_path / "model.pt"), str(tmp_path / "imported"))
    loaded = random_model(seed=1)
    CheckpointManager(str(tmp_path), {"model": ModelState([loaded])}, 0).load_path(step, model_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    torch.save({"not": "weights"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not hold model weights by name"):
        import_torch(str(tmp_path / "bad.pt"), str(tmp_path / "bad"))


def test_verify_unpickles_every_entry_and_names_a_damaged_one(tmp_path, capsys):
    from torch.distributed.checkpoint.stateful import Stateful

    class Position(Stateful):
        def state_dict(self):
            return {"cursor": [3, 1, 4]}

        def load_state_dict(self, state):
            pass

    step = CheckpointManager(str(tmp_path), {"model": ModelState([random_model()]), "dataloader": Position()},
                             0).save(1)
    assert checkpoints_cli.main(["verify", step]) == 0
    assert "1 other entries read: ok" in capsys.readouterr().out
    entry = next((i, info) for i, info in read_metadata(step).storage_data.items() if i.fqn == "dataloader.cursor")[1]
    with open(os.path.join(step, entry.relative_path), "r+b") as f:  # same length, other bytes
        f.seek(entry.offset)
        f.write(b"\x00" * entry.length)
    assert checkpoints_cli.main(["verify", step]) == 1
    err = capsys.readouterr().err
    assert f"{entry.relative_path}: cannot read 'dataloader.cursor'" in err, err


def test_checkpoint_without_recorded_shape_needs_a_flavor(tmp_path, capsys):
    CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([random_model()])}, 0).save(1)
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 1
    assert "name its flavor" in capsys.readouterr().err
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--flavor", "tiny"]) == 0
    with pytest.raises(CheckpointError):
        export_hf(str(tmp_path / "nowhere"), str(tmp_path / "hf2"))


def test_exporting_an_hf_tokenizer_run_whose_tokenizer_is_gone_says_so(tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)
    info = {"flavor": "tiny", "model_args": dataclasses.asdict(ARGS), "bos_id": 256, "eos_id": 257,
            "tokenizer": "hf", "hf_assets_path": str(tmp_path / "moved")}
    step = CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([random_model()])}, 0,
                             commit_info=info).save(1)
    with caplog.at_level(logging.WARNING, logger="raytitan"):
        out = export_hf(step, str(tmp_path / "hf"), dtype=torch.float32)
    assert f"{out} is written without the run's tokenizer" in caplog.text
    assert str(tmp_path / "moved" / "tokenizer.json") in caplog.text and "--tokenizer" in caplog.text
    with pytest.raises(CheckpointError, match=f"no tokenizer.json in {tmp_path}"):
        export_hf(step, str(tmp_path / "hf2"), tokenizer_folder=str(tmp_path))  # asked for, and not there
