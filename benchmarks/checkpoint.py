"""Checkpoint cost: how long a save stalls training (sync vs async), how long it takes to land,
and how long loading takes, on the same world size and resharded onto another.

Each of --save-world ranks builds the model sharded with FSDP2 (plus an AdamW step, so the
optimizer state is real) and, per mode, saves --repeats times through raytitan's
CheckpointManager:
  stall_s        time inside save(): the whole write for sync, the staging copy for async
  landed_s       save() called -> step committed on storage (seen between steps when async)
  steps_s        --steps training steps run right after save() returned (the write overlaps
                 them in async modes), next to idle_steps_s: the same steps with no save
  checksum_s     time rank 0 spent hashing what it wrote (CRC-32, in the writing thread), and
  checksum_share that time as a share of the save (landed_s: the whole write, also when async)
Then it times loading the newest step on the same ranks, and on --load-world ranks (reshard), with
checksum_s: the part of it rank 0 spent checking what it read against the checksums.
Rank 0's medians are reported (each repeat's stall too); the stall ratio is async / sync from
the same run. --profile prints where rank 0's last async save() spent its time (cProfile).
Last, the net cost of checksums on the write alone: one process writes 128 MiB of tensors through
DCP's plain writer (torch.save's own record CRC on, as always) and through raytitan's (checksums,
torch's unchecked record CRC off), interleaved, fastest of 2 x --repeats each.

    python benchmarks/checkpoint.py [--flavor debugmodel] [--save-world 2] [--load-world 1] [--repeats 3]
                                    [--profile] [--gpu]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import free_port, print_table, record  # noqa: E402


def _setup(rank: int, world: int, port: int, gpu: bool):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if gpu:
        torch.cuda.set_device(rank)
        dist.init_process_group("cpu:gloo,cuda:nccl")
        return torch.device("cuda", rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _build(flavor: str, device: torch.device, seq_len: int):
    """The model, FSDP2-sharded over all ranks, and AdamW after one step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from raytitan.models.llama3.args import FLAVORS
    from raytitan.models.llama3.model import Transformer

    args = FLAVORS[flavor].with_vocab(32000)  # a real tokenizer's vocabulary, not the byte one
    with torch.device("meta"):
        model = Transformer(args)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights(buffer_device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len + 1), device=device)

    def step():
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    return model, optimizer, step


def _manager(folder, model, optimizer, mode, group):
    from raytitan.components.checkpoint.manager import CheckpointManager, ModelState, OptimizerState

    states = {"model": ModelState([model]), "optimizer": OptimizerState([model], [optimizer])}
    return CheckpointManager(folder, states, keep_latest_k=2, process_group=group, async_mode=mode)


def _save_phase(rank, world, port, cfg, out):
    device = _setup(rank, world, port, cfg["gpu"])
    model, optimizer, step = _build(cfg["flavor"], device, cfg["seq_len"])
    group = dist.new_group(backend="gloo")  # async saves coordinate on a CPU group of their own
    rows = []
    idle = []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        idle.append(time.perf_counter() - t0)
    modes = ["disabled", "async"] + (["async_with_pinned_mem"] if cfg["gpu"] else [])
    n = 0
    for mode in modes:
        m = _manager(cfg["folder"], model, optimizer, mode, group)
        stalls, landed, steps, hashing = [], [], [], []
        for _ in range(cfg["repeats"]):
            n += 1
            dist.barrier()
            t0 = time.perf_counter()
            profile = cfg["profile"] and rank == 0 and mode != "disabled" and len(stalls) == cfg["repeats"] - 1
            profiler = cProfile.Profile() if profile else None
            if profiler:
                profiler.enable()
            committed = m.save(n) is not None or rank != 0  # rank 0 commits; it times the landing
            stalls.append(time.perf_counter() - t0)
            if profiler:
                profiler.disable()
                print(f"\nrank 0, last {mode} save(): {stalls[-1]:.3f}s")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
            landed_at = stalls[-1] if committed else None
            for _ in range(cfg["steps"]):
                m.wait_for_staging()
                step()
                if landed_at is None and m.poll() is not None:
                    landed_at = time.perf_counter() - t0
            steps.append(time.perf_counter() - t0 - stalls[-1])
            m.wait()
            landed.append(landed_at if landed_at is not None else time.perf_counter() - t0)
            hashing.append(m.last_checksum_seconds)
        m.close()
        rows.append({"mode": mode, "stall_s": statistics.median(stalls), "each_stall_s": [round(x, 3) for x in stalls],
                     "landed_s": statistics.median(landed),
                     "steps_s": statistics.median(steps), "idle_steps_s": statistics.median(idle),
                     "checksum_s": statistics.median(hashing),
                     "checksum_share": statistics.median(h / t for h, t in zip(hashing, landed))})
    loads, checks = [], []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        m.load(n)
        loads.append(time.perf_counter() - t0)
        checks.append(m.last_check_seconds)
    if rank == 0:
        size = sum(os.path.getsize(os.path.join(cfg["folder"], f"step-{n}", f))
                   for f in os.listdir(os.path.join(cfg["folder"], f"step-{n}")))
        with open(out, "w") as f:
            json.dump({"rows": rows, "load_s": statistics.median(loads), "load_check_s": statistics.median(checks),
                       "bytes": size, "step": n}, f)
    dist.destroy_process_group()


