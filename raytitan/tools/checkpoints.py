"""Look at checkpoints: ``python -m raytitan.checkpoints list|inspect|verify PATH``.

- ``list FOLDER``: every step folder: committed, uncommitted or damaged (unreadable marker), size,
  world size it was saved with, whether it has checksums.
- ``inspect STEP``: what a step holds: states, tensor counts and bytes, model weights and shapes.
- ``verify STEP|FOLDER``: check every stored item of a step (or of every committed step) against
  its checksums, then read every tensor and every other entry and report NaN/Inf values; reports
  every damaged step (and every damaged item in it) and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from raytitan.components.checkpoint import integrity
from raytitan.components.checkpoint.layout import (
    COMMIT_MARKER, CheckpointError, check_files, committed_steps, read_commit_at, step_dir,
)
from raytitan.components.checkpoint.convert import (
    VerifyReport, list_steps, model_order, resolve_step_path, state_sizes, tensor_keys, verify,
)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_list(folder: str) -> int:
    steps = list_steps(folder)
    if not steps:
        print(f"{folder}: no step folders")
        return 0
    print(f"{'step':>8}  {'state':<11} {'size':>10}  {'world':>5}  {'contents':<11} {'checksums':<9} saved")
    for s in steps:
        m = s.marker
        when = datetime.datetime.fromtimestamp(m["time"]).strftime("%Y-%m-%d %H:%M:%S") if "time" in m else "-"
        contents = ("weights" if m.get("model_only") else "full") if s.committed and not s.damage else "-"
        state = "DAMAGED" if s.damage else "committed" if s.committed else "UNCOMMITTED"
        print(f"{s.step:>8}  {state:<11} {_size(s.bytes):>10}  {m.get('world_size', '-'):>5}  {contents:<11} "
              f"{m.get('checksums', '-'):<9} {when}")
    for s in steps:
        if s.damage:
            print(f"step {s.step} is damaged and never loaded: {s.damage}")
    uncommitted = [s.step for s in steps if not s.committed]
    if uncommitted:
        print(f"uncommitted steps {uncommitted} are never loaded (an interrupted save, or one in progress)")
    print("(list reads the markers only; `verify` checks the data against its checksums)")
    return 0


def cmd_inspect(path: str) -> int:
    path = resolve_step_path(path)
    metadata = check_files(path)
    marker = read_commit_at(path)
    print(f"{path}: step {marker.get('step')}, saved by {marker.get('world_size')} ranks"
          f"{', weights only' if marker.get('model_only') else ''}"
          f"{', flavor ' + marker['flavor'] if 'flavor' in marker else ''}")
    for state, (entries, nbytes) in sorted(state_sizes(metadata).items()):
        print(f"  {state:<14} {entries:>6} entries  {_size(nbytes):>10} of tensors")
    print("model weights:")
    for key in sorted(tensor_keys(metadata, "model."), key=model_order):
        meta = metadata.state_dict_metadata[key]
        dtype = str(meta.properties.dtype).removeprefix("torch.")
        print(f"  {key.removeprefix('model.'):<48} {dtype:<9} {list(meta.size)}")
    return 0


def cmd_verify(path: str) -> int:
    is_step = os.path.isfile(os.path.join(path, COMMIT_MARKER))
    paths = [path] if is_step else [step_dir(path, s) for s in committed_steps(path)]
    if not paths:
        raise CheckpointError(f"{path}: no committed steps to verify")
    damaged, non_finite = [], 0
    for step_path in paths:
        try:
            non_finite += _verify_step(step_path)
        except CheckpointError as e:  # every step is checked, whatever the previous one held
            print(f"{step_path}: DAMAGED: {e}", file=sys.stderr)
            damaged.append(os.path.basename(step_path))
    if damaged:
        print(f"{len(damaged)} of {len(paths)} steps are damaged: {', '.join(damaged)}. A run resuming skips damaged "
              "steps (with a warning) and takes the newest intact one; delete them to be rid of them", file=sys.stderr)
    return 1 if damaged or non_finite else 0


def _verify_step(step_path: str) -> bool:
    """Check one step's checksums, then read it whole for NaN/Inf, printing what it finds; returns
    whether it holds non-finite values, raises ``CheckpointError`` when it is damaged."""
    marker = read_commit_at(step_path)
    metadata = check_files(step_path)
    problems = integrity.verify_step(step_path, metadata, marker)
    if problems:
        raise integrity.ChecksumError(f"{len(problems)} item(s) fail their checksums:\n  " + "\n  ".join(problems))
    checked = "checksums ok" if problems is not None else "no checksums (saved before raytitan recorded them)"
    for item in verify(step_path, checked=False):  # just checked, in one pass over the raw bytes
        if sys.stdout.isatty():
            print("\r", end="")
        if isinstance(item, VerifyReport):
            status = "ok" if not item.non_finite else f"{len(item.non_finite)} tensors with NaN/Inf"
            print(f"{step_path}: {checked}; {item.tensors} tensors ({_size(item.bytes)}) and {item.entries} other "
                  f"entries read: {status}")
            for key, count in sorted(item.non_finite.items()):
                print(f"  {key}: {count} non-finite values")
            return bool(item.non_finite)
        if sys.stdout.isatty():
            print(f"  {step_path}: {item[0] / max(item[1], 1):.0%}", end="", flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytitan.checkpoints", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="step folders of a checkpoint folder").add_argument("folder")
    sub.add_parser("inspect", help="what one step holds").add_argument("path", help="step folder (or checkpoint folder: newest)")
    sub.add_parser("verify", help="read every tensor and entry").add_argument("path", help="step folder, or checkpoint folder: all steps")
    args = parser.parse_args(argv)
    target = getattr(args, "folder", None) or args.path
    if "://" in target:
        print(f"error: {target} is in an object store; this tool reads folders: copy the checkpoint folder first "
              "(e.g. aws s3 sync / gcloud storage rsync)", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            return cmd_list(args.folder)
        if args.command == "inspect":
            return cmd_inspect(args.path)
        return cmd_verify(args.path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
