"""Data pipeline speed against what training consumes.

Measures, in one run on this machine:
  1. tokens/s of the packing pipeline alone, in-process and through Ray Data, for the byte
     tokenizer and a BPE tokenizer (a tokenizer.json given with --tokenizer, or one trained
     here on the corpus);
  2. tokens/s the debug model consumes when training (one process, same seq_len);
  3. through ``raytitan.fit`` on --workers CPU workers: the share of step time spent waiting
     for data, at the first step (pipeline start-up) and in steady state.

    python benchmarks/data_throughput.py [--batches 1500] [--steps 30] [--tokenizer DIR]

With --scaling, instead: tokens/s of the Ray packing pool alone with 1 and then 2 packers, each
one single-threaded process (one CPU), in one run; the rate per CPU and the CPUs a pipeline needs
for --target tokens/s (3M: 512 GPUs at about 5.8k tokens/s each).

    python benchmarks/data_throughput.py --scaling [--packers 1 2] [--scaling-batches 200]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import types
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, record  # noqa: E402

from raytitan.config.job import Model  # noqa: E402
from raytitan.components.data.stream import Cursor, global_batches, local_rows  # noqa: E402
from raytitan.components.data.synthetic import ensure_synthetic_shards  # noqa: E402
from raytitan.components.data.tokenizer import build_tokenizer  # noqa: E402


def train_bpe(shards: list[str], folder: str) -> str:
    """A 4k-vocab byte-level BPE tokenizer.json trained on the first shard, for a realistic encode cost."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from raytitan.components.data.stream import ShardStats, read_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for chunk in read_texts(shards[0], ShardStats()) for t in chunk), trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
    return folder


def pipeline_tokens_per_s(rows, batches: int, global_batch: int, seq_len: int) -> float:
    stream = global_batches(rows, global_batch, Cursor())
    next(stream)  # start-up (Ray Data planning, actor pool) is not steady-state throughput
    t0 = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    return batches * global_batch * seq_len / (time.perf_counter() - t0)


def training_tokens_per_s(seq_len: int, batch: int, steps: int) -> float:
    """The debug model's training step on one process, fp32, as the workers run it."""
    import torch

    from raytitan.models.llama3.args import FLAVORS
    from raytitan.models.llama3.model import Transformer
    from raytitan.trainer.runner import ModelRunner
    from raytitan.trainer.loop import Schedule, Trainer

    import dataclasses

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(FLAVORS["debugmodel"], vocab_size=259, max_seq_len=seq_len))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    no_saves = types.SimpleNamespace(wait_for_staging=lambda: None)  # the step waits for async saves; none here
    trainer = Trainer(ModelRunner([model]), opt, sched, None, no_saves, None, None, device=torch.device("cpu"),
                      local_batch_size=batch, schedule=Schedule(steps, 1, 1, False, 0), max_norm=1.0, loss_group=None)
    tokens = torch.randint(0, 259, (batch, seq_len + 1))
    trainer.train_step(tokens)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(tokens)
    return steps * batch * seq_len / (time.perf_counter() - t0)


