"""Shard sources and formats, tokenizers, and records that are not what they should be."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytitan.config.job import Model
from raytitan.components.data import stream
from raytitan.components.data.loader import LocalLoader
from raytitan.components.data.sources import DataSourceError, resolve_shards
from raytitan.components.data.stream import ShardStats, pack_shard, read_texts
from raytitan.components.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

TOK = ByteTokenizer()
DOCS = [f"document number {i} says hello" for i in range(40)]


def write_jsonl(path, docs, gz=False):
    data = "".join(json.dumps({"text": d, "url": f"u{i}", "timestamp": "t"}) + "\n" for i, d in enumerate(docs)).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def texts(path):
    return [t for chunk in read_texts(str(path), ShardStats()) for t in chunk]


def test_json_gz_jsonl_and_parquet_read_the_same(tmp_path):
    write_jsonl(tmp_path / "a.json.gz", DOCS, gz=True)
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    pq.write_table(pa.table({"text": DOCS, "url": [str(i) for i in range(40)]}), tmp_path / "a.parquet", row_group_size=7)
    assert texts(tmp_path / "a.json.gz") == texts(tmp_path / "a.jsonl") == texts(tmp_path / "a.parquet") == DOCS
    shards = resolve_shards("files", str(tmp_path), seed=0)
    assert [os.path.basename(p) for p in shards] == ["a.json.gz", "a.jsonl", "a.parquet"]


def test_c4_hub_layout_from_a_local_mirror(tmp_path):
    """The same code reads the hub (hf://datasets/allenai/c4) and a mirror of its layout."""
    en = tmp_path / "c4" / "en"
    en.mkdir(parents=True)
    for i in range(3):
        write_jsonl(en / f"c4-train.{i:05d}-of-01024.json.gz", DOCS, gz=True)
    write_jsonl(en / "c4-validation.00000-of-00008.json.gz", DOCS[:5], gz=True)
    train = resolve_shards("c4", str(tmp_path / "c4"), seed=0)
    assert [os.path.basename(p) for p in train] == [f"c4-train.{i:05d}-of-01024.json.gz" for i in range(3)]
    assert len(resolve_shards("c4_validation", str(tmp_path / "c4"), seed=0)) == 1
    # A URL goes through pyarrow's filesystems (file:// here; s3:// and gs:// alike).
    url = resolve_shards("c4", f"file://{tmp_path}/c4", seed=0)
    assert url[0].startswith("file://") and texts(url[0]) == DOCS
    # The mirror's en/ folder (as the cluster setups name it) and any folder of the split's shards work too.
    assert resolve_shards("c4", str(en), seed=0) == train
    assert resolve_shards("c4", f"file://{en}", seed=0) == url
    part = tmp_path / "part"
    part.mkdir()
    os.link(en / "c4-train.00002-of-01024.json.gz", part / "c4-train.00002-of-01024.json.gz")
    assert resolve_shards("c4", str(part), seed=0) == [str(part / "c4-train.00002-of-01024.json.gz")]
    with pytest.raises(DataSourceError, match=r"no shards .* at '.*/part/en/c4-validation.\*' or '.*/part/c4-valid"):
        resolve_shards("c4_validation", str(part), seed=0)


@pytest.mark.parametrize("dataset, path, message", [
    ("files", None, "needs training.dataset_path"),
    ("files", "/nonexistent/folder", "no shards"),
    ("c4", "/nonexistent", "point training.dataset_path at its root .the folder holding en/., at en/ itself"),
    ("wiki", None, "unknown dataset"),
])
def test_missing_sources_are_clear_errors(dataset, path, message):
    with pytest.raises(DataSourceError, match=message):
        resolve_shards(dataset, path, seed=0)


def test_empty_and_unreadable_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataSourceError, match="empty shard"):
        resolve_shards("files", str(tmp_path), seed=0)
    os.remove(tmp_path / "empty.jsonl")
    (tmp_path / "bad.json.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataSourceError, match="cannot read .*bad.json.gz"):
        resolve_shards("files", str(tmp_path), seed=0)


def test_bad_records_are_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "MAX_DOCUMENT_CHARS", 50)
    lines = [
        b'{"text": "good one"}',
        b"not json at all",
        b'{"url": "no text field"}',
        b'{"text": ""}',
        b'{"text": "   "}',
        b'{"text": "bad utf8 \xff\xfe"}',
        b"[1, 2, 3]",
        b'{"text": 42}',
        json.dumps({"text": "x" * 500}).encode(),  # giant: truncated to 50
        b'{"text": "good two"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = ShardStats()
    got = [t for chunk in read_texts(str(path), stats) for t in chunk]
    assert got == ["good one", "x" * 50, "good two"]
    assert (stats.malformed, stats.empty, stats.truncated, stats.corrupt) == (5, 2, 1, 0)


def test_corrupt_gzip_member_keeps_what_came_before(tmp_path):
    good = gzip.compress(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in DOCS[:10]))
    bad = gzip.compress(b'{"text": "lost"}\n')
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    path.write_bytes(good + bad[:20] + b"garbage" * 10)  # second member broken mid-way
    stats = ShardStats()
    got = [t for chunk in read_texts(str(path), stats) for t in chunk]
    assert got == DOCS[:10] and stats.corrupt == 1


