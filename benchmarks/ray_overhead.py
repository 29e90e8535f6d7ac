"""What Ray costs: the same config and steps through Ray (`python -m raytitan.train`) and
through torchrun (`torchrun -m raytitan.worker`), alternating, --repeats times each.

Reports steady-state tokens/s per device (median over the steps after --warmup), the share of
those steps spent waiting for data, and start-up time (command start -> first step logged), and
the ratio Ray / torchrun, from the same run. Start-up is broken down from the run's own records
(``launches.jsonl``, ``restarts.jsonl``, ``metrics.jsonl``): command -> Ray ready (the driver's
imports and ``ray.init``; Ray only), command -> worker processes created (under Ray: Ray Train's
controller and the worker group's placement too), worker process -> training function (imports,
and under Ray the worker's set-up and process group), model build + state load, and the rest up
to the end of step 1 (plan, mesh, first batch and the step). Under Ray the data comes from the Ray Data feeder;
under torchrun each rank reads itself. With fewer workers than cores, Ray's own processes (GCS,
raylet, driver, feeder) get cores of their own, which separates their CPU use from their
per-step cost.

    python benchmarks/ray_overhead.py [--workers 2] [--steps 20] [--repeats 3] [--threads N] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record, steady  # noqa: E402

from raytitan.components.metrics import read_jsonl, read_metrics  # noqa: E402
from raytitan.ray.launcher import LAUNCHES_FILE  # noqa: E402
from raytitan.trainer.elastic.history import read_starts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PHASES = ["to_ray_s", "to_workers_s", "worker_entry_s", "build_load_s", "first_step_s"]


def startup_phases(run_dir: str, started: float, first_step: float) -> dict:
    """Seconds of each start-up phase (``PHASES``; ``to_ray_s`` is None under torchrun)."""
    launch = (read_jsonl(os.path.join(run_dir, LAUNCHES_FILE)) or [None])[-1]
    start = read_starts(run_dir)[0]
    t = start["timings"]
    entered = start["time"]
    build_load = t.get("build", 0.0) + t.get("checkpoint_load", 0.0)
    return {"to_ray_s": launch["ray_ready_at"] - started if launch else None,
            "to_workers_s": entered - t["process_to_entry"] - started, "worker_entry_s": t["process_to_entry"],
            "build_load_s": build_load, "first_step_s": first_step - entered - build_load}


def launch(kind: str, args, root: str, name: str) -> tuple[float, float, float, dict]:
    """(steady tokens/s per device, steady data-wait share, seconds from command start to the
    first logged step, its phases)."""
    common = ["--job.config_file", args.config, "--job.dump_folder", root, "--ray.name", name,
              "--training.steps", str(args.steps), "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
              "--checkpoint.enable", "false", "--ray.num_workers", str(args.workers), "--metrics.progress_bar", "off"]
    if args.gpu:
        common += ["--ray.use_gpu", "true"]
    if kind == "ray":
        cmd = [sys.executable, "-m", "raytitan.train", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.workers),
               "-m", "raytitan.worker", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the same for both (torchrun sets 1 otherwise)
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    records = read_metrics(os.path.join(root, name))
    first = min(r["time"] for r in records if "loss" in r)
    return (steady(records, "tokens_per_sec_per_device", args.warmup), steady(records, "data_wait_share", args.warmup),
            first - started, startup_phases(os.path.join(root, name), started, first))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama3_debug.toml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--threads", type=int, help="intra-op threads per worker (default: cores / workers)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)

    root = tempfile.mkdtemp(prefix="raytitan-overhead-")
    runs = {"ray": [], "torchrun": []}
    for i in range(args.repeats):
        for kind in ("torchrun", "ray") if i % 2 == 0 else ("ray", "torchrun"):  # alternate who goes first
            tps, wait, startup, phases = launch(kind, args, root, f"{kind}-{i}")
            runs[kind].append((tps, wait, startup, phases))
            print(f"repeat {i} {kind:9s} {tps:10.0f} tok/s/device  data wait {wait:6.1%}  start-up {startup:5.1f}s  "
                  + "  ".join(f"{k} {v:.1f}" for k, v in phases.items() if v is not None), flush=True)

    def median_phase(r, key):
        values = [p[key] for *_, p in r if p[key] is not None]
        return statistics.median(values) if values else None

    rows = [{"launcher": kind, "tokens_per_s": statistics.median(t for t, *_ in r),
             "data_wait_share": statistics.median(w for _, w, *_ in r),
             "startup_s": statistics.median(s for _, _, s, _ in r), "repeats": len(r),
             **{key: median_phase(r, key) for key in PHASES},
             "each_tokens_per_s": [round(t, 1) for t, *_ in r],
             "each_startup_s": [round(s, 1) for _, _, s, _ in r]} for kind, r in runs.items()]
    ray_row, torchrun_row = rows
    summary = {"launcher": "ray / torchrun", "tokens_per_s": ray_row["tokens_per_s"] / torchrun_row["tokens_per_s"],
               "startup_s": ray_row["startup_s"] / torchrun_row["startup_s"]}
    print(f"\n{args.config}, {args.workers} workers, {args.steps} steps, medians of {args.repeats}\n")
    print_table(rows + [summary], ["launcher", "tokens_per_s", "data_wait_share", "startup_s", *PHASES, "repeats"])
    record("ray_overhead", vars(args), rows + [summary])


if __name__ == "__main__":
    main()
