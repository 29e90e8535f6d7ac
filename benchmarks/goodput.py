"""Expected goodput at scale, disk checkpoints only vs memory snapshots, from measured parts.

Goodput is the share of wall time that trains steps kept in the end. A run loses time three ways:
  1. saving: the stall of each disk save (every --disk-interval steps), and the training-rate cost
     of memory snapshots (measured by benchmarks/recovery.py as a ratio to a run without them);
  2. restarting: kill to first completed step after each failure (benchmarks/recovery.py);
  3. redoing: the steps since the newest state that survived the failure; on average half a
     disk interval with disk checkpoints only; with memory snapshots half a memory interval, plus
     half a step on average for the snapshot still being written when the failure came (at most
     one step with a snapshot every step).

With failures arriving at random at a mean time to failure (MTTF) much longer than the time each
costs, the expected goodput is (1 - saving share) x (1 - (restart + redo) / MTTF). Published
failure rates: Llama 3 405B training on 16,384 H100s had 419 unplanned interruptions in 54 days
(arXiv 2407.21783); the MTTF scaled by cluster size is about 7.9 h at 1,024 GPUs and 1.8 h at
16,384 (arXiv 2410.21680). Assumed: each failure takes one node (its replica on another node
survives), and a restart at scale takes --restart-scale-s longer than the CPU drill measured
(rescheduling, image pull, NCCL initialization: the same for both modes).

    python benchmarks/goodput.py [--step-s 10] [--disk-interval 500] [--memory-interval 1]

The measured parts default to the newest benchmarks/results/recovery.jsonl line; every one can be
given instead (--disk-stall-s, --snapshot-rate, --restart-disk-s, --restart-memory-s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, print_table, record  # noqa: E402

MTTF_HOURS = {1024: 7.9, 16384: 1.8}  # arXiv 2410.21680


def measured() -> dict:
    """The parts benchmarks/recovery.py measured last, from its newest line with a recovery run
    (``--no-recovery`` lines have the rate only); empty if it never ran here."""
    path = os.path.join(RESULTS_DIR, "recovery.jsonl")
    if not os.path.exists(path):
        return {}
    for line in reversed(open(path).read().splitlines()):
        rows = json.loads(line)["results"]
        if rows and "kill -> first step s" in rows[0]:
            disk, memory = rows[0], rows[1]
            return {"restart_disk_s": disk["kill -> first step s"], "restart_memory_s": memory["kill -> first step s"],
                    # Above 1 is the noise of a busy machine (snapshots never speed training up): 1.
                    "snapshot_rate": min(1.0, memory["rate vs disk only"])}
    return {}


def goodput(mttf_s: float, step_s: float, save_share: float, restart_s: float, redo_steps: float) -> float:
    return (1 - save_share) * max(0.0, 1 - (restart_s + redo_steps * step_s) / mttf_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds per training step")
    parser.add_argument("--disk-interval", type=int, default=500, help="steps between disk checkpoints")
    parser.add_argument("--disk-stall-s", type=float, default=5.0,
                        help="training stall per disk save (async: the staging copy)")
    parser.add_argument("--memory-interval", type=int, default=1, help="steps between memory snapshots")
    parser.add_argument("--snapshot-rate", type=float, default=None,
                        help="training rate with memory snapshots, as a ratio to without (recovery.py)")
    parser.add_argument("--restart-disk-s", type=float, default=None, help="kill to first step, disk only")
    parser.add_argument("--restart-memory-s", type=float, default=None, help="kill to first step, memory")
    parser.add_argument("--restart-scale-s", type=float, default=300.0,
                        help="added to both restart times at scale (rescheduling, image pull, NCCL init)")
    args = parser.parse_args()
    found = measured()
    for key in ("snapshot_rate", "restart_disk_s", "restart_memory_s"):
        if getattr(args, key) is None:
            if key not in found:
                parser.error(f"--{key.replace('_', '-')} is needed: benchmarks/recovery.py has not recorded it here")
            setattr(args, key, found[key])

    disk_save_share = args.disk_stall_s / (args.disk_interval * args.step_s)
    modes = {
        "disk only": (disk_save_share, args.restart_disk_s, args.disk_interval / 2),
        f"memory every {args.memory_interval} + disk": (
            1 - (1 - disk_save_share) * args.snapshot_rate, args.restart_memory_s, args.memory_interval / 2 + 0.5),
    }
    rows = []
    for gpus, hours in MTTF_HOURS.items():
        for mode, (save_share, restart_s, redo) in modes.items():
            restart = restart_s + args.restart_scale_s
            rows.append({"GPUs": gpus, "MTTF h": hours, "mode": mode, "saving %": 100 * save_share,
                         "restart s": restart, "redo steps": redo,
                         "lost per failure min": (restart + redo * args.step_s) / 60,
                         "goodput %": 100 * goodput(hours * 3600, args.step_s, save_share, restart, redo)})
    # The training-rate cost at which memory snapshots stop paying: equal goodput to disk only.
    for gpus, hours in MTTF_HOURS.items():
        mttf = hours * 3600
        disk_share, disk_restart, disk_redo = modes["disk only"]
        _, memory_restart, memory_redo = modes[f"memory every {args.memory_interval} + disk"]
        kept_disk = 1 - (disk_restart + args.restart_scale_s + disk_redo * args.step_s) / mttf
        kept_memory = 1 - (memory_restart + args.restart_scale_s + memory_redo * args.step_s) / mttf
        rate = (1 - disk_share) * kept_disk / ((1 - disk_share) * kept_memory)
        rows.append({"GPUs": gpus, "MTTF h": hours, "mode": "break-even snapshot rate", "goodput %": 100 * rate})
    print_table(rows, list(rows[0]))
    print("break-even snapshot rate: memory snapshots pay off while training with them runs faster than this "
          "share of the rate without them")
    record("goodput", vars(args), rows)


if __name__ == "__main__":
    main()