def test_bad_record_counts_reach_the_loader(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join([json.dumps({"text": "y" * 300})] * 20 + ["oops"] * 3) + "\n")
    loader = LocalLoader([str(path)], TOK, 63, 0, 4, 0, 1)
    while loader.cursor.epoch == 0:
        loader.next_batch()
    assert loader.bad_records >= 3  # one epoch over the shard met the 3 bad lines


def make_hf_tokenizer(folder):
    """A real BPE tokenizer.json trained here, with Llama-3-style special tokens in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 5, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}}, f)
    return folder


def test_hf_tokenizer_json_with_special_tokens(tmp_path):
    folder = make_hf_tokenizer(str(tmp_path / "tok"))
    tok = build_tokenizer(Model(tokenizer="hf", hf_assets_path=folder))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 400
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    ids = tok.encode_batch(["document number 7 says hello"])[0]
    assert tok.decode(ids) == "document number 7 says hello" and len(ids) < 20  # merges learned
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    windows = np.concatenate(list(pack_shard(str(tmp_path / "a.jsonl"), tok, seq_len=15)))
    assert windows.reshape(-1)[0] == tok.bos_id and (windows == tok.eos_id).any()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer(str(tmp_path))


def test_model_vocab_follows_the_hf_tokenizer(tmp_path, data_dir):
    from raytitan.config.plan import plan_run

    from tests.helpers import tiny_config

    folder = make_hf_tokenizer(str(tmp_path / "tok"))
    plan = plan_run(tiny_config(str(tmp_path), data_dir, model={"tokenizer": "hf", "hf_assets_path": folder}), 1)
    assert plan.model_args.vocab_size == build_tokenizer(Model(tokenizer="hf", hf_assets_path=folder)).vocab_size


def test_auto_tokenizer_is_the_one_in_hf_assets_path_and_the_vocab_follows_it(tmp_path, data_dir):
    """model.tokenizer = 'auto' (the default) trains with the tokenizer.json in model.hf_assets_path
    (bytes without one); the model's vocabulary is the tokenizer's, whatever the flavor publishes
    (said once, plainly); the checkpoint marker records the tokenizer used, where sampling and
    exports find it. An explicit 'byte' is honoured, and an unused tokenizer folder named."""
    from raytitan.config.job import ConfigError
    from raytitan.config.plan import plan_run
    from raytitan.tools.sampling import checkpoint_tokenizer
    from raytitan.trainer.build import model_facts

    from tests.helpers import RaytitanLog, tiny_config

    folder = make_hf_tokenizer(str(tmp_path / "tok"))
    n = HFTokenizer(folder).vocab_size
    config = tiny_config(str(tmp_path), data_dir, model={"flavor": "8B", "hf_assets_path": folder})
    assert config.model.tokenizer == "auto"
    with RaytitanLog() as log:
        plan = plan_run(config, 1)
    assert plan.model_args.vocab_size == n and plan.model_args.dim == 4096
    assert f"tokenizer: the Hugging Face tokenizer in model.hf_assets_path {folder} ({n} tokens; model.tokenizer = " \
           "'auto')" in log.messages("INFO")
    assert log.messages("WARNING") == [f"llama3 8B publishes a vocabulary of 128256; the tokenizer ({folder}/"
                                       f"tokenizer.json) has {n}: training with {n} (the model's vocabulary follows "
                                       "the tokenizer)"]
    marker = model_facts(config, plan, build_tokenizer(config.model))
    assert (marker["tokenizer"], marker["hf_assets_path"], marker["model_args"]["vocab_size"]) == ("hf", folder, n)
    assert isinstance(checkpoint_tokenizer("step-1", marker), HFTokenizer)

    byte = tiny_config(str(tmp_path), data_dir, model={"flavor": "8B", "hf_assets_path": folder, "tokenizer": "byte"})
    with RaytitanLog() as log:
        plan = plan_run(byte, 1)
    assert plan.model_args.vocab_size == 259
    assert log.messages("WARNING") == [
        f"model.tokenizer = 'byte': the tokenizer.json in model.hf_assets_path {folder} is not used "
        "(model.tokenizer = 'auto' or 'hf' trains with it)",
        "llama3 8B publishes a vocabulary of 128256; the tokenizer (bytes) has 259: training with 259 (the model's "
        "vocabulary follows the tokenizer)"]
    marker = model_facts(byte, plan, build_tokenizer(byte.model))
    assert (marker["tokenizer"], marker["hf_assets_path"]) == ("byte", None)  # exports copy no unused tokenizer
    assert isinstance(checkpoint_tokenizer("step-1", marker), ByteTokenizer)

    with RaytitanLog() as log:  # no folder: bytes, and the debug model sized to them without a word
        assert plan_run(tiny_config(str(tmp_path), data_dir), 1).model_args.vocab_size == 259
    assert log.messages("WARNING") == [] and not any("tokenizer" in m for m in log.messages("INFO"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="'.*empty' has no tokenizer.json.*or set model.tokenizer = 'byte'"):
        plan_run(tiny_config(str(tmp_path), data_dir, model={"flavor": "8B", "hf_assets_path": str(tmp_path / "empty")}), 1)
