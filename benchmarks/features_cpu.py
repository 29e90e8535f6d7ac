"""Speed features on CPU, as ratios to eager in one run: torch.compile, each activation
checkpointing mode, Float8 (emulated) and bf16 parameters.

Each variant trains the debug model in a fresh process through the per-worker entry point
(one process, no Ray) for --steps steps; tokens/s is the median over the steps after
--warmup (compilation happens there), memory the process's peak RSS.

    python benchmarks/features_cpu.py [--steps 12] [--warmup 4] [--seq-len 256] [--local-batch 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record, run_worker, steady  # noqa: E402

VARIANTS = {
    "eager": {},
    "compile": {"compile.enable": "true"},
    "ac full": {"activation_checkpoint.mode": "full"},
    "ac selective op": {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "op"},
    "ac selective 2": {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "2"},
    "float8 emulated": {"model.converters": ["float8"], "quantize.linear.float8.emulate": "true"},
    "compile + float8 emulated": {"compile.enable": "true", "model.converters": ["float8"],
                                  "quantize.linear.float8.emulate": "true"},
    "bf16 params": {"training.mixed_precision_param": "bfloat16"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--local-batch", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()

    base = {"model.flavor": args.flavor, "training.steps": args.steps, "training.seq_len": args.seq_len,
            "training.local_batch_size": args.local_batch, "lr_scheduler.warmup_steps": 2}
    root = tempfile.mkdtemp(prefix="raytitan-features-")
    chosen = {name: {**base, **overrides} for name, overrides in VARIANTS.items() if not args.only or name in args.only}
    rows = []
    for name, overrides in chosen.items():
        print(f"running {name} ...", flush=True)
        records = run_worker(overrides, root, name.replace(" ", "_").replace("+", "and"))
        losses = [r["loss"] for r in records if "loss" in r]
        rows.append({"variant": name, "tokens_per_s": steady(records, "tokens_per_sec_per_device", args.warmup),
                     "peak_rss_gib": max(r.get("memory/max_rss_gib", 0.0) for r in records),
                     "first_loss": losses[0], "last_loss": losses[-1]})
    eager = next((r for r in rows if r["variant"] == "eager"), rows[0])
    for r in rows:
        r["speed_vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"]
        r["rss_vs_eager"] = r["peak_rss_gib"] / eager["peak_rss_gib"]
    print(f"\n{args.flavor}, seq {args.seq_len}, batch {args.local_batch}, one process, medians after step {args.warmup}\n")
    print_table(rows, ["variant", "tokens_per_s", "speed_vs_eager", "peak_rss_gib", "rss_vs_eager", "first_loss",
                       "last_loss"])
    record("features_cpu", {**vars(args), "variants": chosen}, rows)


if __name__ == "__main__":
    main()
