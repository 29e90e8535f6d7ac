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

With ``--baseline COMMIT`` a third launcher, ``ray@COMMIT``, runs the same command from a git
worktree of that commit (in the same alternation), so a change to start-up is measured against
the code before it in one run; phases its records lack are left empty.

    python benchmarks/ray_overhead.py [--workers 2] [--steps 20] [--repeats 3] [--threads N] [--gpu]
                                      [--baseline COMMIT]
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
    to_entry = t.get("process_to_entry")  # None from a baseline that did not record it
    return {"to_ray_s": launch["ray_ready_at"] - started if launch else None,
            "to_workers_s": entered - to_entry - started if to_entry is not None else None, "worker_entry_s": to_entry,
            "build_load_s": build_load, "first_step_s": first_step - entered - build_load}


def launch(kind: str, args, root: str, name: str) -> tuple[float, float, float, dict]:
    """(steady tokens/s per device, steady data-wait share, seconds from command start to the
    first logged step, its phases)."""
    common = ["--job.config_file", args.config, "--job.dump_folder", root, "--ray.name", name,
              "--training.steps", str(args.steps), "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
              "--checkpoint.enable", "false", "--ray.num_workers", str(args.workers), "--metrics.progress_bar", "off"]
    if args.gpu:
        common += ["--ray.use_gpu", "true"]
    code = args.baseline_tree if kind.startswith("ray@") else REPO
    if kind.startswith("ray"):
        cmd = [sys.executable, "-m", "raytitan.train", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.workers),
               "-m", "raytitan.worker", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the same for both (torchrun sets 1 otherwise)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))  # this code's raytitan
    started = time.time()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=3600)
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
    parser.add_argument("--baseline", help="also run the Ray launcher from this commit (a git worktree of it)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)

    root = tempfile.mkdtemp(prefix="raytitan-overhead-")
    kinds = ["torchrun", "ray"]
    if args.baseline:
        args.baseline_tree = os.path.join(root, "baseline")
        subprocess.run(["git", "worktree", "add", "--detach", args.baseline_tree, args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        kinds.append(f"ray@{args.baseline}")
    try:
        measure(args, root, kinds)
    finally:
        if args.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", args.baseline_tree], cwd=REPO, capture_output=True)


def measure(args, root: str, kinds: list[str]) -> None:
    runs = {kind: [] for kind in kinds}
    for i in range(args.repeats):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:  # alternate who goes first
            tps, wait, startup, phases = launch(kind, args, root, f"{kind.replace('@', '-')}-{i}")
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
    torchrun_row = rows[0]
    ratios = [{"launcher": f"{row['launcher']} / torchrun", "tokens_per_s": row["tokens_per_s"] / torchrun_row["tokens_per_s"],
               "startup_s": row["startup_s"] / torchrun_row["startup_s"]} for row in rows[1:]]
    print(f"\n{args.config}, {args.workers} workers, {args.steps} steps, medians of {args.repeats}\n")
    print_table(rows + ratios, ["launcher", "tokens_per_s", "data_wait_share", "startup_s", *PHASES, "repeats"])
    record("ray_overhead", {k: v for k, v in vars(args).items() if k != "baseline_tree"}, rows + ratios)


if __name__ == "__main__":
    main()
