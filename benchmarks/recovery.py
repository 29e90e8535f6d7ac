"""Recovery after a worker dies, disk checkpoints only vs memory snapshots, in one run.

For each mode, runs the debug model through ``raytitan.fit`` on --workers workers with a fault
injected (SIGKILL of one worker at the start of --kill-step), then reads the run's own records:
  faults/*.json      when the worker was killed
  restarts.jsonl     when the new worker group entered the training function, the step it
                     resumed from (and from where: disk or memory), and how long process-group
                     setup, building the model and loading the state took
  metrics.jsonl      when the first step after the restart completed, and its data wait
and prints the breakdown and the steps of work lost (kill step - 1 - resumed step).

Then the overhead of snapshotting every --memory-interval steps, measured so that the machine's
drift cancels: --pairs pairs of runs without a fault, each pair one run with disk checkpoints
only and one with memory snapshots, back to back (which of the two goes first alternates from
pair to pair), --overhead-steps steps each. Per run:
  tokens/s/device   over the steps after the first 5 (the run's own metrics.jsonl)
  CPU-s per step    CPU seconds (user + system) that every process of the run spent per step
                    over the same steps: this process, Ray's (GCS, raylet) and every process
                    they started (training workers, snapshot stores, data feeder and packers),
                    sampled from /proc every 0.25 s. A neighbour's load slows the run but does
                    not add to its CPU seconds, so this column is the steadier one on a shared
                    machine. Also split by part: each worker's busiest thread (the training
                    thread: the steps and the snapshots' copies), the workers' other threads
                    (the snapshots' upload, gloo, Ray's), the snapshot stores, the rest.
Each pair gives one ratio (memory / disk) of each; the medians of the pairs' ratios are reported.

    python benchmarks/recovery.py [--workers 2] [--kill-step 15] [--interval 10] [--memory-interval 1]
                                  [--pairs 4] [--overhead-steps 30] [--no-recovery]
                                  [--health-check-interval S] [--seq-len 256]

Single invocations of the same code differ by a point or two on a shared machine; --pooled COMMIT
runs nothing and prints the medians over every pair recorded in benchmarks/results/recovery.jsonl
by invocations at COMMIT (a prefix; the default configuration's only).
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record  # noqa: E402

import raytitan  # noqa: E402
from raytitan.trainer.elastic.fault import injected_faults  # noqa: E402
from raytitan.trainer.elastic.history import read_starts  # noqa: E402

WARMUP_STEPS = 5  # left out of the training rate: compile-free, but the first steps allocate
SAMPLE_S = 0.25  # how often the CPU seconds of the run's processes are read
TICKS = os.sysconf("SC_CLK_TCK")


def run(args, root: str, memory_interval: int, steps: int, kill_step: int = -1) -> str:
    raytitan.fit(None, job__dump_folder=root, model__flavor=args.flavor, training__steps=steps,
                 training__seq_len=args.seq_len, training__local_batch_size=4, ray__num_workers=args.workers,
                 ray__use_gpu=args.gpu, ray__max_failures=1, checkpoint__interval=args.interval,
                 checkpoint__memory_interval=memory_interval, metrics__log_freq=1,
                 metrics__enable_tensorboard=False, fault__kill_step=kill_step, fault__kill_rank=args.kill_rank,
                 **({"ray__health_check_interval_s": args.health_check_interval} if args.health_check_interval else {}))
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


def snapshot_stall(run_dir: str) -> float | None:
    """Median seconds a snapshot held rank 0's training thread, over the steps after the warm-up
    (``checkpoint/snapshot_stall_s``: the newest snapshot's at each logged step), or None."""
    stalls = [m["checkpoint/snapshot_stall_s"] for m in raytitan.read_metrics(run_dir)
              if m.get("step", 0) > WARMUP_STEPS and "checkpoint/snapshot_stall_s" in m]
    return statistics.median(stalls) if stalls else None


def training_rate(run_dir: str) -> float:
    """Tokens/s per device over the steps after the warm-up (each logged step is its own window)."""
    lines = [m for m in raytitan.read_metrics(run_dir) if "loss" in m and m["step"] > WARMUP_STEPS]
    seconds = sum(m["window_s"] for m in lines)
    return sum(m["tokens_per_sec_per_device"] * m["window_s"] for m in lines) / seconds


class ProcessCPU:
    """CPU seconds of this process and all its descendants (Ray's processes and the workers they
    start), read from /proc every ``SAMPLE_S`` on a thread: a list of (time, {pid: seconds})."""

    def __init__(self):
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recovery-cpu-sampler", daemon=True)

    def __enter__(self) -> "ProcessCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.samples.append((time.time(), self.read()))
            if self._stop.wait(SAMPLE_S):
                self.samples.append((time.time(), self.read()))
                return

    @staticmethod
    def read() -> dict[tuple[str, int, int], float]:
        """CPU seconds of each of this process's descendants, keyed (part, pid, tid): the training
        workers thread by thread (part "worker"), the snapshot stores ("store") and every other
        process ("rest") whole (tid 0)."""
        parent: dict[int, int] = {}
        seconds: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone since the listing
                continue
            pid = int(name)
            parent[pid] = int(fields[1])  # fields after the name: state, ppid, ...; utime and stime are 12, 13
            seconds[pid] = (int(fields[11]) + int(fields[12])) / TICKS
        ours, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in ours:
                    ours.add(child)
                    frontier.append(child)
        found: dict[tuple[str, int, int], float] = {}
        for pid in ours & seconds.keys():
            part = _part_of(pid)
            threads = _thread_seconds(pid) if part == "worker" else {}
            if threads:
                found.update({("worker", pid, tid): cpu for tid, cpu in threads.items()})
            else:
                found[(part, pid, 0)] = seconds[pid]
        return found

    def per_step(self, run_dir: str) -> dict[str, float]:
        """CPU seconds per training step after the warm-up: the CPU spent between the first sample
        after the warm-up's last step and the last sample before the run's last step, over the
        steps completed in between (interpolated from the steps' completion times). In all
        ("total") and by part: each worker's busiest thread ("training threads": the one that
        runs the steps and takes the snapshots' copies), the workers' other threads (the
        snapshots' upload, gloo, Ray's), the snapshot stores, and everything else."""
        lines = sorted((m["time"], m["step"]) for m in raytitan.read_metrics(run_dir) if "loss" in m)
        start = next(t for t, step in lines if step == WARMUP_STEPS)
        end = lines[-1][0]
        inside = [(t, cpu) for t, cpu in self.samples if start <= t <= end]
        if len(inside) < 2:
            raise RuntimeError(f"{run_dir}: fewer than 2 CPU samples between step {WARMUP_STEPS} and the last step")
        (t0, a), (t1, b) = inside[0], inside[-1]
        spent = {key: cpu - a.get(key, 0.0) for key, cpu in b.items()}  # started in between: all of it
        times, steps = [t for t, _ in lines], [step for _, step in lines]

        def step_at(t: float) -> float:
            i = max(1, min(bisect.bisect_left(times, t), len(times) - 1))
            return steps[i - 1] + (steps[i] - steps[i - 1]) * (t - times[i - 1]) / max(times[i] - times[i - 1], 1e-9)

        n = step_at(t1) - step_at(t0)
        busiest: dict[int, float] = {}
        for (part, pid, _), cpu in spent.items():
            if part == "worker":
                busiest[pid] = max(busiest.get(pid, 0.0), cpu)
        by_part = {part: sum(cpu for (p, _, _), cpu in spent.items() if p == part) for part in ("worker", "store", "rest")}
        return {"total": sum(spent.values()) / n, "training threads": sum(busiest.values()) / n,
                "workers' other threads": (by_part["worker"] - sum(busiest.values())) / n,
                "snapshot stores": by_part["store"] / n, "rest": by_part["rest"] / n}


def _part_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(64)
    except OSError:
        return "rest"
    if command.startswith(b"ray::RayTrainWorker"):
        return "worker"
    return "store" if command.startswith(b"ray::SnapshotStore") else "rest"


def _thread_seconds(pid: int) -> dict[int, float]:
    found = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return found


def overhead(args, modes: dict[str, int]) -> dict[str, dict]:
    """--pairs pairs of fault-free runs, one per mode each, back to back, the order alternating;
    per mode: every run's rate and CPU-s per step, and the pairs' ratios to disk only."""
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for pair in range(args.pairs):
        order = list(modes.items()) if pair % 2 == 0 else list(reversed(modes.items()))
        for mode, memory_interval in order:
            with ProcessCPU() as cpu:
                run_dir = run(args, tempfile.mkdtemp(prefix="raytitan-rate-"), memory_interval, args.overhead_steps)
            parts = cpu.per_step(run_dir)
            runs[mode].append({"rate": training_rate(run_dir), "cpu": parts.pop("total"), "parts": parts,
                               "stall": snapshot_stall(run_dir)})
            shutil.rmtree(os.path.dirname(run_dir), ignore_errors=True)  # its disk checkpoints: 0.2 GB a run
            print(f"pair {pair + 1}/{args.pairs}, {mode}: {runs[mode][-1]['rate']:.0f} tok/s/device, "
                  f"{runs[mode][-1]['cpu']:.3f} CPU-s per step", flush=True)
    disk = runs["disk only"]
    summary = {}
    for mode, values in runs.items():
        rate_ratios = [v["rate"] / d["rate"] for v, d in zip(values, disk)]
        cpu_ratios = [v["cpu"] / d["cpu"] for v, d in zip(values, disk)]
        summary[mode] = {
            "tokens/s/device": statistics.median(v["rate"] for v in values),
            "rate vs disk only": statistics.median(rate_ratios),  # median of the pairs' ratios
            "CPU-s per step": statistics.median(v["cpu"] for v in values),
            "CPU-s per step vs disk only": statistics.median(cpu_ratios),
            "rate runs": [round(v["rate"]) for v in values],  # the spread behind the medians
            "rate pair ratios": [round(r, 3) for r in rate_ratios],
            "CPU-s per step runs": [round(v["cpu"], 3) for v in values],
            "CPU pair ratios": [round(r, 3) for r in cpu_ratios],
            # Where the CPU went (see ProcessCPU.per_step): medians, and each pair's difference to disk only.
            "CPU-s per step by part": {k: round(statistics.median(v["parts"][k] for v in values), 4)
                                       for k in values[0]["parts"]},
            "CPU-s per step by part minus disk only, per pair": {
                k: [round(v["parts"][k] - d["parts"][k], 4) for v, d in zip(values, disk)] for k in values[0]["parts"]},
        }
        if values[0]["stall"] is not None:  # rank 0's training thread, per snapshot (median of each run)
            summary[mode]["stall per snapshot s"] = statistics.median(v["stall"] for v in values)
            summary[mode]["stall runs"] = [round(v["stall"], 4) for v in values]
    return summary


def pooled(commit: str) -> None:
    """Medians over every recorded pair of the invocations at ``commit`` (default model and batch)."""
    import json

    from common import RESULTS_DIR

    rates, cpus, parts, invocations = [], [], {}, 0
    for line in open(os.path.join(RESULTS_DIR, "recovery.jsonl")):
        entry = json.loads(line)
        config = entry["config"]
        if not entry["commit"].startswith(commit) or (config["flavor"], config["seq_len"]) != ("debugmodel", 256):
            continue
        memory = [r for r in entry["results"] if "rate pair ratios" in r and r["mode"] != "disk only"]
        if memory:
            invocations += 1
            rates += memory[0]["rate pair ratios"]
            cpus += memory[0]["CPU pair ratios"]
            for part, values in memory[0].get("CPU-s per step by part minus disk only, per pair", {}).items():
                parts.setdefault(part, []).extend(values)
    if not rates:
        raise SystemExit(f"no overhead pairs recorded at {commit}")
    print(f"{len(rates)} pairs from {invocations} invocations at {commit}: tokens/s memory / disk only "
          f"{statistics.median(rates):.3f}, CPU-s per step {statistics.median(cpus):.3f}")
    for part, values in parts.items():
        print(f"  {part}: {statistics.median(values) * 1e3:+.1f} ms per step (median of the pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-step", type=int, default=15)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--interval", type=int, default=10, help="disk checkpoint interval")
    parser.add_argument("--memory-interval", type=int, default=1, help="memory snapshot interval")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--overhead-steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=4, help="pairs of runs (disk only, memory) for the overhead")
    parser.add_argument("--no-recovery", action="store_true", help="measure the overhead only (no fault runs)")
    parser.add_argument("--health-check-interval", type=float, default=None,
                        help="ray.health_check_interval_s for every run (default: the config's, Ray Train's 2.0)")
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--pooled", metavar="COMMIT", help="run nothing: medians over the recorded pairs at COMMIT")
    args = parser.parse_args()
    if args.pooled:
        return pooled(args.pooled)
    if args.overhead_steps <= WARMUP_STEPS + 2:
        parser.error(f"--overhead-steps must be above {WARMUP_STEPS + 2}: the first {WARMUP_STEPS} are not measured")

    modes = {"disk only": 0, f"memory every {args.memory_interval}": args.memory_interval}
    rows = [{"mode": mode} for mode in modes]
    if not args.no_recovery:
        for row, memory_interval in zip(rows, modes.values()):
            run_dir = run(args, tempfile.mkdtemp(prefix="raytitan-recovery-"), memory_interval, args.steps, args.kill_step)
            row.update(recovery(run_dir))
            shutil.rmtree(os.path.dirname(run_dir), ignore_errors=True)
    if args.pairs > 0:  # --pairs 0: the recovery runs only
        measured = overhead(args, modes)
        for row in rows:
            row.update(measured[row["mode"]])
    columns = list(dict.fromkeys(c for row in rows for c in row
                                 if not c.endswith(("runs", "ratios")) and "by part" not in c))
    print_table(rows, columns)
    for row in rows:
        if "CPU-s per step by part" in row:
            print(f"{row['mode']}: CPU-s per step by part {row['CPU-s per step by part']}; minus disk only, per pair "
                  f"{row['CPU-s per step by part minus disk only, per pair']}")
    record("recovery", vars(args), rows)


if __name__ == "__main__":
    main()
