"""One GPU: Llama 3.2 1B and 3B shapes with torch.compile, Float8 and each activation
checkpointing mode on and off, at sequence lengths 2048 and 8192. Tokens/s, TFLOPs, MFU and
peak memory per variant, each in a fresh process through the per-worker entry point.

What runs is one rank, so no FSDP wrapper: parameters, gradients and AdamW state stay float32
(16 bytes per parameter) and the forward and backward compute in bf16 under torch.autocast
(training.mixed_precision_param = bfloat16). Float8 (tensorwise, output head left in bf16)
casts the linears' inputs and weights to float8 inside that. The 3B model at seq 8192 without
checkpointing may not fit 80 GiB: such a variant becomes an "out of memory" row.

    python benchmarks/gpu.py                     # the whole grid: 2 flavors x 2 lengths x 7 variants
    python benchmarks/gpu.py --quick             # 1B, seq 2048, fewer steps: a few minutes
    python benchmarks/gpu.py --flavors 1B --seq-lens 8192 --features bf16 compile float8+compile
    python benchmarks/gpu.py --dry-run           # print the plan, run nothing (no GPU needed)
    python benchmarks/gpu.py --cpu --flavors debugmodel --seq-lens 256 --features bf16   # check the script on CPU
    python benchmarks/gpu.py --model qwen3_moe --flavors debugmodel --seq-lens 2048   # an MoE family (not yet run)

--model picks the family (default llama3; --flavors then names that family's flavors). On one
GPU only small MoE shapes fit: the published ones (Qwen3 30B-A3B, DeepSeek-V3 16B and up) need
their parameters, gradients and AdamW state spread over many GPUs, which this one-rank script
does not do; benchmarks/moe.py measures MoE over ranks with expert parallel.

Each finished variant is printed and appended at once to benchmarks/results/gpu_rows.jsonl
(tagged with the sweep's id); the whole sweep is one line of benchmarks/results/gpu.jsonl at
the end, written also when it is interrupted. A GPU missing from raytitan's peak table gets no
MFU unless --peak-tflops gives its dense bf16 peak. docs/performance.md records the runs made.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, append_json, print_table, record, run_worker, steady  # noqa: E402

from raytitan.models import MODELS, get_spec  # noqa: E402

COMPILE = {"compile.enable": "true"}
FLOAT8 = {"model.converters": ["float8"]}


def features(ac_every: int) -> dict[str, dict]:
    """Variant name -> overrides. Checkpointing is measured with compile on, as it would be used."""
    def ac(mode: str, option: str = "op") -> dict:
        return {**COMPILE, "activation_checkpoint.mode": mode, "activation_checkpoint.selective_ac_option": option}

    return {
        "bf16": {},
        "compile": dict(COMPILE),
        "float8": dict(FLOAT8),
        "float8+compile": {**FLOAT8, **COMPILE},
        "compile+ac_op": ac("selective", "op"),
        f"compile+ac_every{ac_every}": ac("selective", str(ac_every)),
        "compile+ac_full": {**COMPILE, "activation_checkpoint.mode": "full"},
    }


COLUMNS = ["flavor", "seq_len", "feature", "tokens_per_s", "tflops", "mfu_pct", "max_active_gib",
           "max_reserved_gib", "wall_s", "error"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3", choices=MODELS, help="model family (model.name)")
    parser.add_argument("--flavors", nargs="+", default=["1B", "3B"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--features", nargs="+", help="variants to run (default: all; see --dry-run for names)")
    parser.add_argument("--ac-every", type=int, default=2, help="N of the selective every-Nth-block variant")
    parser.add_argument("--local-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (compilation)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="dense bf16 peak TFLOP/s per GPU for MFU (default: raytitan's table)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one variant may take")
    parser.add_argument("--quick", action="store_true", help="1B at seq 2048 only, 8 steps (3 warm-up)")
    parser.add_argument("--dry-run", action="store_true", help="print the variants and their overrides, run nothing")
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU (Float8 emulated) to check the script itself; the numbers mean nothing")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.flavors, args.seq_lens, args.steps, args.warmup = ["1B"], [2048], 8, 3
    if args.ac_every < 1:
        parser.error("--ac-every must be >= 1")
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    flavors = get_spec(args.model).flavors
    missing = [f for f in args.flavors if f not in flavors]
    if missing:
        parser.error(f"{args.model} has no flavor {', '.join(missing)}; choose from {', '.join(flavors)}")
    known = features(args.ac_every)
    unknown = [f for f in args.features or [] if f not in known]
    if unknown:
        parser.error(f"unknown --features {', '.join(unknown)}; choose from {', '.join(known)}")
    return args


def base_overrides(args: argparse.Namespace) -> dict:
    """Keys every variant shares."""
    base = {"model.name": args.model, "training.local_batch_size": args.local_batch, "training.steps": args.steps,
            "lr_scheduler.warmup_steps": 2, "metrics.peak_tflops": args.peak_tflops,
            "ray.use_gpu": "false" if args.cpu else "true", "training.mixed_precision_param": "bfloat16"}
    if args.cpu:
        base["quantize.linear.float8.emulate"] = "true"
    return base


def published_vocab(model: str, flavor: str) -> int | None:
    flavors = get_spec(model).flavors
    return flavors[flavor].vocab_size if flavor in flavors else None


def vocab_tokenizer(folder: str, size: int) -> str:
    """A tokenizer.json of ``size`` entries. The model's vocabulary is the tokenizer's, so the byte
    tokenizer would give 1B / 3B a 259-row embedding and head instead of the published 128,256:
    this one has the published size, reads the text one character per id as the byte tokenizer
    does (first 256 code points), and leaves the rest of its entries unused."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<unk>": 2}
    vocab.update({chr(i): len(vocab) + i for i in range(256)})
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
    return folder


