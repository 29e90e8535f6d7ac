"""Mixture of Experts with expert parallel: tokens/s of an MoE debug model on N ranks at
expert-parallel degrees 1, 2 and 4, as ratios to EP 1 measured in the same run, and the share of
step time spent in the all-to-all that sends tokens to their experts and back (dispatch and
combine, forward and backward, and the per-expert counts exchanged before each dispatch).

Each degree trains in fresh processes through the per-worker entry point under torchrun (gloo
on CPU; NCCL with --gpu, one GPU per rank), the Qwen3-MoE debug model by default
(``--model deepseek_v3`` for DeepSeek-V3's), byte tokenizer, synthetic data, FSDP over all N ranks
with the experts split over EP of them (``parallelism.expert_parallel_degree``).

The all-to-all time comes from the run's own profiler (``[profiling] enable_profiling``, one step
traced out of every --profile-freq): each rank's trace of a step is read afterwards, and the time
covered by its all-to-all events (the union of their intervals inside the step) is divided by the
step's length. On CPU the events are gloo's ``gloo:all_to_all`` (from a collective's start to its
completion: moving the rows and waiting for the slowest rank); on CUDA the NCCL kernels of the
exchange (SendRecv / AllToAll). Nothing is timed in the training code itself. Tokens/s (all ranks
together) is the median over the steps after --warmup that the profiler left alone (the traced
steps and the warm-up step before each are left out).

On a CPU the ranks share the cores (torchrun gives each one intra-op thread), so expert parallel
cannot add compute here: what changes with EP is the all-to-all added and the smaller all-gather
of expert weights (sharded over N / EP ranks instead of N). On a small, shared machine the numbers
are noisy (other processes take the same cores; the 1-minute load average is recorded with each
row): compare ratios from one run, never numbers from different runs.

    python benchmarks/moe.py                         # Qwen3-MoE debug, 4 gloo ranks, EP 1, 2, 4
    python benchmarks/moe.py --model deepseek_v3     # DeepSeek-V3 debug (1 dense + 3 MoE layers)
    python benchmarks/moe.py --repeats 3             # 3 rounds, medians: steadier on a shared machine
    python benchmarks/moe.py --gpu                   # 4 GPUs, NCCL (--nproc 8 --ep 1 2 4 8 on 8)

Results: one JSON line per run in benchmarks/results/moe.jsonl; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, print_table, record, run_worker, steady  # noqa: E402

MODELS = ("qwen3_moe", "deepseek_v3")
# Events of the token exchange in a trace: gloo's per-collective annotation on CPU; on CUDA the
# kernels NCCL runs for an all-to-all (grouped send/receive, or a native all-to-all kernel).
GLOO_A2A = re.compile(r"^gloo:all_to_all$")
NCCL_A2A = re.compile(r"SendRecv|AllToAll", re.IGNORECASE)
STEP = re.compile(r"^ProfilerStep#\d+$")

COLUMNS = ["ep", "tokens_per_s", "vs_ep1", "a2a_ms_per_step", "traced_step_ms", "a2a_share", "a2a_share_max_rank",
           "a2a_calls_per_step", "first_loss", "last_loss"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="qwen3_moe")
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--nproc", type=int, default=4, help="ranks (torchrun processes; one GPU each with --gpu)")
    parser.add_argument("--ep", nargs="+", type=int, default=[1, 2, 4], help="expert-parallel degrees to compare")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s and of the traces")
    parser.add_argument("--profile-freq", type=int, default=5, help="trace one step out of every this many")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--local-batch", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="one GPU per rank, NCCL, bf16 FSDP parameters")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over the degrees, each starting at the next one; medians over rounds")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one degree may take")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if 1 not in args.ep:
        parser.error("--ep must include 1: the other degrees are reported as ratios to it")
    bad = [ep for ep in args.ep if ep < 1 or args.nproc % ep]
    if bad:
        parser.error(f"--ep {' '.join(map(str, bad))}: every degree must divide --nproc {args.nproc}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if not any(s > args.warmup for s in traced_steps(args)):
        parser.error(f"no step after --warmup {args.warmup} is traced: lower --profile-freq or raise --steps")
    if not untraced_steps(args):
        parser.error("every step after --warmup is traced or warms the profiler up: raise --profile-freq or --steps")
    return args


def traced_steps(args: argparse.Namespace) -> list[int]:
    """The training steps the profiler records (``raytitan.components.profiling.traced_schedule``)."""
    return [s for s in range(1, args.steps + 1) if s % args.profile_freq == 0]


def untraced_steps(args: argparse.Namespace) -> list[int]:
    """Steps after the warm-up that run without the profiler recording or warming up."""
    touched = {t for s in traced_steps(args) for t in (s - 1, s)}
    return [s for s in range(args.warmup + 1, args.steps + 1) if s not in touched]


def overrides(args: argparse.Namespace, ep: int) -> dict:
    return {"model.name": args.model, "model.flavor": args.flavor, "model.tokenizer": "byte",
            "training.dataset": "synthetic", "training.seq_len": args.seq_len,
            "training.local_batch_size": args.local_batch, "training.steps": args.steps,
            "lr_scheduler.warmup_steps": 2, "parallelism.expert_parallel_degree": ep,
            "ray.use_gpu": "true" if args.gpu else "false",
            "profiling.enable_profiling": "true", "profiling.profile_freq": args.profile_freq}


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, as milliseconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1000


def trace_a2a(path: str, gpu: bool) -> dict:
    """One rank's traced step: its length, and the time and number of all-to-all events in it."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if STEP.match(e["name"])]
    if not steps:
        raise RuntimeError(f"{path}: no ProfilerStep event")
    step = max(steps, key=lambda e: e["dur"])
    lo, hi = step["ts"], step["ts"] + step["dur"]
    if gpu:
        a2a = [e for e in events if e.get("cat") == "kernel" and NCCL_A2A.search(e["name"])]
    else:
        a2a = [e for e in events if GLOO_A2A.match(e["name"])]
    inside = [(max(e["ts"], lo), min(e["ts"] + e["dur"], hi)) for e in a2a if e["ts"] < hi and e["ts"] + e["dur"] > lo]
    return {"step_ms": step["dur"] / 1000, "a2a_ms": union_ms(inside), "calls": len(inside)}