def _load_phase(rank, world, port, cfg, out):
    device = _setup(rank, world, port, cfg["gpu"])
    model, optimizer, _ = _build(cfg["flavor"], device, cfg["seq_len"])
    m = _manager(cfg["folder"], model, optimizer, "disabled", None)
    loads, checks = [], []
    for _ in range(cfg["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        m.load(cfg["step"])
        loads.append(time.perf_counter() - t0)
        checks.append(m.last_check_seconds)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"load_s": statistics.median(loads), "load_check_s": statistics.median(checks)}, f)
    dist.destroy_process_group()


def _write_cost(folder: str, repeats: int) -> list[dict]:
    """DCP's plain writer against raytitan's checksumming one, on one process (see the docstring)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from raytitan.components.checkpoint import dcp_files, integrity

    tensors = {f"t{i}": torch.randn(2 << 20) for i in range(16)}  # 128 MiB
    writers = {"plain DCP writer": dcp_files.writer, "with checksums": integrity.writer}
    times: dict[str, list[float]] = {name: [] for name in writers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        for i in range(2 * repeats):
            for name, make in writers.items():
                path = os.path.join(folder, f"write-{i}-{len(times[name])}")
                t0 = time.perf_counter()
                dcp.save(tensors, storage_writer=make(path), no_dist=True)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(path)
    plain = min(times["plain DCP writer"])
    return [{"write (128 MiB, 1 process)": name, "seconds": min(t), "vs_plain": min(t) / plain}
            for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--save-world", type=int, default=2)
    parser.add_argument("--load-world", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps after each save")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile rank 0's last async save()")
    parser.add_argument("--folder", help="where to write (default: a temporary folder, removed after)")
    args = parser.parse_args()
    if args.gpu and max(args.save_world, args.load_world) > torch.cuda.device_count():
        parser.error(f"--gpu runs one rank per GPU and this machine has {torch.cuda.device_count()}: lower "
                     "--save-world/--load-world (on one GPU: 1 and 1, no resharding)")

    folder = args.folder or tempfile.mkdtemp(prefix="raytitan-ckpt-bench-")
    cfg = {"flavor": args.flavor, "repeats": args.repeats, "steps": args.steps, "seq_len": args.seq_len,
           "gpu": args.gpu, "folder": folder, "profile": args.profile}
    out = os.path.join(folder, "result.json")
    mp.start_processes(_save_phase, args=(args.save_world, free_port(), cfg, out), nprocs=args.save_world,
                       start_method="spawn")
    with open(out) as f:
        saved = json.load(f)
    mp.start_processes(_load_phase, args=(args.load_world, free_port(), {**cfg, "step": saved["step"]}, out),
                       nprocs=args.load_world, start_method="spawn")
    with open(out) as f:
        resharded = json.load(f)
    writes = _write_cost(folder, args.repeats) if not args.gpu else []
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)

    rows = saved["rows"]
    sync = next(r for r in rows if r["mode"] == "disabled")
    for r in rows:
        r["stall_vs_sync"] = r["stall_s"] / sync["stall_s"]
    print(f"\n{args.flavor}: checkpoint {saved['bytes'] / 2**20:.1f} MiB (model + AdamW), saved by {args.save_world} "
          f"ranks, {args.repeats} repeats, medians\n")
    print_table(rows, ["mode", "stall_s", "stall_vs_sync", "landed_s", "steps_s", "idle_steps_s", "checksum_s",
                       "checksum_share"])
    loads = [{"load": f"same world ({args.save_world})", "seconds": saved["load_s"], "checksum_s": saved["load_check_s"]},
             {"load": f"resharded onto {args.load_world}", "seconds": resharded["load_s"],
              "checksum_s": resharded["load_check_s"]}]
    print()
    print_table(loads, ["load", "seconds", "checksum_s"])
    if writes:
        print()
        print_table(writes, ["write (128 MiB, 1 process)", "seconds", "vs_plain"])
    record("checkpoint", {**vars(args), "checkpoint_bytes": saved["bytes"]}, rows + loads + writes)


if __name__ == "__main__":
    main()
