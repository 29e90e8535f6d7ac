"""What context parallel costs in attention: one forward + backward of ring attention over a
sequence split across cp ranks, per rotate method, against one process attending the whole
sequence (the baseline), measured in one run.

Shapes default to Llama 3 8B's attention (32 query heads, 8 K/V heads, head dim 128); the
sequence is --seq tokens. Each cp rank gets cores / cp threads on CPU (gloo), or one GPU (NCCL,
bf16) with --gpu; the baseline gets all the cores, or one GPU. Reported per variant: median
seconds (the slowest rank's), baseline / variant (the speed-up), and on CUDA the peak memory the
call added on a rank. The ideal speed-up is cp with one GPU per rank, and 1.0 on a CPU, whose
cores the ranks share.

    python benchmarks/context_parallel.py [--seq 8192] [--cp 2] [--repeats 5] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import free_port, print_table, record  # noqa: E402

from raytitan.distributed.context import RingAttention, load_balanced_positions  # noqa: E402


def qkv(args, seq: int, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(args.batch, heads, seq, args.head_dim, device=device, dtype=dtype, generator=g,
                        requires_grad=True) for heads in (args.heads, args.kv_heads, args.kv_heads)]


def timed(attend, inputs, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """(median seconds of forward + backward after one warm-up call, peak bytes it added on CUDA)."""
    def once():
        attend(*inputs).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return statistics.median(times), peak


def full_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def rank_main(rank: int, cp: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if args.gpu else torch.device("cpu")
    if args.gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    dist.init_process_group("nccl" if args.gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=cp)
    positions = load_balanced_positions(args.seq, cp, rank)
    inputs = [t.detach().index_select(2, positions.to(device)).requires_grad_() for t in qkv(args, args.seq, device)]
    rows = []
    for method in ("allgather", "alltoall"):
        dist.barrier()
        seconds, peak = timed(RingAttention(dist.group.WORLD, method), inputs, args.repeats, device)
        rows.append({"variant": f"cp {cp} {method}", "seconds": seconds, "peak_mib": peak and peak / 2**20})
    gathered = [None] * cp
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        # A step lasts as long as its slowest rank.
        with open(out, "w") as f:
            json.dump([max(per_rank, key=lambda r: r["seconds"]) for per_rank in zip(*gathered)], f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--cp", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="one GPU per cp rank, NCCL, bf16")
    args = parser.parse_args()
    if args.gpu and max(args.cp) > torch.cuda.device_count():
        parser.error(f"--cp {max(args.cp)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    for cp in args.cp:
        if args.seq % (2 * cp):
            parser.error(f"--seq {args.seq} is not divisible by 2 x cp = {2 * cp}")

    import torch.multiprocessing as mp

    device = torch.device("cuda", 0) if args.gpu else torch.device("cpu")
    print(f"baseline: one process, whole sequence of {args.seq}", flush=True)
    seconds, peak = timed(full_attention, qkv(args, args.seq, device), args.repeats, device)
    rows = [{"variant": "one process", "seconds": seconds, "peak_mib": peak and peak / 2**20}]
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cp:
            print(f"cp {cp}: {cp} ranks", flush=True)
            out = os.path.join(tmp, f"cp{cp}.json")
            mp.start_processes(rank_main, args=(cp, free_port(), args, out), nprocs=cp, start_method="spawn")
            with open(out) as f:
                rows += json.load(f)
    for row in rows:
        row["speed_up"] = rows[0]["seconds"] / row["seconds"]
    print_table(rows, ["variant", "seconds", "speed_up", "peak_mib"])
    record("context_parallel", vars(args), rows)


if __name__ == "__main__":
    main()
