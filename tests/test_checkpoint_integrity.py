"""Checkpoint checksums: damage at the right length is found while loading, the step is skipped
like a truncated one, and the tools report every damaged step. One process, tiny tensors."""

import json
import logging
import os

import pytest
import torch

from raytitan.components.checkpoint import integrity
from raytitan.components.checkpoint.convert import load_tensors
from raytitan.components.checkpoint.layout import COMMIT_MARKER, CheckpointError, final_export, read_metadata
from raytitan.tools import checkpoints as checkpoints_cli

from tests.test_checkpoint import full_manager, trained


def train_step(model, optimizer):
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()


def saved_steps(folder, steps=(1, 2), **kwargs):
    """A run's steps, training between saves; returns the model and optimizer."""
    model, optimizer = trained()
    m = full_manager(folder, model, optimizer, **kwargs)
    for step in steps:
        m.save(step)
        train_step(model, optimizer)
    m.close()
    return model, optimizer


def damage(step_path, key, how):
    """Overwrite the bytes of ``key``'s values (found by their saved bytes) in place."""
    metadata = read_metadata(step_path)
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == key)
    file = os.path.join(step_path, info.relative_path)
    size = os.path.getsize(file)
    saved = load_tensors(step_path, metadata, [key])[key].numpy().tobytes()
    with open(file, "r+b") as f:
        at = f.read().find(saved, info.offset, info.offset + info.length)
        assert at >= 0, "the tensor's bytes are not stored raw"
        f.seek(at)
        f.write(b"\x00\x00\xc0\x7f" * (len(saved) // 4) if how == "nan" else bytes(b ^ 0x20 for b in saved[:16]))
    assert os.path.getsize(file) == size


def load_into_fresh(folder, step=None, seed=7):
    """A fresh model and optimizer restored the way a run resumes (``step`` None: the newest)."""
    model, optimizer = trained(seed)
    m = full_manager(folder, model, optimizer)
    chosen = m.resolve_load_step(-1 if step is None else step)
    return m.load(chosen), model, optimizer


def assert_same_state(a, b):
    for (name, p), q in zip(a[0].state_dict().items(), b[0].state_dict().values()):
        assert torch.equal(p, q), name
    for x, y in zip(a[1].state_dict()["state"].values(), b[1].state_dict()["state"].values()):
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    # A launch earlier in the session stops raytitan's logger from propagating to the root.
    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="raytitan.components.checkpoint")
    return caplog


@pytest.mark.parametrize("how, key", [("flip", "model.0.weight"), ("nan", "optimizer.state.1.bias.exp_avg")])
def test_damaged_tensor_bytes_skip_the_step_and_resume_from_the_previous_bit_identically(tmp_path, warnings_seen, how,
                                                                                          key):
    saved_steps(tmp_path)
    damage(str(tmp_path / "step-2"), key, how)
    resumed, *state = load_into_fresh(tmp_path)
    assert resumed == 1
    assert f"skipping damaged checkpoint {tmp_path}/step-2: " in warnings_seen.text
    assert f"'{key}' in {tmp_path}/step-2/__0_0.distcp is damaged" in warnings_seen.text
    _, *direct = load_into_fresh(tmp_path, step=1, seed=8)
    assert_same_state(state, direct)
    with pytest.raises(integrity.ChecksumError, match=f"'{key}' in .*step-2/__0_0.distcp is damaged.*checkpoints verify"):
        load_into_fresh(tmp_path, step=2)  # asked for by checkpoint.load_step: an error, never a fallback


def test_every_step_damaged_is_an_error_naming_each(tmp_path, warnings_seen):
    saved_steps(tmp_path)
    damage(str(tmp_path / "step-1"), "model.1.bias", "flip")
    damage(str(tmp_path / "step-2"), "model.0.bias", "flip")
    with pytest.raises(CheckpointError, match="every committed checkpoint .* is damaged: .*'model.0.bias'.*'model.1.bias'"):
        load_into_fresh(tmp_path)


@pytest.mark.parametrize("marker", ["", "{not json", "[1, 2]"])
def test_damaged_commit_marker_is_a_damaged_step(tmp_path, warnings_seen, capsys, marker):
    saved_steps(tmp_path)
    with open(tmp_path / "step-2" / COMMIT_MARKER, "w") as f:
        f.write(marker)
    assert final_export(str(tmp_path), 2) is None
    assert load_into_fresh(tmp_path)[0] == 1
    assert f"skipping damaged checkpoint {tmp_path}/step-2: the commit marker {tmp_path}/step-2/{COMMIT_MARKER} is" in \
        warnings_seen.text
    assert checkpoints_cli.main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "step 2 is damaged and never loaded: the commit marker" in out
    with pytest.raises(CheckpointError, match="commit marker .* is"):
        load_into_fresh(tmp_path, step=2)


def test_verify_reports_every_damaged_step(tmp_path, capsys):
    saved_steps(tmp_path, steps=(1, 2, 3, 4))
    damage(str(tmp_path / "step-2"), "model.0.weight", "flip")
    damage(str(tmp_path / "step-2"), "optimizer.state.0.bias.exp_avg_sq", "nan")
    with open(tmp_path / "step-3" / COMMIT_MARKER, "w") as f:
        f.write("")
    with open(tmp_path / "step-4" / COMMIT_MARKER, "w") as f:
        f.write("{garbage")
    assert checkpoints_cli.main(["verify", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"{tmp_path}/step-1: checksums ok;" in out
    assert "step-2: DAMAGED: 2 item(s) fail their checksums" in err
    assert "cannot read 'model.0.weight'" in err and "cannot read 'optimizer.state.0.bias.exp_avg_sq'" in err
    assert "step-3: DAMAGED: the commit marker" in err and "is empty" in err
    assert "step-4: DAMAGED: the commit marker" in err and "not valid JSON" in err
    assert "3 of 4 steps are damaged: step-2, step-3, step-4" in err


def test_old_step_without_checksums_loads_and_verify_says_so(tmp_path, capsys):
    saved_steps(tmp_path, steps=(1,))
    step = tmp_path / "step-1"
    with open(step / COMMIT_MARKER) as f:
        marker = json.load(f)
    for name in os.listdir(step):
        if name.endswith(integrity.SUFFIX):
            os.remove(step / name)
    with open(step / COMMIT_MARKER, "w") as f:
        json.dump({k: v for k, v in marker.items() if k != "checksums"}, f)
    assert load_into_fresh(tmp_path)[0] == 1
    assert checkpoints_cli.main(["verify", str(step)]) == 0
    assert "no checksums (saved before raytitan recorded them)" in capsys.readouterr().out


def test_lost_checksum_file_is_damage(tmp_path, warnings_seen):
    saved_steps(tmp_path)
    os.remove(tmp_path / "step-2" / f"__0_0.distcp{integrity.SUFFIX}")
    assert load_into_fresh(tmp_path)[0] == 1
    assert f"__0_0.distcp{integrity.SUFFIX} is missing" in warnings_seen.text


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_each_stored_item_has_its_own_checksum(tmp_path, mode):
    """DCP's ``tell()`` before and after each item cuts the hashed segments: every item is exactly
    one segment (were torch to change that, loads would still be checked, item by item)."""
    saved_steps(tmp_path, async_mode=mode)
    path = str(tmp_path / "step-2")
    metadata = read_metadata(path)
    with open(os.path.join(path, COMMIT_MARKER)) as f:
        assert json.load(f)["checksums"] == integrity.ALGORITHM
    with open(os.path.join(path, f"__0_0.distcp{integrity.SUFFIX}")) as f:
        segments = {offset: length for offset, length, _ in json.load(f)["segments"]}
    assert {info.offset: info.length for info in metadata.storage_data.values()} == segments
    assert integrity.verify_step(path, metadata, {"checksums": integrity.ALGORITHM}) == []
    assert torch.serialization.get_crc32_options()  # torch's own record CRC is back on after the write


@pytest.fixture
def s3_folder(monkeypatch):
    """A checkpoint folder on a local S3 server (moto)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from raytitan.components import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("integrity")
    storage.use_root(f"s3://integrity/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1")
    yield "s3://integrity/runs/checkpoint"
    server.stop()


@pytest.mark.slow
def test_damage_on_an_object_store_is_found_and_skipped(s3_folder, warnings_seen):
    """Object stores go through pyarrow's reader and writer (``storage``): checksums are written
    beside the objects and checked on each item's ranged read."""
    from raytitan.components import storage

    saved_steps(s3_folder, async_mode="async")
    step = f"{s3_folder}/step-2"
    assert f"__0_0.distcp{integrity.SUFFIX}" in storage.listdir(step)
    info = next(v for k, v in read_metadata(step).storage_data.items() if k.fqn == "model.0.weight")
    with storage.open_binary(f"{step}/{info.relative_path}") as f:
        data = bytearray(f.read())
    data[info.offset + info.length // 2] ^= 0x01  # one bit, same length
    fs, inner = storage.resolve(f"{step}/{info.relative_path}")
    with fs.open_output_stream(inner) as f:
        f.write(bytes(data))
    assert load_into_fresh(s3_folder)[0] == 1
    assert f"'model.0.weight' in {step}/__0_0.distcp is damaged" in warnings_seen.text


def test_overlapping_writes_restore_torchs_record_crc_in_each_thread():
    """torch keeps its record-CRC setting per thread: a write on this thread that ends while a
    background write is still going must leave this thread's setting on (a shared counter left it
    off, restoring it later in the background thread instead)."""
    import threading

    inside, release = threading.Event(), threading.Event()

    def background_write():
        with integrity._without_torch_record_crc():
            inside.set()
            release.wait(10)

    with integrity._without_torch_record_crc():
        assert not torch.serialization.get_crc32_options()
        writer = threading.Thread(target=background_write)
        writer.start()
        assert inside.wait(10)
    assert torch.serialization.get_crc32_options()  # this write ended first, the other still runs
    release.set()
    writer.join(10)