def a2a_traces(run_dir: str, args: argparse.Namespace) -> list[dict]:
    """Every rank's traced steps after the warm-up."""
    traces = []
    for step in (s for s in traced_steps(args) if s > args.warmup):
        files = sorted(glob.glob(os.path.join(run_dir, "profile_traces", f"iteration_{step}", "rank*_trace.json")))
        if not files:
            raise RuntimeError(f"no profiler traces of step {step} under {run_dir}")
        traces += [trace_a2a(path, args.gpu) for path in files]
    return traces


def measure(args: argparse.Namespace, ep: int, root: str, name: str) -> dict:
    """One training run at one degree: its tokens/s, its traces, its losses."""
    t0 = time.perf_counter()
    records = run_worker(overrides(args, ep), root, name, nproc=args.nproc, timeout=args.timeout)
    wall = time.perf_counter() - t0
    keep = set(untraced_steps(args))
    losses = [r["loss"] for r in records if "loss" in r]
    return {"ep": ep,
            "tokens_per_s": args.nproc * steady([r for r in records if r.get("step") in keep],
                                                "tokens_per_sec_per_device", args.warmup),
            "traces": a2a_traces(os.path.join(root, name), args), "first_loss": losses[0], "last_loss": losses[-1],
            "load_1m": round(os.getloadavg()[0], 1), "wall_s": round(wall, 1)}


def summarize(ep: int, runs: list[dict], base: list[dict]) -> dict:
    """One degree over the rounds: median tokens/s, the median of its per-round ratios to EP 1
    (each against the EP 1 run of the same round), all-to-all as the mean over every rank's
    traced steps of every round."""
    traces = [t for r in runs for t in r["traces"]]
    ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, base)]
    a2a = statistics.mean(t["a2a_ms"] for t in traces)
    step_ms = statistics.mean(t["step_ms"] for t in traces)
    return {"ep": ep, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "vs_ep1": statistics.median(ratios), "vs_ep1_rounds": ratios,
            "a2a_ms_per_step": a2a, "traced_step_ms": step_ms, "a2a_share": a2a / step_ms,
            "a2a_share_max_rank": max(t["a2a_ms"] / t["step_ms"] for t in traces),
            "a2a_calls_per_step": statistics.mean(t["calls"] for t in traces), "traces": len(traces),
            "first_loss": runs[0]["first_loss"], "last_loss": runs[0]["last_loss"],
            "load_1m": [r["load_1m"] for r in runs], "wall_s": [r["wall_s"] for r in runs]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        import torch

        if torch.cuda.device_count() < args.nproc:
            raise SystemExit(f"--gpu with --nproc {args.nproc} needs {args.nproc} GPUs; "
                             f"{torch.cuda.device_count()} visible")
    root = tempfile.mkdtemp(prefix="raytitan-moe-")
    print(f"{args.model} {args.flavor} on {args.nproc} {'NCCL' if args.gpu else 'gloo'} ranks, EP {args.ep}, "
          f"{args.repeats} round(s); tokens/s over steps {untraced_steps(args)}, all-to-all from the traces of "
          f"steps {[s for s in traced_steps(args) if s > args.warmup]}; runs under {root}", flush=True)
    runs: dict[int, list[dict]] = {ep: [] for ep in args.ep}
    for round_no in range(args.repeats):
        # Each round starts at another degree, so a change in the machine's load is not always
        # charged to the same one.
        order = args.ep[round_no % len(args.ep):] + args.ep[:round_no % len(args.ep)]
        for ep in order:
            print(f"round {round_no + 1}: running EP {ep} (1-minute load {os.getloadavg()[0]:.1f}) ...", flush=True)
            run = measure(args, ep, root, f"{args.model}-ep{ep}-r{round_no + 1}")
            runs[ep].append(run)
            print(f"  {run['tokens_per_s']:,.0f} tokens/s, {run['wall_s']} s", flush=True)
    rows = [summarize(ep, runs[ep], runs[1]) for ep in args.ep]
    print(f"\n{args.model} {args.flavor}, seq {args.seq_len}, local batch {args.local_batch}, {args.nproc} ranks, "
          f"{args.repeats} round(s): tokens/s of all ranks together (median over rounds), vs_ep1 the median of "
          f"each round's ratio, all-to-all the mean over ranks and traced steps\n")
    print_table(rows, COLUMNS)
    if not args.gpu:
        print("\nCPU: the ranks share the machine's cores and whatever else runs on it; these numbers are "
              "noisy, compare the ratios of this run only (vs_ep1_rounds in the JSON line shows their spread).")
    record("moe", {**vars(args), "variants": {f"ep{ep}": overrides(args, ep) for ep in args.ep}}, rows,
           results_dir=args.results_dir)


if __name__ == "__main__":
    main()