def scaling(args) -> None:
    """Tokenization throughput against the CPUs given to it: pools of ``--packers`` single-threaded
    packers (tokenizers' own thread pool off), one Ray instance, byte and BPE tokenizers."""
    import math

    import ray

    from raytitan.ray.data_feed import ray_rows

    work = tempfile.mkdtemp(prefix="raytitan-bench-")
    shards = ensure_synthetic_shards(os.path.join(work, "c4"), seed=0, num_shards=16, docs_per_shard=1000)
    bpe = args.tokenizer or train_bpe(shards, work)
    one_thread = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(args.packers),
             runtime_env={"env_vars": one_thread})
    rows = []
    try:
        for name, model_config in {"byte": Model(), "bpe": Model(tokenizer="hf", hf_assets_path=bpe)}.items():
            rates = {}
            for n in args.packers:
                stream = ray_rows(shards, model_config, args.seq_len, 0, Cursor(), packers=n,
                                  read_ahead_rows=4 * args.scaling_batch)
                rates[n] = pipeline_tokens_per_s(stream, args.scaling_batches, args.scaling_batch, args.seq_len)
                stream.close()
                per_cpu = rates[n] / n
                rows.append({"measure": f"{name}: {n} packer(s), 1 CPU each", "cpus": n, "tokens_per_s": rates[n],
                             "tokens_per_s_per_cpu": per_cpu,
                             "cpus_for_target": math.ceil(args.target / per_cpu)})
            lo, hi = min(args.packers), max(args.packers)
            rows.append({"measure": f"{name}: speed-up {hi} vs {lo} CPU(s)", "ratio": rates[hi] / rates[lo]})
    finally:
        ray.shutdown()
    print_table(rows, ["measure", "cpus", "tokens_per_s", "tokens_per_s_per_cpu", "cpus_for_target", "ratio"])
    record("data_throughput", {"mode": "scaling", **vars(args)}, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1500, help="global batches timed per pipeline (several shards)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="training steps of the fit() run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: train a BPE here)")
    parser.add_argument("--scaling", action="store_true", help="measure the packing pool with 1 and 2 CPUs instead")
    parser.add_argument("--packers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scaling-batches", type=int, default=200, help="global batches timed per pool")
    parser.add_argument("--scaling-batch", type=int, default=32, help="rows per global batch in --scaling")
    parser.add_argument("--target", type=float, default=3e6, help="tokens/s to size for in --scaling")
    args = parser.parse_args()
    if args.scaling:
        return scaling(args)

    import ray

    from raytitan.ray.data_feed import ray_rows

    work = tempfile.mkdtemp(prefix="raytitan-bench-")
    shards = ensure_synthetic_shards(os.path.join(work, "c4"), seed=0, num_shards=8, docs_per_shard=2000)
    bpe = args.tokenizer or train_bpe(shards, work)
    tokenizers = {"byte": Model(), "bpe": Model(tokenizer="hf", hf_assets_path=bpe)}

    rows = []
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        for name, model_config in tokenizers.items():
            tok = build_tokenizer(model_config)
            local = pipeline_tokens_per_s(local_rows(shards, tok, args.seq_len, 0, Cursor()), args.batches,
                                          args.global_batch, args.seq_len)
            via_ray = pipeline_tokens_per_s(ray_rows(shards, model_config, args.seq_len, 0, Cursor()), args.batches,
                                            args.global_batch, args.seq_len)
            rows.append({"measure": f"pipeline in-process ({name})", "tokens_per_s": local})
            rows.append({"measure": f"pipeline Ray Data ({name})", "tokens_per_s": via_ray})
    finally:
        ray.shutdown()
    consume = training_tokens_per_s(args.seq_len, args.global_batch // args.workers, 5)
    rows.append({"measure": "training consumption, 1 process (debug model)", "tokens_per_s": consume})
    rows.append({"measure": f"training consumption, {args.workers} workers (upper bound)",
                 "tokens_per_s": consume * args.workers})

    import raytitan

    raytitan.fit(None, job__dump_folder=os.path.join(work, "runs"), training__steps=args.steps,
                          training__seq_len=args.seq_len, training__global_batch_size=args.global_batch,
                          training__local_batch_size=args.global_batch // args.workers,
                          training__dataset="files", training__dataset_path=os.path.join(work, "c4"),
                          metrics__log_freq=args.steps, checkpoint__enable=False, metrics__enable_tensorboard=False,
                          ray__num_workers=args.workers)
    logged = raytitan.read_metrics(os.path.join(work, "runs", "llama3-debugmodel"))
    rows.append({"measure": "data wait share, step 1 (pipeline start-up)", "share": logged[0]["data_wait_share"]})
    rows.append({"measure": f"data wait share, steps 2-{args.steps} (steady state)",
                 "share": logged[-1]["data_wait_share"]})
    print_table(rows, ["measure", "tokens_per_s", "share"])
    record("data_throughput", vars(args), rows)


if __name__ == "__main__":
    main()
