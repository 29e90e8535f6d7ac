"""Recovery after a worker dies, disk checkpoints only vs memory snapshots, in one run.

For each mode, runs the debug model through ``raytitan.fit`` on --workers workers with a fault
injected (SIGKILL of one worker at the start of --kill-step), then reads the run's own records:
  faults/*.json      when the worker was killed
  restarts.jsonl     when the new worker group entered the training function, the step it
                     resumed from (and from where: disk or memory), and how long process-group
                     setup, building the model and loading the state took
  metrics.jsonl      when the first step after the restart completed, and its data wait
and prints the breakdown and the steps of work lost (kill step - 1 - resumed step). Then it
runs both modes again without a fault for --overhead-steps steps and reports the training
rate (tokens/s over the steps after the first 5; the median of --rate-repeats runs per mode,
alternating) with memory snapshots as a ratio to the rate without them: what snapshotting every
--memory-interval steps costs.

    python benchmarks/recovery.py [--workers 2] [--kill-step 15] [--interval 10] [--memory-interval 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record  # noqa: E402

import raytitan  # noqa: E402
from raytitan.trainer.elastic.fault import injected_faults  # noqa: E402
from raytitan.trainer.elastic.history import read_starts  # noqa: E402

WARMUP_STEPS = 5  # left out of the training rate: compile-free, but the first steps allocate


def run(args, root: str, memory_interval: int, steps: int, kill_step: int = -1) -> str:
    raytitan.fit(None, job__dump_folder=root, model__flavor=args.flavor, training__steps=steps,
                 training__seq_len=args.seq_len, training__local_batch_size=4, ray__num_workers=args.workers,
                 ray__use_gpu=args.gpu, ray__max_failures=1, checkpoint__interval=args.interval,
                 checkpoint__memory_interval=memory_interval, metrics__log_freq=1,
                 metrics__enable_tensorboard=False, fault__kill_step=kill_step, fault__kill_rank=args.kill_rank)
    return os.path.join(root, f"llama3-{args.flavor}")


def recovery(run_dir: str) -> dict:
    fault = injected_faults(run_dir)[-1]
    restart = read_starts(run_dir)[-1]
    first = next(m for m in raytitan.read_metrics(run_dir) if m["time"] > restart["time"] and "loss" in m)
    t = restart["timings"]
    setup = t["process_group"] + t["build"] + t["checkpoint_load"]
    return {
        "resumed from": f"{restart['resumed_from'] or 'start'} step {restart['resumed_step']}",
        "steps lost": fault["step"] - 1 - restart["resumed_step"],
        "kill -> first step s": first["time"] - fault["time"],
        "detect + restart s": restart["time"] - fault["time"],
        "build s": t["build"],
        "state load s": t["checkpoint_load"],
        "first batch wait s": first["data_wait_s"],
        "first step s": first["time"] - restart["time"] - setup - first["data_wait_s"],
    }


def training_rate(run_dir: str) -> float:
    """Tokens/s per device over the steps after the warm-up (each logged step is its own window)."""
    lines = [m for m in raytitan.read_metrics(run_dir) if "loss" in m and m["step"] > WARMUP_STEPS]
    seconds = sum(m["window_s"] for m in lines)
    return sum(m["tokens_per_sec_per_device"] * m["window_s"] for m in lines) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-step", type=int, default=15)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--interval", type=int, default=10, help="disk checkpoint interval")
    parser.add_argument("--memory-interval", type=int, default=1, help="memory snapshot interval")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--overhead-steps", type=int, default=40)
    parser.add_argument("--rate-repeats", type=int, default=3, help="runs per mode for the training rate")
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    modes = {"disk only": 0, f"memory every {args.memory_interval}": args.memory_interval}
    rows = []
    for mode, memory_interval in modes.items():
        run_dir = run(args, tempfile.mkdtemp(prefix="raytitan-recovery-"), memory_interval, args.steps, args.kill_step)
        rows.append({"mode": mode, **recovery(run_dir)})
    # The rates alternate between the modes, --rate-repeats times each, and the median counts:
    # a busy machine slows whichever run it meets, not one mode.
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rate_repeats):
        for mode, memory_interval in modes.items():
            samples[mode].append(training_rate(run(args, tempfile.mkdtemp(prefix="raytitan-rate-"), memory_interval,
                                                   args.overhead_steps)))
    rates = {mode: statistics.median(values) for mode, values in samples.items()}
    baseline = rates["disk only"]
    for row in rows:
        row["tokens/s/device"] = rates[row["mode"]]
        row["rate vs disk only"] = rates[row["mode"]] / baseline
        row["rate runs"] = [round(r) for r in samples[row["mode"]]]  # the spread behind the median
    print_table(rows, list(rows[0]))
    record("recovery", vars(args), rows)


if __name__ == "__main__":
    main()
