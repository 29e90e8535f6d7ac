"""Convert checkpoints: ``python -m raytitan.convert to-hf|from-hf|to-torch|from-torchtitan|to-torchtitan SRC DST``.

- ``to-hf``: a DCP step (or the newest of a checkpoint folder) -> Hugging Face model folder
  (safetensors shards + config.json, tokenizer files when the run had them).
- ``from-hf``: Hugging Face model folder -> a committed, model-only DCP step folder; train from
  it with ``--checkpoint.initial_load_path DST`` under any layout (DCP reshards it).
- ``to-torch``: a DCP step -> one ``torch.save`` file (model weights by name, or every state).
- ``from-torchtitan``: a torchtitan DCP step (or the newest of its checkpoint folder) -> a
  committed, model-only raytitan step (runs also read torchtitan steps in place: this is for
  fused-QKV steps, and for a copy that records its model).
- ``to-torchtitan``: a DCP step -> a torchtitan step folder (model weights at the top level,
  torchtitan 0.2.x names, or 0.3.x's with ``--names 0.3``) for torchtitan's
  ``--checkpoint.initial_load_path``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from raytitan.distributed.precision import DTYPES

from raytitan.components.checkpoint.layout import CheckpointError
from raytitan.components.checkpoint.convert import (
    export_hf, export_torch, import_hf, model_of, resolve_step_path,
)
from raytitan.components.checkpoint.torchtitan import NAMES, export_torchtitan, import_torchtitan
from raytitan.models.hf import HFFormatError
from raytitan.models.spec import ModelSpecError


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
    return int(float(m.group(1)) * unit[m.group(2)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytitan.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="DCP step -> Hugging Face model folder")
    to_hf.add_argument("src", help="step folder, or a checkpoint folder (its newest committed step)")
    to_hf.add_argument("dst", help="output folder (replaced)")
    to_hf.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="5GB", help="per safetensors file (default 5GB)")
    to_hf.add_argument("--flavor", help="model flavor, for checkpoints that do not record their shape")
    to_hf.add_argument("--tokenizer", help="folder whose tokenizer files to copy (default: the run's)")
    to_hf.add_argument("--model", help="model.name, for checkpoints that do not record their family")
    from_hf = sub.add_parser("from-hf", help="Hugging Face model folder -> DCP step folder")
    from_hf.add_argument("src", help="folder with config.json and *.safetensors")
    from_hf.add_argument("dst", help="output step folder (replaced)")
    from_hf.add_argument("--dtype", choices=list(DTYPES), default="float32", help="stored dtype (default float32)")
    from_hf.add_argument("--model", help="model.name to read it as (default: the built-in family of its model_type)")
    to_torch = sub.add_parser("to-torch", help="DCP step -> one torch.save file")
    to_torch.add_argument("src", help="step folder, or a checkpoint folder (its newest committed step)")
    to_torch.add_argument("dst", help="output .pt file")
    to_torch.add_argument("--all-states", action="store_true", help="every saved state, not only the model weights")
    from_tt = sub.add_parser("from-torchtitan", help="torchtitan DCP step -> DCP step folder")
    from_tt.add_argument("src", help="torchtitan step folder, or its checkpoint folder (its newest step)")
    from_tt.add_argument("dst", help="output step folder (replaced)")
    from_tt.add_argument("--model", default="llama3", help="model.name it holds (default llama3)")
    from_tt.add_argument("--flavor", help="model flavor: recorded for later exports; needed for fused wqkv weights")
    from_tt.add_argument("--dtype", choices=list(DTYPES), help="stored dtype (default: as saved)")
    to_tt = sub.add_parser("to-torchtitan", help="DCP step -> torchtitan DCP step folder")
    to_tt.add_argument("src", help="step folder, or a checkpoint folder (its newest committed step)")
    to_tt.add_argument("dst", help="output step folder (replaced)")
    to_tt.add_argument("--names", choices=NAMES, default="0.2",
                       help="torchtitan version whose weight names to write (default 0.2: v0.2.x; 0.3: lm_head, "
                            "attention.qkv_linear.wq/wk/wv)")
    to_tt.add_argument("--dtype", choices=list(DTYPES), help="stored dtype (default: as saved)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    remote = [p for p in (args.src, args.dst) if "://" in p]
    if remote:
        print(f"error: {remote[0]} is in an object store; the converters read and write folders: copy it first "
              "(e.g. aws s3 sync / gcloud storage rsync)", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    try:
        if args.command == "to-hf":
            src = resolve_step_path(args.src)
            out = export_hf(src, args.dst, DTYPES[args.dtype], args.max_shard_size,
                            model_of(src, args.flavor, args.model), args.tokenizer)
        elif args.command == "from-hf":
            out = import_hf(args.src, args.dst, DTYPES[args.dtype], args.model)
        elif args.command == "from-torchtitan":
            out = import_torchtitan(args.src, args.dst, args.model, args.flavor, args.dtype and DTYPES[args.dtype])
        elif args.command == "to-torchtitan":
            out = export_torchtitan(resolve_step_path(args.src), args.dst, args.names, args.dtype and DTYPES[args.dtype])
        else:
            out = export_torch(resolve_step_path(args.src), args.dst, model_only=not args.all_states)
    except (CheckpointError, HFFormatError, ModelSpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
