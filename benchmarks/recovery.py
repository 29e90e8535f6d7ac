"""Recovery time after a worker dies, and what dominates it.

Runs the debug model through ``raytitan.fit`` on --workers workers with a fault injected
(SIGKILL of one worker at --kill-step), then reads the run's own records:
  faults/*.json      when the worker was killed
  restarts.jsonl     when the new worker group entered the training function, and how long
                     process-group setup, building the model and loading the checkpoint took
  metrics.jsonl      when the first step after the restart completed, and its data wait
and prints the breakdown, plus steps of work lost (kill step - 1 - last checkpoint).

    python benchmarks/recovery.py [--workers 2] [--kill-step 7] [--interval 5] [--flavor debugmodel]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record  # noqa: E402

import raytitan  # noqa: E402
from raytitan.trainer.elastic.fault import injected_faults  # noqa: E402
from raytitan.trainer.elastic.history import read_starts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-step", type=int, default=7)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--interval", type=int, default=5, help="checkpoint interval")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="raytitan-recovery-")
    raytitan.fit(None, job__dump_folder=root, model__flavor=args.flavor, training__steps=args.steps,
                 training__seq_len=args.seq_len, training__local_batch_size=4, ray__num_workers=args.workers,
                 ray__use_gpu=args.gpu, ray__max_failures=1, checkpoint__interval=args.interval,
                 metrics__log_freq=1, metrics__enable_tensorboard=False,
                 fault__kill_step=args.kill_step, fault__kill_rank=args.kill_rank)
    run_dir = os.path.join(root, f"llama3-{args.flavor}")
    fault = injected_faults(run_dir)[-1]
    restart = read_starts(run_dir)[-1]
    first = next(m for m in raytitan.read_metrics(run_dir) if m["time"] > restart["time"] and "loss" in m)
    t = restart["timings"]
    setup = t["process_group"] + t["build"] + t["checkpoint_load"]
    first_step_s = first["time"] - restart["time"] - setup
    phases = [
        ("detection + worker-group restart (kill -> training function entered)", restart["time"] - fault["time"]),
        ("process group init (inside the function)", t["process_group"]),
        ("build model, optimizer, data client", t["build"]),
        ("checkpoint load (DCP)", t["checkpoint_load"]),
        ("data restart (first batch wait)", first["data_wait_s"]),
        ("first step compute", first_step_s - first["data_wait_s"]),
    ]
    total = first["time"] - fault["time"]
    rows = [{"phase": name, "seconds": s, "share": s / total} for name, s in phases]
    rows.append({"phase": "total: kill -> first completed step", "seconds": total, "share": 1.0})
    rows.append({"phase": f"steps lost (killed at step {fault['step']}, resumed at {restart['resumed_step']})",
                 "seconds": None, "share": None, "steps": fault["step"] - 1 - restart["resumed_step"]})
    print_table(rows, ["phase", "seconds", "share", "steps"])
    record("recovery", vars(args), rows)


if __name__ == "__main__":
    main()
