"""One GPU: Llama 3.2 1B and 3B shapes in bf16 (FSDP over one rank), with compile, Float8 and
activation checkpointing on and off, at several sequence lengths. Tokens/s, TFLOPs, MFU and
peak memory per variant, each in a fresh process through the per-worker entry point.

    python benchmarks/gpu.py [--flavors 1B 3B] [--seq-lens 2048 8192] [--steps 20] [--quick]

Results append to benchmarks/results/gpu.jsonl; BENCHMARKS.md records the runs made.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record, run_worker, steady  # noqa: E402

FEATURES = {
    "bf16": {},
    "bf16 + compile": {"compile.enable": "true"},
    "float8 + compile": {"compile.enable": "true", "model.converters": ["float8"]},
    "bf16 + compile + ac selective op": {"compile.enable": "true", "activation_checkpoint.mode": "selective"},
    "bf16 + compile + ac full": {"compile.enable": "true", "activation_checkpoint.mode": "full"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", nargs="+", default=["1B", "3B"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--local-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--features", nargs="*", help="feature rows to run (default: all)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    root = tempfile.mkdtemp(prefix="raytitan-gpu-")
    rows = []
    for flavor, seq_len, (feature, overrides) in itertools.product(args.flavors, args.seq_lens, FEATURES.items()):
        if args.features and feature not in args.features:
            continue
        name = f"{flavor}-{seq_len}-{feature}".replace(" ", "_").replace("+", "and")
        base = {"model.flavor": flavor, "training.seq_len": seq_len, "training.local_batch_size": args.local_batch,
                "training.steps": args.steps, "ray.use_gpu": "true", "training.mixed_precision_param": "bfloat16",
                "lr_scheduler.warmup_steps": 2}
        print(f"running {name} ...", flush=True)
        try:
            records = run_worker({**base, **overrides}, root, name)
        except RuntimeError as e:
            reason = "out of memory" if "out of memory" in str(e).lower() else str(e).splitlines()[-1][:80]
            rows.append({"flavor": flavor, "seq_len": seq_len, "feature": feature, "error": reason})
            continue
        rows.append({
            "flavor": flavor, "seq_len": seq_len, "feature": feature,
            "tokens_per_s": steady(records, "tokens_per_sec_per_device", args.warmup),
            "tflops": steady(records, "tflops_per_device", args.warmup),
            "mfu_pct": steady(records, "mfu_pct", args.warmup),
            "max_active_gib": max(r.get("memory/max_active_gib", 0.0) for r in records),
            "max_reserved_gib": max(r.get("memory/max_reserved_gib", 0.0) for r in records),
        })
    print(f"\n{torch.cuda.get_device_name(0)}, local batch {args.local_batch}, medians after step {args.warmup}\n")
    print_table(rows, ["flavor", "seq_len", "feature", "tokens_per_s", "tflops", "mfu_pct", "max_active_gib",
                       "max_reserved_gib", "error"])
    record("gpu", vars(args), rows)


if __name__ == "__main__":
    main()
