"""Data, tokenizer and config files that cannot make a run fail with an error naming them, never a hang.

Streams that used to loop forever run here in-process under a bounded number of shard reads
(``bounded_reads``), so a regression fails fast instead of hanging the suite."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytitan.components.data import stream
from raytitan.components.data.loader import LocalLoader
from raytitan.components.data.sources import DataSourceError, check_enough_data, resolve_shards
from raytitan.components.data.stream import Cursor, local_rows, read_texts, ShardStats
from raytitan.components.data.tokenizer import ByteTokenizer, TokenizerError, build_tokenizer
from raytitan.config.job import ConfigError, Model, load_toml, parse_args

from tests.helpers import RaytitanLog

TOK = ByteTokenizer()


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def record(text):
    return json.dumps({"text": text, "url": "u"})


@pytest.fixture
def bounded_reads(monkeypatch):
    """Fail the test once the stream has opened this many shards: the old stream read them forever."""
    calls = {"n": 0}
    real = stream.read_texts

    def counted(*args, **kwargs):
        calls["n"] += 1
        assert calls["n"] <= 40, "the stream kept reading shards without ever making a window (a hang)"
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "read_texts", counted)
    return calls


@pytest.mark.parametrize("case", ["all_records_bad", "shards_shorter_than_a_window"])
def test_an_epoch_without_a_window_is_an_error_naming_shards_records_and_seq_len(tmp_path, bounded_reads, case):
    if case == "all_records_bad":
        shards = [write_lines(tmp_path / f"s{i}.jsonl", ["not json", '{"url": "no text"}', '{"text": 7}'])
                  for i in range(2)]
        expected = "6 records, 6 skipped"
    else:  # good records, but each shard holds fewer than seq_len + 1 = 64 tokens
        shards = [write_lines(tmp_path / f"s{i}.jsonl", [record("short"), record("tiny")]) for i in range(2)]
        expected = "4 records, 0 skipped"
    loader = LocalLoader(shards, TOK, 63, 0, 4, 0, 1)
    with pytest.raises(DataSourceError) as error:
        loader.next_batch()
    message = str(error.value)
    assert "no window of seq_len + 1 = 64 tokens in a whole epoch" in message
    assert expected in message and all(s in message for s in shards)
    assert bounded_reads["n"] <= 2 + len(shards)  # the first shard, then one look at each: no second epoch


def test_a_resumed_stream_without_windows_fails_too(tmp_path, bounded_reads):
    shards = [write_lines(tmp_path / f"s{i}.jsonl", ["oops"] * 3) for i in range(3)]
    with pytest.raises(DataSourceError, match="no window"):
        next(local_rows(shards, TOK, 15, 0, Cursor(4, 2, 0)))


def test_short_shards_among_good_ones_are_no_error(tmp_path, bounded_reads):
    """One shard without a window is fine while another has them; the check then trusts the dataset."""
    short = write_lines(tmp_path / "a.jsonl", [record("hi")])
    good = write_lines(tmp_path / "b.jsonl", [record("y" * 200)] * 4)
    loader = LocalLoader([short, good], TOK, 63, 0, 4, 0, 1)
    for _ in range(5):  # several epochs (12 windows each)
        loader.next_batch()
    assert loader.cursor.epoch >= 1


def test_skipped_records_are_logged_once_per_shard_and_epoch(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [record("z" * 100)] * 6 + ["bad"] * 2)
    rows = lambda start, n: [b for _, b in zip(range(n), local_rows([path], TOK, 31, 0, start))]
    with RaytitanLog() as log:
        rows(Cursor(), 60)  # several epochs
        rows(Cursor(0, 0, 3), 2)  # epoch 0 again, resumed inside the shard: not said twice
        rows(Cursor(), 2)
    said = [m for m in log.messages("WARNING") if path in m]
    epochs = [int(m.split("(epoch ")[1].split(")")[0]) for m in said]
    assert len(epochs) >= 2 and epochs == sorted(set(epochs)), said
    assert "8 records, 2 skipped (2 malformed, 0 empty)" in said[0]


def test_preflight_refuses_a_dataset_smaller_than_one_global_batch(tmp_path):
    shards = [write_lines(tmp_path / f"s{i}.jsonl", [record("w" * 60)] * 3 + ["junk"]) for i in range(2)]
    # 3 documents of 62 tokens = 186 tokens = 2 windows of 64 per shard: 4 in all
    assert check_enough_data(shards, TOK, 63, 4) == 4
    with pytest.raises(DataSourceError) as error:
        check_enough_data(shards, TOK, 63, 8)
    message = str(error.value)
    assert message.startswith("training.dataset_path: the dataset holds 4 window(s) of seq_len + 1 = 64 tokens")
    assert "fewer than one global batch (8)" in message and "8 records, 2 skipped" in message
    assert shards[0] in message and shards[1] in message
    with RaytitanLog() as log:  # more shards than the check reads: a warning, the stream decides
        assert check_enough_data(shards, TOK, 63, 8, scan_shards=1) == 2
    assert "the first 1 of 2 shards hold 2 window(s)" in log.messages("WARNING")[0]


def test_the_driver_refuses_a_dataset_smaller_than_one_global_batch_before_launch(tmp_path):
    from raytitan.config.plan import plan_run

    for i in range(2):
        write_lines(tmp_path / f"s{i}.jsonl", [record("w" * 60)] * 3)
    config = parse_args(["--training.dataset", "files", "--training.dataset_path", str(tmp_path),
                         "--training.seq_len", "63", "--training.local_batch_size", "4",
                         "--training.global_batch_size", "8", "--model.tokenizer", "byte"])
    with pytest.raises(ConfigError, match=r"fewer than one global batch \(8\)"):
        plan_run(config, 1)
    config.training.global_batch_size = 4
    assert plan_run(config, 1).global_batch_size == 4


def parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("columns, message", [
    ({"content": ["a", "b"]}, r"no 'text' column \(columns: content\)"),
    ({"text": [1, 2]}, r"column 'text' is int64, not string"),
])
def test_a_parquet_shard_in_another_schema_names_file_and_column(tmp_path, columns, message):
    path = parquet(tmp_path / "a.parquet", **columns)
    with pytest.raises(DataSourceError, match=rf"^training.dataset_path: {path}: {message}"):
        resolve_shards("files", str(tmp_path), seed=0)  # before launch, on the first shard
    with pytest.raises(DataSourceError, match=rf"^{path}: {message}"):  # and in a worker, on any shard
        list(read_texts(path, ShardStats()))


def test_a_file_that_is_not_parquet_names_the_file(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1 but not really parquet")
    with pytest.raises(DataSourceError, match=rf"^training.dataset_path: {path}: cannot read it as parquet"):
        resolve_shards("files", str(tmp_path), seed=0)


@pytest.mark.parametrize("lines, message", [
    ([json.dumps({"content": "a", "url": "u"})] * 3, r"no 'text' field in the first 3 records \(fields: content, url\)"),
    ([json.dumps({"text": ["a", "b"]})] * 2 + ["oops"], r"field 'text' holds list, not a string"),
    (["a,b,c", "1,2,3"], r"holds no JSON object records"),
])
def test_a_json_shard_in_another_schema_names_file_and_field(tmp_path, lines, message):
    path = tmp_path / "a.json.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataSourceError, match=rf"^training.dataset_path: {path}:? .*{message}"):
        resolve_shards("files", str(tmp_path), seed=0)


def test_a_json_shard_with_some_bad_records_passes_the_schema_check(tmp_path):
    write_lines(tmp_path / "a.jsonl", ['{"url": "no text"}', "junk", record("fine")])
    assert len(resolve_shards("files", str(tmp_path), seed=0)) == 1


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"\x00\x01garbage\xff", r"cannot read .*tokenizer.json as a Hugging Face tokenizer"),
    ("tokenizer.json", b'{"version": "1.0"}', r"cannot read .*tokenizer.json as a Hugging Face tokenizer"),
    ("tokenizer_config.json", b"\xff\xfe not json", r"tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b"[1, 2]", r"tokenizer_config.json holds a JSON list, not an object"),
])
def test_unreadable_tokenizer_files_are_config_errors(tmp_path, name, content, message):
    from raytitan.config.plan import plan_run

    from tests.data.test_sources import make_hf_tokenizer
    from tests.helpers import tiny_config

    folder = str(tmp_path / "tok")
    if name == "tokenizer_config.json":
        make_hf_tokenizer(folder)
    else:
        os.makedirs(folder)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(content)
    with pytest.raises(TokenizerError, match=f"^model.hf_assets_path: .*{message}"):
        build_tokenizer(Model(tokenizer="hf", hf_assets_path=folder))
    with pytest.raises(ConfigError, match=message):  # what the driver reports before anything starts
        plan_run(tiny_config(str(tmp_path), str(tmp_path), model={"hf_assets_path": folder}), 1)


@pytest.mark.parametrize("content, message", [
    (gzip.compress(b"[training]\nsteps = 3\n"), r"is not a TOML file: byte 1 is not UTF-8 text"),
    ("[training]\nname = 'caf\xe9'\n".encode("latin-1"), r"is not a TOML file: byte 22 is not UTF-8 text"),
    (b"\x00\x00\x00", r"is not valid TOML"),
    (b"steps = = 3\n", r"is not valid TOML"),
])
def test_a_config_file_that_is_not_toml_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^job.config_file: '{path}' {message}"):
        load_toml(str(path))
    with pytest.raises(ConfigError, match=message):
        parse_args(["--job.config_file", str(path)])
    with pytest.raises(ConfigError, match="cannot read|no such file"):
        load_toml(str(tmp_path))  # a folder