def plan(args: argparse.Namespace, tokenizers: dict[int, str] | None = None) -> list[tuple[str, str, int, str, dict]]:
    """(run name, flavor, seq_len, feature, overrides) for every variant of the sweep; a flavor
    with a published vocabulary trains with ``tokenizers[that size]`` (a folder)."""
    base = base_overrides(args)
    chosen = {name: o for name, o in features(args.ac_every).items() if not args.features or name in args.features}
    runs = []
    for flavor, seq_len, (feature, overrides) in itertools.product(args.flavors, args.seq_lens, chosen.items()):
        name = f"{flavor}-{seq_len}-{feature}".replace("+", "_and_")
        vocab = published_vocab(args.model, flavor)
        tokenizer = {"model.hf_assets_path": (tokenizers or {}).get(vocab, f"<a {vocab}-entry tokenizer>")} \
            if vocab else {}
        runs.append((name, flavor, seq_len, feature,
                     {**base, "model.flavor": flavor, "training.seq_len": seq_len, **tokenizer, **overrides}))
    return runs


def measure(name: str, overrides: dict, root: str, args: argparse.Namespace) -> dict:
    """One variant's numbers, or its error: a failing variant never ends the sweep."""
    t0 = time.perf_counter()
    try:
        records = run_worker(overrides, root, name, timeout=args.timeout)
        row = {"tokens_per_s": steady(records, "tokens_per_sec_per_device", args.warmup),
               "tflops": steady(records, "tflops_per_device", args.warmup),
               # Absent when the GPU is not in the peak table and no --peak-tflops was given.
               "mfu_pct": steady(records, "mfu_pct", args.warmup) if any("mfu_pct" in r for r in records) else None,
               "max_active_gib": max(r.get("memory/max_active_gib", 0.0) for r in records),
               "max_reserved_gib": max(r.get("memory/max_reserved_gib", 0.0) for r in records)}
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {args.timeout} s"}
    except Exception as e:  # noqa: BLE001 - out of memory, compile failures, bad settings alike
        text = str(e)
        lines = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in text.splitlines() if line.strip()]
        row = {"error": "out of memory" if "out of memory" in text.lower() else (lines[-1] if lines else repr(e))[:120]}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def command_line(overrides: dict) -> str:
    return " ".join(f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in overrides.items())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        base = base_overrides(args)
        print(f"every variant: {command_line(base)}")
        for name, *_, overrides in runs:
            print(f"  {name:<32} {command_line({k: v for k, v in overrides.items() if k not in base})}")
        print(f"{len(runs)} variants, {args.steps} steps each, medians over steps {args.warmup + 1}-{args.steps}")
        return

    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (--dry-run prints the plan without one)")
    sweep = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    root = tempfile.mkdtemp(prefix="raytitan-gpu-")
    vocabs = {published_vocab(args.model, flavor) for flavor in args.flavors} - {None}
    runs = plan(args, {v: vocab_tokenizer(os.path.join(root, f"tokenizer-{v}"), v) for v in vocabs})
    rows_path = os.path.join(args.results_dir, "gpu_rows.jsonl")
    rows = []
    try:
        for i, (name, flavor, seq_len, feature, overrides) in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] running {name} ...", flush=True)
            row = {"flavor": flavor, "seq_len": seq_len, "feature": feature,
                   **measure(name, overrides, root, args)}
            rows.append(row)
            append_json(rows_path, {"sweep": sweep, **row})
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in row.items() if k not in ("flavor", "seq_len", "feature")), flush=True)
    finally:
        if rows:
            print(f"\n{len(rows)} of {len(runs)} variants, local batch {args.local_batch}, medians after step "
                  f"{args.warmup}\n")
            print_table(rows, COLUMNS)
            record("gpu", {**vars(args), "sweep": sweep, "complete": len(rows) == len(runs),
                           "variants": {name: overrides for name, *_, overrides in runs}}, rows,
                   results_dir=args.results_dir)


if __name__ == "__main__":
    main()
