import gzip
import itertools
import json

import numpy as np
import pytest

from raytitan.components.data.loader import LocalLoader
from raytitan.components.data.stream import Cursor, epoch_order, global_batches, local_rows, pack_shard, shard_rows
from raytitan.components.data.synthetic import ensure_synthetic_shards
from raytitan.components.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def shards(data_dir):
    return sorted(str(p) for p in __import__("pathlib").Path(data_dir).glob("*.json.gz"))


def take(it, n):
    return list(itertools.islice(it, n))


def test_synthetic_shards_are_deterministic_c4_records(tmp_path):
    a = ensure_synthetic_shards(str(tmp_path / "a"), seed=3, num_shards=2, docs_per_shard=20)
    b = ensure_synthetic_shards(str(tmp_path / "b"), seed=3, num_shards=2, docs_per_shard=20)
    c = ensure_synthetic_shards(str(tmp_path / "c"), seed=4, num_shards=2, docs_per_shard=20)
    read = lambda p: gzip.open(p).read()
    assert read(a[0]) == read(b[0]) and read(a[0]) != read(c[0])
    records = [json.loads(line) for line in gzip.open(a[1])]
    assert len(records) == 20 and set(records[0]) == {"text", "timestamp", "url"}
    assert a[0].endswith("c4-train.00000-of-00002.json.gz")


def test_packing_concatenates_documents_into_full_windows(data_dir):
    path = shards(data_dir)[0]
    windows = np.concatenate(list(pack_shard(path, TOK, seq_len=63)))
    assert windows.shape[1] == 64
    flat = windows.reshape(-1)
    texts = [json.loads(line)["text"] for line in gzip.open(path)]
    expected = []
    for t in texts:
        expected += [TOK.bos_id, *t.encode(), TOK.eos_id]
    # Windows are the token stream cut in order; only the tail shorter than a window is dropped.
    assert flat.tolist() == expected[: len(flat)]
    assert len(expected) - len(flat) < 64


@pytest.mark.parametrize("shuffle_block", [0, 16])
def test_skip_resumes_inside_a_shard(data_dir, shuffle_block):
    path = shards(data_dir)[1]
    rows = lambda skip: {k: np.concatenate([b[k] for b in shard_rows(path, 1, 0, 0, TOK, 31, skip, 0, shuffle_block)])
                         for k in ("tokens", "window", "position")}
    full, rest = rows(0), rows(50)
    np.testing.assert_array_equal(full["tokens"][50:], rest["tokens"])
    np.testing.assert_array_equal(full["window"][50:], rest["window"])
    assert rest["position"][0] == 50
    shuffled = shuffle_block > 0
    assert (not np.array_equal(full["window"], np.arange(len(full["window"])))) == shuffled
    assert sorted(full["window"].tolist()) == list(range(len(full["window"])))  # a permutation: nothing lost


def test_epoch_orders_are_seeded_permutations():
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 0) != epoch_order(10, 1, 0)


@pytest.mark.parametrize("shuffle_block", [0, 32])
def test_resume_from_any_cursor_continues_exactly(tmp_path, shuffle_block):
    s = ensure_synthetic_shards(str(tmp_path), seed=0, num_shards=3, docs_per_shard=12)
    stream = lambda start: global_batches(local_rows(s, TOK, 63, 0, start, shuffle_block), 8, start)
    # Enough batches to cross shard and epoch boundaries.
    reference = take(stream(Cursor()), 120)
    assert reference[-1].ids[-1][0] >= 2  # crossed shard and epoch boundaries
    for k in (1, 17, 60, 119):
        resumed = take(stream(reference[k - 1].end), 120 - k)
        for a, b in zip(reference[k:], resumed):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.ids, b.ids)
    ids = np.concatenate([b.ids for b in reference])
    assert len({tuple(r) for r in ids}) == len(ids)  # no window twice


def test_rank_slices_tile_the_global_batch(data_dir):
    s = shards(data_dir)
    single = LocalLoader(s, TOK, 63, 0, 8, 0, 1)
    ranks = [LocalLoader(s, TOK, 63, 0, 8, r, 4) for r in range(4)]
    for _ in range(3):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(r.cursor == single.cursor for r in ranks)  # every rank resumes at the same place
        np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), whole.ids)


def test_loader_state_restores_on_another_dp_degree(data_dir):
    s = shards(data_dir)
    a = LocalLoader(s, TOK, 63, 0, 8, 0, 1)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    assert state["consumed"] == 40
    expected = a.next_batch().ids
    halves = []
    for r in range(2):
        b = LocalLoader(s, TOK, 63, 0, 8, r, 2)
        b.load_state_dict(state)
        halves.append(b.next_batch().ids)
    np.testing.assert_array_equal(np.concatenate(halves), expected)


def test_seed_changes_the_order(data_dir):
    s = shards(data_dir)
    first = lambda seed: next(global_batches(local_rows(s, TOK, 63, seed, Cursor()), 8, Cursor())).ids
    assert not np.array_equal(first(0), first(1))
    np.testing.assert_array_equal(first(0), first(0))


