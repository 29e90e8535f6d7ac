"""What handing one snapshot part to its node's store costs the writing process: a new object in
Ray's object store per part (the path for holders on other nodes, and for every holder before
slots) against the part packed into one of the rank's slots (shared memory the store maps too).

Both go through the real store actor and ``SnapshotFileSystem.write_part`` on one local Ray
instance, a part of ``--mb`` MB at a time, the store keeping at most three of a rank's parts as
in a run. Reported per part: this process's CPU (all its threads: the copy, Ray's serializer and
its copy threads, the call), its minor page faults, and the whole machine's CPU (the store, the
raylet), from one run alternating blocks of each mode. The baseline is the object store.

    python benchmarks/snapshot_put.py [--mb 37] [--parts 40] [--blocks 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402

from raytitan.ray.snapshots import SnapshotFileSystem, SnapshotStore, store_name  # noqa: E402

LAUNCH = "snapshot-put"


def machine_cpu_s() -> float:
    """CPU seconds the whole machine spent (not idle, not waiting on I/O), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = list(map(int, f.readline().split()[1:]))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_usage() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def block(fs: SnapshotFileSystem, mode: str, part: np.ndarray, parts: int, first_step: int, slots) -> dict:
    """``parts`` parts written one after another; per-part costs."""
    cpu0, faults0 = own_usage()
    machine0, wall0 = machine_cpu_s(), time.perf_counter()
    for step in range(first_step, first_step + parts):
        path = f"{LAUNCH}/snapshots/step-{step}/__0-L.raw"
        if mode == "slot":
            index = slots.take()
            slots.view(index)[:] = part  # what the training thread's pack does
            fs.write_part(path, slots.view(index), b"tail", f"{LAUNCH}/snapshots", "L", step, (slots, index))
        else:
            body = np.empty_like(part)
            body[:] = part  # the pack into the rank's own buffer
            fs.write_part(path, body, b"tail", f"{LAUNCH}/snapshots", "L", step)
    cpu1, faults1 = own_usage()
    return {"mode": mode, "CPU ms per part": (cpu1 - cpu0) / parts * 1e3,
            "minor faults per part": (faults1 - faults0) / parts,
            "machine CPU ms per part": (machine_cpu_s() - machine0) / parts * 1e3,
            "wall ms per part": (time.perf_counter() - wall0) / parts * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=37.0, help="part size (the debug model's rank part: 37 MB)")
    parser.add_argument("--parts", type=int, default=40, help="parts per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per mode, alternating")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    node = ray.get_runtime_context().get_node_id()
    store = ray.remote(SnapshotStore).options(name=store_name(LAUNCH, node), num_cpus=0, max_concurrency=16).remote()
    fs = SnapshotFileSystem(LAUNCH, replicas=0, node_id=node)
    part = np.random.default_rng(0).integers(0, 255, int(args.mb * 1e6), dtype=np.uint8)
    slots = fs.slots(f"{LAUNCH}#0", part.size)
    if slots is None:
        raise SystemExit("no slots on this node (see the warning): nothing to compare")
    step, runs = 1, []
    for _ in range(args.blocks):
        for mode in ("object store", "slot"):
            block(fs, mode, part, 3, step, slots)  # the store drops the other mode's parts
            step += 3
            runs.append(block(fs, mode, part, args.parts, step, slots))
            step += args.parts
            print(f"{mode}: {runs[-1]['CPU ms per part']:.1f} CPU ms, {runs[-1]['minor faults per part']:.0f} faults per part",
                  flush=True)
    rows = []
    for mode in ("object store", "slot"):
        mine = [r for r in runs if r["mode"] == mode]
        row = {"mode": mode, **{k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "mode"}}
        row["CPU ms per part runs"] = [round(r["CPU ms per part"], 2) for r in mine]
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["machine CPU vs object store"] = row["machine CPU ms per part"] / base["machine CPU ms per part"]
    print_table(rows, ["mode", "CPU ms per part", "minor faults per part", "machine CPU ms per part",
                       "wall ms per part", "machine CPU vs object store"])
    record("snapshot_put", vars(args), rows)
    ray.kill(store)


if __name__ == "__main__":
    main()
