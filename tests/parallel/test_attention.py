"""Document masking (model.attn_mask_type = block_causal): a packed row scores like its documents
run one by one; the config key is accepted where it works and refused, naming the key, where not."""

import dataclasses
import json
import logging

import pytest
import torch

from raytitan.components.data.stream import pack_shard
from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.components.loss import cross_entropy_sum
from raytitan.config.job import ConfigError, parse_args
from raytitan.config.plan import plan_run
from raytitan.distributed.attention import block_causal_mask, document_ids, document_positions
from raytitan.models import get_spec
from raytitan.trainer.runner import ModelRunner

SEQ = 64


@pytest.fixture(scope="module")
def packed_row(tmp_path_factory):
    """One window of the real packer over short documents: it starts inside a document and holds
    several whole ones, each BOS text EOS."""
    path = tmp_path_factory.mktemp("docs") / "shard.jsonl"
    texts = ["a cat sat on the warm mat today, and then it slept", "hi", "the end of a longer story here",
             "tail words go on", "and on and on and on and on", "x", "one more short document to fill a window"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rows = next(pack_shard(str(path), ByteTokenizer(), SEQ))
    return torch.as_tensor(rows[1], dtype=torch.long)  # the second window: starts mid-document


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def model(request):
    """Each built-in family that supports document masking, tiny."""
    spec = get_spec(request.param)
    assert spec.supports_block_causal
    torch.manual_seed(0)
    m = spec.build(dataclasses.replace(spec.flavors["tiny"], vocab_size=ByteTokenizer.vocab_size, max_seq_len=SEQ))
    m.init_weights()
    return m.eval()


def test_document_ids_and_positions_restart_at_each_bos():
    bos = ByteTokenizer.bos_id
    tokens = torch.tensor([[5, 257, bos, 7, 8, 257, bos, 9], [bos, 1, 2, 3, 257, bos, 4, 257]])
    ids = document_ids(tokens, bos)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 2, 2, 2]]
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]
    mask = block_causal_mask(ids)
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False, False, False]
    # One document is plain causal attention.
    assert torch.equal(block_causal_mask(torch.zeros(1, 8, dtype=torch.int32))[0, 0], torch.ones(8, 8).tril().bool())


@torch.no_grad()
def test_a_packed_row_gives_the_logits_of_its_documents_run_one_by_one(packed_row, model):
    inputs = packed_row[None, :-1]
    ids = document_ids(inputs, ByteTokenizer.bos_id)
    assert ids[0, 0] == 0 and int(ids.max()) >= 2, "the row should start mid-document and hold more"
    packed = model(inputs, document_ids=ids)
    start = 0
    for doc in range(int(ids.max()) + 1):
        n = int((ids == doc).sum())
        alone = model(inputs[:, start:start + n])  # plain causal attention, positions from 0
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n
    assert start == SEQ
    # Causal attention over the whole row sees across the boundaries: different logits after the first.
    causal = model(inputs)
    first = int((ids == 0).sum())
    torch.testing.assert_close(causal[:, :first], packed[:, :first], rtol=1e-5, atol=1e-5)
    assert (causal[:, first:] - packed[:, first:]).abs().max() > 1e-3


@torch.no_grad()
def test_the_runner_hands_every_part_the_rows_documents(packed_row, model):
    inputs, labels = packed_row[None, :-1], packed_row[None, 1:]
    expected = cross_entropy_sum(model(inputs, document_ids=document_ids(inputs, ByteTokenizer.bos_id)), labels)
    block = ModelRunner([model], document_start=ByteTokenizer.bos_id).loss_sum(inputs, labels)
    causal = ModelRunner([model]).loss_sum(inputs, labels)
    torch.testing.assert_close(block, expected)
    assert abs(float(block) - float(causal)) > 1e-3


def _argv(tmp_path, *extra):
    return ["--model.flavor", "tiny", "--model.attn_mask_type", "block_causal", "--job.dump_folder", str(tmp_path),
            "--training.seq_len", "64", *extra]


def test_the_command_line_takes_block_causal_with_fsdp_tensor_and_pipeline_parallel(tmp_path):
    config = parse_args(_argv(tmp_path, "--parallelism.tensor_parallel_degree", "2",
                              "--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "2",
                              "--parallelism.pipeline_parallel_microbatch_size", "1"))
    assert config.model.attn_mask_type == "block_causal"
    plan = plan_run(config, 8, resolve_data=False)
    assert (plan.dims.dp, plan.dims.tp, plan.dims.pp) == (2, 2, 2)


def test_block_causal_is_refused_before_launch_where_it_cannot_run(tmp_path, capsys, monkeypatch):
    from raytitan.train import main

    log = logging.getLogger("raytitan")  # the launcher sets up logging: give later tests theirs back
    for name in ("propagate", "level", "handlers"):
        monkeypatch.setattr(log, name, getattr(log, name) if name != "handlers" else list(log.handlers))
    # Context parallel's ring attention is causal over whole rows: the launcher refuses before Ray starts.
    assert main(_argv(tmp_path, "--parallelism.context_parallel_degree", "2", "--ray.num_workers", "2")) == 2
    err = capsys.readouterr().err
    assert "model.attn_mask_type = 'block_causal'" in err and "context_parallel_degree = 1" in err
    with pytest.raises(ConfigError, match="model.attn_mask_type = 'blockcausal' is not one of causal, block_causal"):
        plan_run(parse_args(["--model.attn_mask_type", "blockcausal"]), 1, resolve_data=False)


# A family whose model takes no document ids (found by model.name = module:attribute).
UNMASKED = dataclasses.replace(__import__("raytitan.models.llama3", fromlist=["spec"]).spec, name="unmasked",
                               supports_block_causal=False)


def test_a_family_without_document_masking_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not support block-causal attention.*model.attn_mask_type = 'causal'"):
        plan_run(parse_args(_argv(tmp_path, "--model.name", f"{__name__}:UNMASKED")), 1, resolve_data=False)
